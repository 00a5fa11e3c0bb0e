"""``torchrun --nproc-per-node N -m npu_dsv3.pretrain <flags>``: DeepSeek-V3 pretraining on Megatron-Core.

The flags are Megatron / MindSpeed-LLM's (``npu_dsv3.arguments``); the training loop is
``npu_dsv3.training.loop`` (model, schedule, logging, evaluation, checkpoints) and the data
``npu_dsv3.training.data`` (mock tokens or GPTDataset over ``--data-path``).
``npu_dsv3.finetune`` runs the same loop on instruction data. Bad flags, data or checkpoints, a
non-finite loss and a save that cannot be written end in one ``npu_dsv3.pretrain: error: ...`` line
and exit status 2.
"""

import os
import sys

import torch.distributed as dist


def main(argv=None, mode: str = "pretrain") -> int:
    from npu_dsv3.arguments import build_configs, parse_args
    from npu_dsv3.argtypes import os_error_line
    from npu_dsv3.checkpoint.hf_reader import CheckpointError
    from npu_dsv3.console import to_console
    from npu_dsv3.training.loop import train
    from npu_dsv3.training.metrics import NonFiniteLossError

    to_console()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, world_size=world, mode=mode)
        train(args, build_configs(args))
    except (ValueError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"npu_dsv3.{mode}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a save that cannot be written: permissions, a file in the way, a full disk
        print(f"npu_dsv3.{mode}: error: {os_error_line(e, getattr(args, 'save', None))}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

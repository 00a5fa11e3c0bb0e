"""Checkpoints never run code: torch's and megatron's checkpoint readers go through the restricted
unpickler of ``npu_dsv3.checkpoint.safe_load`` (always on, every backend; the README's "Trust model").
"""

from typing import List

NAME = "checkpoint-safety"
TESTS = "tests/unit/test_checkpoint_safety.py"
ALWAYS_ON = True

_DCP = "torch.distributed.checkpoint"
_COMMON = "megatron.core.dist_checkpointing.strategies.common.TorchCommonLoadStrategy"


def patches() -> List:
    from npu_dsv3.checkpoint import safe_load
    from npu_dsv3.patching import Patch

    def reader(part: str, target: str, replacement, why: str, wrap: bool = False) -> Patch:
        return Patch(name=f"{NAME}.{part}", feature=NAME, target=target, replacement=replacement, why=why, wrap=wrap)

    return [
        reader("metadata", f"{_DCP}.filesystem.FileSystemReader.read_metadata", safe_load.read_metadata,
               "DCP unpickles a checkpoint's .metadata with plain pickle: a crafted file runs code"),
        reader("byte-records", f"{_DCP}.default_planner.DefaultLoadPlanner.load_bytes", safe_load.load_bytes,
               "DCP's load planner (megatron's inherits it) reads the byte records of .distcp files with "
               "torch.load and weights_only=False: a crafted record runs code"),
        reader("distcp-files", f"{_DCP}.filesystem.FileSystemReader.read_data", safe_load.checked_read_data,
               "a missing, truncated or damaged .distcp file fails naming neither the file nor the checkpoint",
               wrap=True),
        reader("one-line-errors", f"{_DCP}.state_dict_loader._load_state_dict", safe_load.unwrapped_errors,
               "DCP turns a reader's error into a multi-line exception holding every rank's traceback", wrap=True),
        reader("common-pt", f"{_COMMON}.load_common", safe_load.load_common,
               "megatron reads common.pt with torch.load without weights_only: a crafted file runs code"),
        reader("sharded-objects", f"{_COMMON}.load_sharded_objects", safe_load.load_sharded_objects,
               "megatron reads sharded-object .pt files with torch.load without weights_only"),
    ]

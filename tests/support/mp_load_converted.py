"""Run by tests/multiprocess/test_convert_parallel_load.py and tests/multiprocess/test_model_layouts.py in
each of several processes (gloo): build this rank's TP / PP / EP shard of the model for the layout of the flags,
load a converted checkpoint the way training does (the legacy rank file with a strict
``load_state_dict``; torch_dist through megatron's loader) and print, as one JSON line, the
relative max difference of this rank's vocabulary columns of the logits from transformers'
(on the last pipeline stage, after a forward through megatron's pipeline schedule).

    python tests/support/mp_load_converted.py HF_DIR LEGACY_DIR [--dist-dir D --save-dir S] [--tp 2 --ep 2 --pp 1]
        [--mla-mm-split] [--moe-tp-extend-ep] [--num-layer-list 1,3] [--noop-layers 1]
    (RANK, WORLD_SIZE, MASTER_* set)

With ``--save-dir`` it then saves the model with megatron's own writer there (an empty directory).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist

import npu_dsv3  # noqa: F401  (patches)
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.model.builder import build_model
from npu_dsv3.model.placement import checkpoint_expert_rank, tp_extended_expert_sizes
from transformers import AutoModelForCausalLM


def _int_list(text):
    return [int(v) for v in text.split(",")] if text else None


def _args():
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("legacy_dir")
    parser.add_argument("--dist-dir")
    parser.add_argument("--save-dir")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="the converter's --target-expert-parallel-size")
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--mla-mm-split", action="store_true")
    parser.add_argument("--moe-tp-extend-ep", action="store_true")
    parser.add_argument("--num-layer-list", type=_int_list)
    parser.add_argument("--noop-layers", type=_int_list)
    return parser.parse_args()


def _config(args):
    if args.moe_tp_extend_ep:
        experts = tp_extended_expert_sizes(args.tp, args.ep)
    else:
        experts = {"expert_model_parallel_size": args.ep, "expert_tensor_parallel_size": 1}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tp,
                                             pipeline_model_parallel_size=args.pp, **experts)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    return hf_to_mcore_config_dpskv3(
        load_hf_config(args.hf_dir), tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
        pipeline_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=False,
        moe_grouped_gemm=True, mtp_num_layers=None, mla_mm_split=args.mla_mm_split,
        moe_tp_extend_ep=args.moe_tp_extend_ep, num_layer_list=args.num_layer_list,
        noop_layers=args.noop_layers, **experts,
    )


def _legacy_file(args, config) -> str:
    """This rank's file: mp_rank_TT[_PPP][_EEE] with the converter's EP rank."""
    name = f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}"
    if args.pp > 1:
        name += f"_{parallel_state.get_pipeline_model_parallel_rank():03d}"
    if args.ep > 1:
        name += f"_{checkpoint_expert_rank(config, parallel_state.get_expert_model_parallel_rank()):03d}"
    return os.path.join(args.legacy_dir, "release", name, "model_optim_rng.pt")


def _pipeline_logits(model, config, ids):
    """Logits (vocab-parallel) on the last pipeline stage through megatron's schedule, else None."""
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)

    def forward_step(data_iterator, chunk):
        output = chunk(ids, position_ids, attention_mask=None)
        return output, lambda out: (out.sum() * 0, {"logits": out.detach()})

    stored = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True,
    )
    return stored[0]["logits"] if stored else None


def _relative_diff(local, expected, vocab_size):
    """This rank's vocabulary columns of the logits against transformers'."""
    tp_rank, width = parallel_state.get_tensor_model_parallel_rank(), local.shape[-1]
    cols = slice(tp_rank * width, min((tp_rank + 1) * width, vocab_size))
    ours = local[..., : cols.stop - cols.start]
    return float((ours - expected[..., cols]).abs().max() / expected.abs().max())


def main():
    args = _args()
    dist.init_process_group("gloo")
    config = _config(args)
    reference = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    results = {"rank": dist.get_rank(), "expert_rank": parallel_state.get_expert_model_parallel_rank(),
               "tp_rank": parallel_state.get_tensor_model_parallel_rank()}
    formats = ("legacy", "dist") if args.dist_dir else ("legacy",)
    for fmt in formats:
        model = build_model(config).eval()
        if fmt == "legacy":
            payload = torch.load(_legacy_file(args, config), weights_only=True)
            model.load_state_dict(payload["model"], strict=True)
        else:
            state = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                            os.path.join(args.dist_dir, "release"))
            model.load_state_dict(state["model"], strict=True)
        with torch.no_grad():
            local = _pipeline_logits(model, config, ids)
        results[fmt] = None if local is None else _relative_diff(local, expected, config.vocab_size)
    if args.save_dir:
        # What training saves from this layout (TP-split and EP-split chunks), for mcore2hf to read back.
        dist_checkpointing.save({"model": model.sharded_state_dict()}, args.save_dir)
    print(json.dumps(results), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":  # megatron's checkpoint writer starts helper processes
    main()

"""Run by tests/test_convert_parallel_load.py in each of several processes (gloo): build this
rank's TP / EP shard of the model, load a converted checkpoint the way training does (the legacy
rank file with a strict ``load_state_dict``; torch_dist through megatron's loader) and print, as
one JSON line, the relative max difference of this rank's vocabulary columns of the logits from
transformers'.

    python tests/mp_load_converted.py HF_DIR LEGACY_DIR DIST_DIR SAVE_DIR TP EP   (RANK, WORLD_SIZE, MASTER_* set)

Then it saves the model with megatron's own writer into SAVE_DIR (an empty directory).
"""
import json
import os
import sys

import torch
import torch.distributed as dist

import npu_dsv3  # noqa: F401  (patches)
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.model.builder import build_model
from transformers import AutoModelForCausalLM

def main():
    hf_dir, legacy_dir, dist_dir, save_dir = sys.argv[1:5]
    tp, ep = int(sys.argv[5]), int(sys.argv[6])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                             expert_tensor_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    config = hf_to_mcore_config_dpskv3(load_hf_config(hf_dir), tensor_model_parallel_size=tp,
                                       expert_model_parallel_size=ep, expert_tensor_parallel_size=1, use_cpu_initialization=True,
                                       perform_initialization=False, moe_grouped_gemm=True, mtp_num_layers=None)

    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    tp_rank, ep_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank()
    results = {}
    for fmt in ("legacy", "dist"):
        model = build_model(config).eval()
        if fmt == "legacy":
            name = f"mp_rank_{tp_rank:02d}" + (f"_{ep_rank:03d}" if ep > 1 else "")
            payload = torch.load(os.path.join(legacy_dir, "release", name, "model_optim_rng.pt"), weights_only=True)
            model.load_state_dict(payload["model"], strict=True)
        else:
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, os.path.join(dist_dir, "release"))
            model.load_state_dict(state["model"], strict=True)
        with torch.no_grad():
            local = model(ids, position_ids, attention_mask=None)  # vocab-parallel: this rank's columns
        width = local.shape[-1]
        cols = slice(tp_rank * width, min((tp_rank + 1) * width, config.vocab_size))
        ours = local[..., : cols.stop - cols.start]
        results[fmt] = float((ours - expected[..., cols]).abs().max() / expected.abs().max())
    # What training saves from this layout (TP-split and EP-split chunks), for mcore2hf to read back.
    dist_checkpointing.save({"model": model.sharded_state_dict()}, save_dir)
    print(json.dumps({"rank": rank, **results}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":  # megatron's checkpoint writer starts helper processes
    main()

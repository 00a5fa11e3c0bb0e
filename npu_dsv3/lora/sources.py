"""The adapters of a LoRA training checkpoint, read back whole from either format and any layout, by
(canonical target, HF layer) as ``npu_dsv3.lora.export`` takes them, and its adapter description.

A torch_dist checkpoint stores every adapter whole and layout-free (fc1's B as [gate; up]), so each is
read as one tensor. A legacy one stores each rank's pieces: they are put back together by the layout the
checkpoint records, the way the converters merge the base weights (``checkpoint.sharding``): column B
by rows (fc1's as [gate; up] per rank), row A by columns, routed experts by EP and expert-TP rank.
Adapters are small (r wide), so they are held in memory; the base weights stream as in mcore2hf.
"""

import json
import os
from collections import defaultdict
from typing import Dict, Optional, Tuple

import torch

from npu_dsv3.checkpoint import sharding
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.lora.export import Adapters
from npu_dsv3.lora.targets import ATTENTION, OUTPUT_LAYER, is_lora_param

MODEL_KEYS = ("embedding.", "decoder.", "mtp.", "output_layer.")  # GPTModel's entries in a torch_dist checkpoint
LORA_FILE = "lora_config.json"  # what training writes beside its checkpoints (training.checkpointing)
COLUMN = ("linear_q_up_proj", "linear_kv_up_proj", "mlp.linear_fc1", "shared_experts.linear_fc1", OUTPUT_LAYER)
ROW = ("linear_proj", "mlp.linear_fc2", "shared_experts.linear_fc2")


def read_description(load_dir: str) -> Optional[dict]:
    path = os.path.join(load_dir, LORA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def parse_name(name: str, num_layers: int) -> Optional[Tuple[str, Optional[int], str, str]]:
    """(canonical target, HF layer, "A"/"B", layer prefix) of a megatron LoRA tensor name; ``decoder.layers.N``
    counts in the name's own numbering (the caller maps it), MTP depth d is HF layer ``num_layers + d``."""
    if not is_lora_param(name):
        return None
    path, param = name.rsplit(".", 1)
    part = param[-1]
    if path == "output_layer":
        return OUTPUT_LAYER, None, part, ""
    if path.startswith("decoder.layers."):
        _, _, index, rest = path.split(".", 3)
        layer = int(index)
    elif path.startswith("mtp.layers."):
        _, _, depth, rest = path.split(".", 3)
        rest = rest[len("transformer_layer."):]
        layer = num_layers + int(depth)
    else:
        raise CheckpointError(f"{name}: a LoRA tensor outside the decoder, MTP and output layers")
    if rest.startswith("self_attention."):
        target = rest[len("self_attention."):]
    elif rest == "mlp.experts":
        target = f"experts.linear_{param[len('lora_'):len('lora_') + 3]}"
    elif rest.startswith("mlp.shared_experts."):
        target = rest[len("mlp."):]
    else:
        target = rest
    if target == "linear_qkv":
        raise CheckpointError(f"{name}: MindSpeed-LLM's fused linear_qkv adapter, one A and B for both MLA "
                              "down-projections, which HF and this package adapt separately; it cannot be split: "
                              "retrain with --lora-target-modules linear_qkv here (two adapters) or merge it with "
                              "MindSpeed-LLM")
    if target not in (*ATTENTION, *COLUMN, *ROW, "experts.linear_fc1", "experts.linear_fc2"):
        raise CheckpointError(f"{name}: not a LoRA target of this package")
    return target, layer, part, path


def _orient(target: str, part: str, tensor: torch.Tensor) -> torch.Tensor:
    """Experts are stored for ops.gmm ([E, in, r] / [E, r, out]); export wants [E, r, in] / [E, out, r]."""
    return tensor.transpose(1, 2) if target.startswith("experts") else tensor


def dist_adapters(load_dir: str, num_layers: int, vocab_size: int) -> Adapters:
    """Every adapter of a torch_dist checkpoint, each read whole."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from npu_dsv3.checkpoint.mcore_dist import release_dir
    from npu_dsv3.distributed import ensure_single_process_group

    ensure_single_process_group()
    directory = release_dir(load_dir)
    stored = dist_checkpointing.load_tensors_metadata(directory)
    wanted = {key: meta for key, meta in stored.items()  # the model's, not the optimizer state's
              if key.startswith(MODEL_KEYS) and parse_name(key, num_layers) is not None}
    if not wanted:
        raise CheckpointError(f"{load_dir} holds no LoRA adapters")
    request = {key: ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype))
               for key, meta in wanted.items()}
    loaded = dist_checkpointing.load(request, directory)
    out: Adapters = defaultdict(dict)
    for key in wanted:  # load() also returns the checkpoint's common state
        tensor = loaded[key]
        target, layer, part, _ = parse_name(key, num_layers)
        if target == OUTPUT_LAYER and part == "B":
            tensor = tensor[:vocab_size]
        out[(target, layer)][part] = _orient(target, part, tensor)
    return dict(out)


def legacy_adapters(load_dir: str, config, par) -> Adapters:
    """Every adapter of a legacy checkpoint, its rank pieces merged by the layout ``par`` it was written in."""
    from npu_dsv3.checkpoint.mcore_legacy import rank_file, tracked_tag
    from npu_dsv3.checkpoint.safe_load import load_torch

    tag = tracked_tag(load_dir)

    def payload(tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
        path = rank_file(load_dir, par, tp_rank, pp_rank, ep_rank, tag)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing: the checkpoint was not written with tensor / "
                                  f"pipeline / expert parallel sizes {par.tp} / {par.pipeline.pp} / {par.ep}")
        return load_torch(path, map_location="cpu", mmap=True)

    adapters = rank_adapters(payload, config, par)
    if not adapters:
        raise CheckpointError(f"{load_dir} holds no LoRA adapters")
    return adapters


def rank_adapters(payload, config, par) -> Adapters:
    """Every adapter of a model in the layout ``par``, merged from each rank's pieces: ``payload(tp_rank,
    pp_rank, ep_rank)`` gives that rank's chunks by ``par.chunk_key`` (a rank file's payload, or what the
    bridge gathered); {} when there are none."""
    layout = par.pipeline
    pieces: Dict[Tuple[str, Optional[int], str], Dict[Tuple[int, int], torch.Tensor]] = defaultdict(dict)
    for pp_rank in range(layout.pp):
        for ep_rank in range(par.ep):
            for tp_rank in range(par.tp):
                payload_here = payload(tp_rank, pp_rank, ep_rank)
                for chunk in range(layout.num_chunks):
                    real = [layout.real_layer(i) for i in layout.chunk_layers(pp_rank, chunk)]
                    for name, tensor in payload_here.get(par.chunk_key(chunk), {}).items():
                        parsed = parse_name(name, config.num_layers)
                        if parsed is None:
                            continue
                        target, layer, part, path_ = parsed
                        if path_.startswith("decoder.layers."):
                            layer = real[layer]
                        pieces[(target, layer, part)][(tp_rank, ep_rank)] = tensor.clone()
    out: Adapters = defaultdict(dict)
    for (target, layer, part), by_rank in pieces.items():
        out[(target, layer)][part] = _merge(target, part, by_rank, config, par)
    return dict(out)


def _merge(target: str, part: str, by_rank, config, par) -> torch.Tensor:
    if target.startswith("experts"):
        return _merge_experts(target, part, by_rank, config, par)
    ranks = [by_rank[(t, 0)] for t in range(par.tp)]
    if target in COLUMN and part == "B":
        if target.endswith("linear_fc1"):
            gate, up = sharding.merge(sharding.Spec("", ("", ""), sharding.GLU_ROWS), [ranks])
            return torch.cat([gate, up])
        merged = torch.cat(ranks)
        return merged[:config.vocab_size] if target == OUTPUT_LAYER else merged
    if target in ROW and part == "A":
        return torch.cat(ranks, dim=1)
    return ranks[0]


def _merge_experts(target: str, part: str, by_rank, config, par) -> torch.Tensor:
    per_expert = []
    for e in range(config.num_moe_experts):
        ep_rank, etp_ranks, local = par.expert_home(config.num_moe_experts, e)
        slices = [by_rank[(t, ep_rank)][local] for t in etp_ranks]  # gmm layout: [in, r] (A) / [r, out] (B)
        if target == "experts.linear_fc1" and part == "B":
            halves = [s.t().chunk(2, dim=0) for s in slices]
            whole = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
        elif target == "experts.linear_fc2" and part == "A":
            whole = torch.cat(slices, dim=0).t()
        else:
            whole = slices[0].t()
        per_expert.append(whole)
    return torch.stack(per_expert)


def adapters_of(lora_dir: str) -> Tuple[Adapters, dict]:
    """The adapters of the LoRA training checkpoint ``lora_dir`` (either format; a legacy one in the layout its
    rank files record) and its description (``LORA_FILE``: r, alpha, dropout, targets, fusion)."""
    from npu_dsv3.checkpoint.layout_record import recorded_layout
    from npu_dsv3.checkpoint.mcore_dist import release_dir
    from npu_dsv3.checkpoint.sources import model_config
    from npu_dsv3.config import load_hf_config
    from npu_dsv3.layout import LAYOUT_DEFAULTS, ParallelLayout, converter_flag

    description = read_description(lora_dir)
    if description is None:
        raise CheckpointError(f"{lora_dir} has no {LORA_FILE}: it is not a LoRA checkpoint of npu_dsv3.finetune / "
                              "pretrain (--lora-target-modules)")
    hf_config = load_hf_config(lora_dir)
    if release_dir(lora_dir) is not None:
        return dist_adapters(lora_dir, hf_config["num_hidden_layers"], hf_config["vocab_size"]), description
    flags = {**LAYOUT_DEFAULTS, **(recorded_layout(lora_dir) or {})}
    config = model_config(hf_config, flags["moe_grouped_gemm"])
    par = ParallelLayout.from_flags(config, **flags, flag=converter_flag("source"))
    return legacy_adapters(lora_dir, config, par), description


def check_description(description: dict, r: Optional[int], alpha: Optional[float], targets) -> None:
    """Flags given beside a LoRA checkpoint must say what it records (MindSpeed-LLM's converter takes them)."""
    from npu_dsv3.lora.targets import resolve

    given = {"--lora-r": (r, description["r"]), "--lora-alpha": (alpha, description["alpha"]),
             "--lora-target-modules": (resolve(targets) if targets else None, tuple(description["targets"]))}
    for flag, (value, recorded) in given.items():
        if value is not None and value != recorded:
            raise ValueError(f"{flag} {value} contradicts the adapters, recorded with {flag} {recorded} "
                             f"({LORA_FILE}): drop the flag or pass the recorded value")

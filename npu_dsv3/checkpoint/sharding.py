"""How each DeepSeek-V3 tensor is split over tensor- and expert-parallel ranks.

One ``Spec`` per megatron tensor of a layer: its HF sources and how the tensor
is cut, the same rule in both directions (``shard`` for HF -> mcore, ``merge``
for mcore -> HF), so a round trip is the identity by construction and the tests
check it bit for bit.

Cuts follow megatron-core's modules: column-parallel linears (MLA's up
projections, fc1, MTP's eh_proj) split their output rows; row-parallel linears
(linear_proj, fc2) split their input columns; gated fc1 weights ([gate; up])
split gate and up separately; the vocabulary is padded and split by rows;
norms, the router, the expert bias and MLA's down projections (held whole on
every rank, ``npu_dsv3.model.linear``) are replicated. Routed experts are split
by expert over EP and, within an expert, like fc1/fc2 over the expert-TP group.
With ``--mla-mm-split`` MLA's up-projections, whose HF rows are per head
[nope | rope] (q_b_proj) or [nope | v] (kv_b_proj), are stored as one
column-parallel linear per part (``HeadSplit``), each split by heads.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

REPLICATED, ROWS, COLS, GLU_ROWS = "replicated", "rows", "cols", "glu_rows"
STACKED = "stacked"  # the sources stacked along rows, whole on every rank (QLoRA's NF4 scales)


@dataclass(frozen=True)
class Spec:
    mcore: str
    hf: Tuple[str, ...]
    cut: str


@dataclass(frozen=True)
class HeadSplit:
    """One HF up-projection whose rows are, per head, ``sizes`` rows of each part in turn,
    stored as one megatron tensor per part: ``mcore[k]`` holds part k's rows of every head."""

    mcore: Tuple[str, ...]
    hf: Tuple[str]
    sizes: Tuple[int, ...]


def mcore_names(spec) -> Tuple[str, ...]:
    return spec.mcore if isinstance(spec, HeadSplit) else (spec.mcore,)


def _up_proj(name: str, hf: str, parts: Dict[str, int], mla_mm_split: bool):
    """MLA's up-projection ``name`` whole, or with --mla-mm-split as MindSpeed-LLM's
    separate matmuls (names of mindspeed_llm/tasks/checkpoint/model_builder.py)."""
    if not mla_mm_split:
        return Spec(f"self_attention.{name}.weight", (hf,), ROWS)
    return HeadSplit(tuple(f"self_attention.{part}.weight" for part in parts), (hf,), tuple(parts.values()))


def attention_specs(config, mla_mm_split: bool = False) -> list:
    nope, rope, v = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    specs = [Spec("input_layernorm.weight", ("input_layernorm.weight",), REPLICATED)]
    if config.q_lora_rank is None:
        # MindSpeed splits only the up-projections behind a LoRA down-projection.
        specs.append(Spec("self_attention.linear_q_proj.weight", ("self_attn.q_proj.weight",), ROWS))
    else:
        specs += [
            Spec("self_attention.linear_q_down_proj.weight", ("self_attn.q_a_proj.weight",), REPLICATED),
            Spec("self_attention.q_layernorm.weight", ("self_attn.q_a_layernorm.weight",), REPLICATED),
            _up_proj("linear_q_up_proj", "self_attn.q_b_proj.weight",
                     {"linear_qk_nope": nope, "linear_qk_rope": rope}, mla_mm_split),
        ]
    return specs + [
        Spec("self_attention.linear_kv_down_proj.weight", ("self_attn.kv_a_proj_with_mqa.weight",), REPLICATED),
        Spec("self_attention.kv_layernorm.weight", ("self_attn.kv_a_layernorm.weight",), REPLICATED),
        _up_proj("linear_kv_up_proj", "self_attn.kv_b_proj.weight",
                 {"linear_kv_nope": nope, "linear_v": v}, mla_mm_split),
        Spec("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), COLS),
        Spec("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATED),
    ]


def dense_mlp_specs(prefix_mcore="mlp.", prefix_hf="mlp.") -> List[Spec]:
    return [
        Spec(f"{prefix_mcore}linear_fc1.weight", (f"{prefix_hf}gate_proj.weight", f"{prefix_hf}up_proj.weight"), GLU_ROWS),
        Spec(f"{prefix_mcore}linear_fc2.weight", (f"{prefix_hf}down_proj.weight",), COLS),
    ]


def moe_specs(config) -> List[Spec]:
    """The MoE layer's non-routed tensors (router, bias, shared experts)."""
    specs = [Spec("mlp.router.weight", ("mlp.gate.weight",), REPLICATED)]
    if config.moe_router_enable_expert_bias:
        specs.append(Spec("mlp.router.expert_bias", ("mlp.gate.e_score_correction_bias",), REPLICATED))
    if config.moe_shared_expert_intermediate_size:
        specs += dense_mlp_specs("mlp.shared_experts.", "mlp.shared_experts.")
    return specs


def mtp_specs() -> List[Spec]:
    return [
        Spec("enorm.weight", ("enorm.weight",), REPLICATED),
        Spec("hnorm.weight", ("hnorm.weight",), REPLICATED),
        Spec("eh_proj.weight", ("eh_proj.weight",), ROWS),
        Spec("final_layernorm.weight", ("shared_head.norm.weight",), REPLICATED),
    ]


def _split(tensor: torch.Tensor, dim: int, parts: int, rank: int, what: str) -> torch.Tensor:
    if tensor.shape[dim] % parts:
        raise ValueError(f"{what}: dimension {dim} of size {tensor.shape[dim]} does not split over {parts} ranks")
    return tensor.chunk(parts, dim=dim)[rank]


def _head_parts(tensor: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
    """[heads * sum(sizes), in] -> one [heads * size, in] tensor per part, heads in order."""
    per_head = tensor.reshape(-1, sum(sizes), tensor.shape[-1])
    return [part.reshape(-1, tensor.shape[-1]) for part in per_head.split(list(sizes), dim=1)]


def nf4_specs(specs: Sequence, quantized) -> list:
    """``specs`` with each quantized HF tensor's (``quantized(hf name)``) weight replaced by its NF4 codes,
    cut like the weight (they are its rows, two values a byte: ``npu_dsv3.lora.nf4_base``), and its
    scales, stacked per source and whole on every rank."""
    from npu_dsv3.lora.nf4_base import CODES, SCALES

    out = []
    for spec in specs:
        if not quantized(spec.hf[0]):
            out.append(spec)
        elif isinstance(spec, HeadSplit):
            out.append(HeadSplit(tuple(m + CODES for m in spec.mcore), (spec.hf[0] + CODES,), spec.sizes))
            out += [Spec(m + s, (spec.hf[0] + s,), STACKED) for m in spec.mcore for s in SCALES]
        else:
            out.append(Spec(spec.mcore + CODES, tuple(h + CODES for h in spec.hf), spec.cut))
            out += [Spec(spec.mcore + s, tuple(h + s for h in spec.hf), STACKED) for s in SCALES]
    return out


def _check_nf4_cut(spec, codes: torch.Tensor, parts: int, rank: int) -> None:
    """An NF4 rank slice must be whole 64-value blocks of the flattened HF tensor (codes [rows, cols / 2])."""
    from npu_dsv3.lora.nf4_base import CODES, NF4Error, check_cut

    rows, width = codes.shape
    shape, what = (rows, 2 * width), spec.hf[0][: -len(CODES)]
    if rows == 1:  # an odd column count: the codes are one packed row (``nf4_base.hf_parts``)
        raise NF4Error(f"{what}: its column count is odd, so its NF4 codes pack two rows' values into a byte and "
                       f"it cannot be split over {parts} tensor-parallel ranks; use tensor-parallel size 1")
    if isinstance(spec, HeadSplit):
        per_head = sum(spec.sizes)
        heads = rows // per_head
        local = range(rank * heads // parts, (rank + 1) * heads // parts)
        check_cut(what, shape, [(h * per_head + o, h * per_head + o + size) for h in local
                                for o, size in zip([sum(spec.sizes[:k]) for k in range(len(spec.sizes))], spec.sizes)],
                  (0, shape[1]))
    elif spec.cut == COLS:
        per = shape[1] // parts
        check_cut(what, shape, [(0, rows)], (rank * per, (rank + 1) * per))
    elif spec.cut in (ROWS, GLU_ROWS):
        check_cut(what, shape, [(rank * rows // parts, (rank + 1) * rows // parts)], (0, shape[1]))


def shard(spec, sources: Sequence[torch.Tensor], parts: int, rank: int) -> List[torch.Tensor]:
    """This rank's piece of each of ``mcore_names(spec)`` (``parts`` ranks in its TP group)."""
    if parts > 1 and sources[0].dtype == torch.uint8 and spec.hf[0].endswith("_nf4"):
        _check_nf4_cut(spec, sources[0], parts, rank)
    if not isinstance(spec, HeadSplit) and spec.cut == STACKED:
        return [torch.cat(list(sources))]
    if isinstance(spec, HeadSplit):
        # Rows split by whole heads: the attention-head count is checked to divide over TP.
        pieces = zip(_head_parts(sources[0], spec.sizes), spec.mcore)
        return [_split(part, 0, parts, rank, name) for part, name in pieces]
    if spec.cut == REPLICATED:
        return [sources[0]]
    if spec.cut == ROWS:
        return [_split(sources[0], 0, parts, rank, spec.mcore)]
    if spec.cut == COLS:
        return [_split(sources[0], 1, parts, rank, spec.mcore)]
    gate, up = sources
    return [torch.cat([_split(gate, 0, parts, rank, spec.mcore), _split(up, 0, parts, rank, spec.mcore)])]


def merge(spec, pieces: Sequence[Sequence[torch.Tensor]]) -> List[torch.Tensor]:
    """The HF sources of ``spec`` (inverse of ``shard``); ``pieces[k]`` holds every rank's
    piece of ``mcore_names(spec)[k]``, in rank order."""
    if isinstance(spec, HeadSplit):
        heads = [torch.cat(ranks, 0).view(-1, size, ranks[0].shape[-1]) for ranks, size in zip(pieces, spec.sizes)]
        return [torch.cat(heads, 1).reshape(-1, heads[0].shape[-1])]
    pieces = pieces[0]
    if spec.cut == STACKED:
        return list(pieces[0].split(1))
    if spec.cut == REPLICATED:
        return [pieces[0]]
    if spec.cut == ROWS:
        return [torch.cat(pieces, 0)]
    if spec.cut == COLS:
        return [torch.cat(pieces, 1)]
    halves = [p.chunk(2, 0) for p in pieces]
    return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


# --------------------------------------------------------------------------- routed experts


def expert_fc1(gate: torch.Tensor, up: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    """One expert's [hidden, 2 * ffn / parts] slice of GroupedMLP's weight1 view."""
    return torch.cat([_split(gate, 0, parts, rank, "expert fc1"), _split(up, 0, parts, rank, "expert fc1")]).t()


def expert_fc2(down: torch.Tensor, parts: int, rank: int) -> torch.Tensor:
    """One expert's [ffn / parts, hidden] slice of GroupedMLP's weight2 view."""
    return _split(down, 1, parts, rank, "expert fc2").t()


def grouped_weights(fc1: Sequence[torch.Tensor], fc2: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """GroupedMLP's parameters from per-expert slices: weight1 [hidden, E * 2f], weight2 [E * f, hidden]."""
    w1 = torch.stack(list(fc1)).contiguous()
    w2 = torch.stack(list(fc2)).contiguous()
    return {"weight1": w1.view(w1.shape[1], -1), "weight2": w2.view(-1, w2.shape[-1])}


def split_grouped(weight1: torch.Tensor, weight2: torch.Tensor, num_local: int, hidden: int):
    """Inverse of ``grouped_weights``: per-expert fc1 [hidden, 2f] and fc2 [f, hidden] views."""
    return weight1.view(num_local, hidden, -1), weight2.view(num_local, -1, hidden)


def merge_expert(fc1_pieces: Sequence[torch.Tensor], fc2_pieces: Sequence[torch.Tensor]):
    """gate, up, down of one expert from its expert-TP slices (inverse of expert_fc1/expert_fc2); with one slice,
    views of it (HF's orientation is GroupedMLP's transposed: a copy would be a strided transpose per expert, the
    bulk of the RL bridge's export time)."""
    halves = [p.t().chunk(2, 0) for p in fc1_pieces]
    return _joined([h[0] for h in halves], 0), _joined([h[1] for h in halves], 0), \
        _joined([p.t() for p in fc2_pieces], 1)


def _joined(pieces: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim)

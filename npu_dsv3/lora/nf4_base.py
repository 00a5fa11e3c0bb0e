"""QLoRA's frozen base: every targetable linear holds its HF tensors in NF4 and dequantizes on the fly.

The unit of quantization is one HF tensor in HF orientation (``ops.nf4``, bitsandbytes' NF4 with
double-quantized scales): attention projections, dense and shared MLPs' gate, up and down, and each
routed expert's gate, up and down. Norms, router, expert bias, embeddings, the output layer and MTP's
``eh_proj`` stay as they are (transformers + bitsandbytes keep ``lm_head`` too).

Names. In HF space a quantized tensor ``W`` becomes four: ``W_nf4`` (the packed codes, [rows, cols / 2]
uint8 when cols is even, else one row), ``W_nf4_absmax`` [1, blocks] uint8, ``W_nf4_absmax2`` [1, blocks /
256] fp32 and ``W_nf4_offset`` [1, 1] fp32. In megatron's names a linear's ``weight`` becomes the buffers
``weight_nf4`` (its rows of the codes, cut as the weight is cut: ``npu_dsv3.checkpoint.sharding``) and the
scale buffers, one row per HF source (fc1: gate, up) and whole on every rank, so every layout holds the
same bytes. Routed experts hold ``gate_proj_nf4`` / ``up_proj_nf4`` ([local experts x rows, cols / 2]) and
``down_proj_nf4``, and their scales one row per local expert. A rank's slice must start and end on a
64-value block of the flattened HF tensor; ``check_cuts`` says which layout does not.

Compute. ``NF4Weight.dequantize`` rebuilds one linear's weight (fp32 level x scale, cast once, as
bitsandbytes does); ``nf4_linear`` runs the frozen GEMM dequantizing in the forward and again in the
backward, so no dequantized weight outlives its GEMM; routed experts dequantize their local experts per
GEMM (``NF4Experts``). The loss is then the loss of a LoRA run on the dequantized weights
(tests/unit/test_qlora.py, tests/multiprocess/test_qlora_layouts.py).
"""

import contextlib
import re
import threading
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from npu_dsv3.ops.nf4 import BLOCKSIZE, NF4, SCALE_BLOCKSIZE, nf4_dequantize, nf4_quantize, nf4_scales, nf4_values

CODES, ABSMAX, ABSMAX2, OFFSET = "_nf4", "_nf4_absmax", "_nf4_absmax2", "_nf4_offset"
SCALES = (ABSMAX, ABSMAX2, OFFSET)
SUFFIXES = (CODES,) + SCALES
EXPERT_PARTS = ("gate_proj", "up_proj", "down_proj")

_QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                        r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight")


class NF4Error(ValueError):
    """NF4 data that does not fit the model or layout."""


def is_quantized(hf_name: str) -> bool:
    """Whether ``--qlora-nf4`` stores this HF tensor in NF4."""
    return _QUANTIZED.fullmatch(hf_name) is not None


def split_name(name: str) -> Tuple[str, Optional[str]]:
    """(the quantized tensor's name, its NF4 suffix), or (name, None)."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None


# --------------------------------------------------------------------------- HF space

# config.json's entry, beside a megatron checkpoint, saying its targetable linears are NF4 (what
# ``convert hf2mcore --qlora-nf4`` writes; ``npu_dsv3.checkpoint.sources.model_config`` reads it).
NF4_KEY = "npu_dsv3_nf4"
NF4_RECORD = {"quant_type": "nf4", "blocksize": BLOCKSIZE, "double_quant": True, "scale_blocksize": SCALE_BLOCKSIZE,
              "quantized": "attention projections, dense and shared MLPs, routed experts",
              "kept": "norms, router, expert bias, embeddings, output layer, MTP eh_proj"}


def is_nf4_config(hf_config: dict) -> bool:
    return bool(hf_config.get(NF4_KEY))


def nf4_meta(meta: torch.Tensor, suffix: str) -> torch.Tensor:
    """The meta tensor (shape, dtype) of one NF4 part of the quantized tensor ``meta``."""
    rows, cols = meta.shape
    blocks = -(-(rows * cols) // BLOCKSIZE)
    shape = {CODES: (rows, cols // 2) if cols % 2 == 0 else (1, -(-(rows * cols) // 2)), ABSMAX: (1, blocks),
             ABSMAX2: (1, -(-blocks // SCALE_BLOCKSIZE)), OFFSET: (1, 1)}[suffix]
    return torch.empty(shape, dtype=torch.uint8 if suffix in (CODES, ABSMAX) else torch.float32, device="meta")


def quantized_meta(meta_get: Callable[[str], torch.Tensor], shapes: Dict[str, Sequence[int]]):
    """``meta_get`` of an NF4 checkpoint's HF-space tensors, also answering the quantized tensors' own names
    (fp32 meta tensors of their HF shapes; a dtype record gives their HF dtype)."""
    def get(name: str) -> torch.Tensor:
        if is_quantized(name):
            return torch.empty(shapes[name], dtype=torch.float32, device="meta")
        return meta_get(name)

    return get


def quantizing_meta_getter(meta_get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        base, suffix = split_name(name)
        return meta_get(name) if suffix is None else nf4_meta(meta_get(base), suffix)

    return get


def hf_parts(q: NF4) -> Dict[str, torch.Tensor]:
    """One quantized HF tensor as its four HF-space tensors (by suffix)."""
    rows, cols = q.shape
    codes = q.codes.view(rows, cols // 2) if cols % 2 == 0 else q.codes.view(1, -1)
    return {CODES: codes, ABSMAX: q.absmax.view(1, -1), ABSMAX2: q.absmax2.view(1, -1), OFFSET: q.offset.view(1, 1)}


def from_parts(parts: Dict[str, torch.Tensor], shape: Sequence[int], dtype: torch.dtype) -> NF4:
    return NF4(parts[CODES].reshape(-1), parts[ABSMAX].reshape(-1), parts[ABSMAX2].reshape(-1),
               parts[OFFSET].reshape(()), tuple(shape), dtype)


def quantizing_getter(get: Callable[[str], torch.Tensor], keep: int = 8) -> Callable[[str], torch.Tensor]:
    """``get`` with the NF4 names of quantized tensors answered by quantizing them (the last ``keep``
    quantized tensors cached: the writers ask for a tensor's codes and scales together, ``rank_state`` and
    ``mcore_dist.plan_pieces`` order them so)."""
    cache: "OrderedDict[str, Dict[str, torch.Tensor]]" = OrderedDict()
    lock = threading.Lock()

    def get_nf4(name: str) -> torch.Tensor:
        base, suffix = split_name(name)
        if suffix is None:
            return get(name)
        with lock:
            parts = cache.get(base)
        if parts is None:  # quantized outside the lock: writer threads quantize different tensors at once
            parts = hf_parts(nf4_quantize(get(base), what=base))
        with lock:
            cache[base] = parts
            cache.move_to_end(base)
            while len(cache) > keep:
                cache.popitem(last=False)
        return parts[suffix]

    return get_nf4


class Dequantized:
    """An NF4 checkpoint's HF tensors (``names()``, ``get(name)``) with each quantized one dequantized from its
    NF4 parts in ``source`` (computed in fp32, given in ``dtype``; lossy: NF4's levels, not the original
    weights). ``shapes``: HF name -> shape; ``meta``: give meta tensors (a writer's plan) instead of values."""

    def __init__(self, source, shapes: Dict[str, Sequence[int]], dtype: torch.dtype, meta: bool = False):
        self.source, self.shapes, self.dtype, self.meta = source, shapes, dtype, meta

    def names(self) -> List[str]:
        out = []
        for name in self.source.names():
            base, suffix = split_name(name)
            if suffix is None or (suffix == CODES and is_quantized(base)):
                out.append(base)
        return out

    def get(self, name: str) -> torch.Tensor:
        if not is_quantized(name):
            return self.source.get(name)
        if self.meta:
            return torch.empty(self.shapes[name], dtype=self.dtype, device="meta")
        parts = {suffix: self.source.get(name + suffix) for suffix in SUFFIXES}
        return nf4_dequantize(from_parts(parts, self.shapes[name], self.dtype))


# --------------------------------------------------------------------------- cuts


def check_cut(what: str, shape: Sequence[int], rows: Sequence[Tuple[int, int]], cols: Tuple[int, int]) -> None:
    """A rank's slice (HF row ranges x one column range) must be whole 64-value blocks of the flat tensor."""
    r, c = shape
    if cols != (0, c):
        if c % BLOCKSIZE or cols[0] % BLOCKSIZE or cols[1] % BLOCKSIZE:
            raise NF4Error(f"{what} [{r}, {c}]: this layout gives a rank its columns {cols[0]}:{cols[1]}, which do "
                           f"not start and end on a {BLOCKSIZE}-value NF4 block of each row; use a tensor-parallel "
                           f"size that splits the columns into multiples of {BLOCKSIZE}")
        return
    for r0, r1 in rows:
        for edge in (r0, r1):
            if (edge * c) % BLOCKSIZE and edge != r:
                raise NF4Error(f"{what} [{r}, {c}]: this layout cuts it after row {edge}, value {edge * c} of the "
                               f"flattened tensor, which is not on a {BLOCKSIZE}-value NF4 block boundary; use a "
                               f"tensor-parallel size whose slices hold a multiple of {BLOCKSIZE} values")
        if c % 2 and (r0, r1) != (0, r):
            raise NF4Error(f"{what} [{r}, {c}]: an odd column count packs two rows' codes into one byte, so the "
                           "tensor cannot be split by rows; use tensor-parallel size 1 for it")


def _selected_scales(scales: torch.Tensor, shape, rows, cols) -> torch.Tensor:
    """The fp32 scales of a selection's blocks, in order ([..., blocks] -> [..., selected blocks])."""
    r, c = shape
    if cols != (0, c):
        per_row = scales.view(*scales.shape[:-1], r, c // BLOCKSIZE)
        return per_row[..., cols[0] // BLOCKSIZE: cols[1] // BLOCKSIZE].reshape(*scales.shape[:-1], -1)
    runs = [scales[..., r0 * c // BLOCKSIZE: -(-(r1 * c) // BLOCKSIZE)] for r0, r1 in rows]
    return runs[0] if len(runs) == 1 else torch.cat(runs, dim=-1)


def dequantize_selection(codes: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
                         shape: Sequence[int], rows, cols, dtype: torch.dtype) -> torch.Tensor:
    """The selected rows x cols of HF tensor(s) ``shape`` from their codes ([..., bytes]) and their whole
    scales ([..., blocks]), as [..., selected rows, selected cols] in ``dtype``."""
    selected = _selected_scales(nf4_scales(absmax, absmax2, offset), shape, rows, cols)
    n_rows = sum(r1 - r0 for r0, r1 in rows)
    values = nf4_values(codes, selected, n_rows * (cols[1] - cols[0]))
    return values.to(dtype).view(*codes.shape[:-1], n_rows, cols[1] - cols[0])


# --------------------------------------------------------------------------- the model


class NF4Weight:
    """Stands where megatron and the LoRA layers read a quantized linear's ``weight``: its dtype, device and
    shape, no data; ``dequantize()`` builds it."""

    requires_grad = False

    def __init__(self, module):
        self.module = module

    @property
    def dtype(self) -> torch.dtype:
        return self.module.nf4_dtype

    @property
    def device(self) -> torch.device:
        return next(b.device for n, b in self.module._buffers.items() if n.endswith(CODES))

    @property
    def shape(self) -> torch.Size:
        return self.module.nf4_shape

    @property
    def allreduce(self) -> bool:  # megatron's mark on expert weights, which the adapters copy
        return getattr(self.module, "nf4_allreduce", True)

    def dequantize(self) -> torch.Tensor:
        return self.module.nf4_dequantize()


class _NF4Linear(torch.autograd.Function):
    """``x @ W^T`` with W dequantized in the forward and again in the backward (nothing of it is saved),
    megatron's frozen-weight linear otherwise (no weight gradient; the input gradient all-reduced when asked)."""

    @staticmethod
    def forward(ctx, x, module, allreduce_dgrad, tp_group):
        ctx.module, ctx.allreduce_dgrad, ctx.tp_group = module, allreduce_dgrad, tp_group
        return torch.matmul(x, module.nf4_dequantize().t())

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.matmul(ctx.module.nf4_dequantize())
        if ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_in, group=ctx.tp_group)
        return grad_in, None, None, None


def nf4_linear(x: torch.Tensor, module, allreduce_dgrad: bool = False, tp_group=None) -> torch.Tensor:
    return _NF4Linear.apply(x, module, allreduce_dgrad, tp_group)


class _KeepScalesFp32:
    """``model.bfloat16()`` (megatron's Float16Module) casts floating buffers; the fp32 scales must stay exact."""

    def _apply(self, fn, recurse=True):
        kept = {n: b for n, b in self._buffers.items() if b is not None and n.endswith((ABSMAX2, OFFSET))}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            self._buffers[name] = before.to(self._buffers[name].device)
        return out


def _register(module, prefix: str, codes_shape, sources: int, blocks: int, device) -> None:
    module.register_buffer(prefix + CODES, torch.zeros(codes_shape, dtype=torch.uint8, device=device))
    module.register_buffer(prefix + ABSMAX, torch.zeros(sources, blocks, dtype=torch.uint8, device=device))
    module.register_buffer(prefix + ABSMAX2, torch.zeros(sources, -(-blocks // SCALE_BLOCKSIZE), dtype=torch.float32,
                                                         device=device))
    module.register_buffer(prefix + OFFSET, torch.zeros(sources, 1, dtype=torch.float32, device=device))


def _codes_shape(shape, rows, cols) -> Tuple[int, int]:
    r, c = shape
    n_rows, width = sum(r1 - r0 for r0, r1 in rows), cols[1] - cols[0]
    return (n_rows, width // 2) if c % 2 == 0 else (1, -(-(r * c) // 2))


class NF4Linear(_KeepScalesFp32):
    """Mixed into a megatron linear (column- or row-parallel) whose weight is ``sources``: per HF source its
    shape and this rank's rows and columns. The codes' rows are the sources' in turn (fc1: [gate_t; up_t])."""

    def _nf4_setup(self, what: str, sources: List[Tuple[Tuple[int, int], list, Tuple[int, int]]],
                   axis: Optional[int] = None) -> None:
        """``axis``: the codes' tensor-parallel axis in checkpoints (0 column-, 1 row-parallel, None whole)."""
        self.nf4_axis = axis
        for shape, rows, cols in sources:
            check_cut(what, shape, rows, cols)
        weight = self._parameters.pop("weight")
        self.nf4_dtype, self.nf4_shape, self.nf4_sources = weight.dtype, weight.shape, sources
        shapes = [_codes_shape(*s) for s in sources]
        codes_shape = (sum(s[0] for s in shapes), shapes[0][1])
        shape = sources[0][0]
        _register(self, "weight", codes_shape, len(sources), -(-(shape[0] * shape[1]) // BLOCKSIZE), weight.device)

    @property
    def weight(self):
        return NF4Weight(self)

    def nf4_dequantize(self) -> torch.Tensor:
        out, start = [], 0
        for s, (shape, rows, cols) in enumerate(self.nf4_sources):
            n = _codes_shape(shape, rows, cols)[0]
            codes = self.weight_nf4[start:start + n].reshape(-1)
            start += n
            out.append(dequantize_selection(codes, self.weight_nf4_absmax[s], self.weight_nf4_absmax2[s],
                                            self.weight_nf4_offset[s], shape, rows, cols, self.nf4_dtype))
        return out[0] if len(out) == 1 else torch.cat(out)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base linear's entries, with the codes cut like its weight (fc1's as [gate; up], megatron's GLU
        factory) and the scales one entry per HF source, whole on every tensor-parallel rank."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.nf4_axis is not None:
            key = f"{prefix}weight{CODES}"
            out.update(make_sharded_tensors_for_checkpoint(
                {f"weight{CODES}": self.weight_nf4}, prefix, {f"weight{CODES}": self.nf4_axis}, sharded_offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]))
            if len(self.nf4_sources) == 2:
                out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets)
        if len(self.nf4_sources) > 1:
            for suffix in SCALES:
                out[f"{prefix}weight{suffix}"] = _rows_factory(out[f"{prefix}weight{suffix}"], sharded_offsets)
        return out

    def _forward_impl(self, input, weight, bias=None, gradient_accumulation_fusion=False, allreduce_dgrad=False,
                      sequence_parallel=False, tp_group=None, **_unused):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if sequence_parallel:
            input = gather_from_sequence_parallel_region(input, tensor_parallel_output_grad=True, group=tp_group)
        out = nf4_linear(input, self, allreduce_dgrad, tp_group)
        return out + bias if bias is not None else out


def _rows_factory(entry, sharded_offsets):
    """A replicated [sources, n] entry stored as one [1, n] piece per source (each piece one HF tensor's)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    axis = len(sharded_offsets)

    def build(key, t, replica_id, flattened_range):
        return [ShardedTensor.from_rank_offsets(key, t[i:i + 1], *sharded_offsets, (axis, i, t.shape[0]),
                                                replica_id=replica_id, prepend_axis_num=axis)
                for i in range(t.shape[0])]

    return ShardedTensorFactory(entry.key, entry.data, build, torch.cat, entry.replica_id)


class NF4Duplicated(NF4Linear):
    """``DuplicatedLinear`` (MLA's down-projections, whole on every rank)."""

    def forward(self, x):
        return nf4_linear(x, self), None


class NF4Experts(_KeepScalesFp32):
    """``GroupedExperts`` with each local expert's gate, up and down in NF4; the grouped GEMMs dequantize
    every local expert of the layer at once (``ops.gmm`` over the dequantized [E, in, out] weights)."""

    def _nf4_setup(self, hidden: int, ffn: int, etp: int, etp_rank: int) -> None:
        gate_rows = [(etp_rank * ffn // etp, (etp_rank + 1) * ffn // etp)]
        down_cols = (etp_rank * ffn // etp, (etp_rank + 1) * ffn // etp)
        self.nf4_parts = {"gate_proj": ((ffn, hidden), gate_rows, (0, hidden)),
                          "up_proj": ((ffn, hidden), gate_rows, (0, hidden)),
                          "down_proj": ((hidden, ffn), [(0, hidden)], down_cols)}
        like = self._parameters.pop("weight1")
        self._parameters.pop("weight2")
        self.nf4_dtype, self.nf4_shape = like.dtype, like.shape
        self.nf4_allreduce = getattr(like, "allreduce", True)
        e = self.num_local_experts
        for part, (shape, rows, cols) in self.nf4_parts.items():
            check_cut(f"routed expert {part}", shape, rows, cols)
            r, w = _codes_shape(shape, rows, cols)
            blocks = -(-(shape[0] * shape[1]) // BLOCKSIZE)
            _register(self, part, (e * r, w), e, blocks, like.device)

    @property
    def weight1(self):
        return NF4Weight(self)  # LoRA reads its dtype and device

    def nf4_part(self, part: str) -> torch.Tensor:
        """[local experts, rows, cols] of one part, in HF orientation."""
        shape, rows, cols = self.nf4_parts[part]
        codes = getattr(self, part + CODES)
        return dequantize_selection(codes.view(self.num_local_experts, -1), getattr(self, part + ABSMAX),
                                    getattr(self, part + ABSMAX2), getattr(self, part + OFFSET), shape, rows, cols,
                                    self.nf4_dtype)

    def nf4_fc1(self) -> torch.Tensor:
        """[E, hidden, 2 ffn_t]: GroupedMLP's weight1 view."""
        return torch.cat([self.nf4_part("gate_proj"), self.nf4_part("up_proj")], dim=1).transpose(1, 2)

    def nf4_fc2(self) -> torch.Tensor:
        """[E, ffn_t, hidden]: GroupedMLP's weight2 view."""
        return self.nf4_part("down_proj").transpose(1, 2)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """One entry per part and NF4 tensor, a piece per local expert (the converter writes whole HF tensors):
        codes [experts, rows, cols / 2] cut by expert-TP like the weights, scales [experts, n] whole on every
        expert-TP rank."""
        from megatron.core.dist_checkpointing import ShardedTensor

        ep_rank, ep = self.ep_group.rank(), self.ep_group.size()
        etp_rank, etp, dp_rank = self.tp_group.rank(), self.tp_group.size(), self.dp_group.rank()
        e_local, axis = self.num_local_experts, len(sharded_offsets)
        total = ep * e_local
        out = {}
        for part, (shape, rows, cols) in self.nf4_parts.items():
            key = f"{prefix}{part}{CODES}"
            codes = getattr(self, part + CODES).view(e_local, -1, getattr(self, part + CODES).shape[-1])
            split = (axis + 2, etp_rank, etp) if part == "down_proj" else (axis + 1, etp_rank, etp)
            out[key] = [ShardedTensor.from_rank_offsets(key, codes[e], *sharded_offsets, (axis, ep_rank * e_local + e,
                                                        total), split, replica_id=(0, 0, dp_rank),
                                                        prepend_axis_num=axis + 1) for e in range(e_local)]
            for suffix in SCALES:
                key = f"{prefix}{part}{suffix}"
                scales = getattr(self, part + suffix)
                out[key] = [ShardedTensor.from_rank_offsets(key, scales[e:e + 1], *sharded_offsets,
                                                            (axis, ep_rank * e_local + e, total),
                                                            replica_id=(0, etp_rank, dp_rank), prepend_axis_num=axis)
                            for e in range(e_local)]
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a distributed load gives each entry as its list of per-expert pieces
        for name in list(self._buffers):
            value = state_dict.get(prefix + name)
            if isinstance(value, list):
                state_dict[prefix + name] = torch.cat([v.reshape(-1, v.shape[-1]) for v in value])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _fc1(self, x, tokens_per_expert):
        return _NF4GroupedGemm.apply(x, tokens_per_expert, self.nf4_fc1)

    def _fc2(self, x, tokens_per_expert):
        return _NF4GroupedGemm.apply(x, tokens_per_expert, self.nf4_fc2)


class _NF4GroupedGemm(torch.autograd.Function):
    """``ops.gmm`` against experts' weights dequantized in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, tokens_per_expert, build):
        from npu_dsv3.ops.gmm import gmm

        ctx.build, ctx.tokens = build, tokens_per_expert
        with torch.no_grad():
            return gmm(x, build(), tokens_per_expert)

    @staticmethod
    def backward(ctx, grad_out):
        from npu_dsv3.ops.gmm import gmm

        with torch.no_grad():
            return gmm(grad_out.contiguous(), ctx.build().transpose(1, 2), ctx.tokens), None, None


_CLASSES: Dict[Tuple[type, type], type] = {}


def _swap(module, mixin: type) -> None:
    key = (type(module), mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"NF4{key[0].__name__}", (mixin, key[0]), {"__module__": __name__})
    module.__class__ = _CLASSES[key]


def _column_rows(module, rows_total: int):
    tp, rank = module.tp_group.size(), module.tp_group.rank()
    per = rows_total // tp
    return [(rank * per, (rank + 1) * per)]


def _quantize_linear(module, target: str, what: str, config) -> None:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from npu_dsv3.model.attention import HeadConcat
    from npu_dsv3.model.linear import DuplicatedLinear

    if isinstance(module, HeadConcat):  # --mla-mm-split: each part holds its rows of every head of the HF tensor
        sizes = [part.output_size_per_partition // module.heads for part in module._parts]
        heads, per_head = config.num_attention_heads, sum(sizes)
        tp, rank = module._parts[0].tp_group.size(), module._parts[0].tp_group.rank()
        local = range(rank * heads // tp, (rank + 1) * heads // tp)
        start = 0
        for part, size in zip(module._parts, sizes):
            shape = (heads * per_head, part.input_size)
            rows = [(h * per_head + start, h * per_head + start + size) for h in local]
            _swap(part, NF4Linear)
            part._nf4_setup(what, [(shape, rows, (0, shape[1]))], axis=0)
            start += size
        return
    if isinstance(module, DuplicatedLinear):
        shape = (module.out_features, module.in_features)
        _swap(module, NF4Duplicated)
        module._nf4_setup(what, [(shape, [(0, shape[0])], (0, shape[1]))])
    elif isinstance(module, ColumnParallelLinear):
        rows = module.output_size_per_partition * module.tp_group.size()
        glu = target.endswith("linear_fc1")
        shape = (rows // 2 if glu else rows, module.input_size)
        sel = (shape, _column_rows(module, shape[0]), (0, shape[1]))
        _swap(module, NF4Linear)
        module._nf4_setup(what, [sel, sel] if glu else [sel], axis=0)
    elif isinstance(module, RowParallelLinear):
        tp, rank = module.tp_group.size(), module.tp_group.rank()
        shape = (module.output_size, module.input_size)
        per = shape[1] // tp
        _swap(module, NF4Linear)
        module._nf4_setup(what, [(shape, [(0, shape[0])], (rank * per, (rank + 1) * per))], axis=1)
    else:
        raise TypeError(f"--qlora cannot quantize {what}: {type(module).__name__} is not a megatron linear")


def apply_nf4_base(model, config) -> None:
    """Replaces the weights of the model chunk's targetable linears by NF4 buffers (filled by a checkpoint)."""
    from megatron.core import parallel_state

    from npu_dsv3.lora.layers import _layers, linear_targets
    from npu_dsv3.model.experts import GroupedExperts

    for hf_layer, layer in _layers(model):
        for target, module in linear_targets(layer):
            what = f"layer {hf_layer} {target}"
            if target != "experts":
                _quantize_linear(module, target, what, config)
                continue
            if not isinstance(module, GroupedExperts):
                raise ValueError("--qlora dequantizes routed experts into grouped GEMMs: add --moe-grouped-gemm")
            _swap(module, NF4Experts)
            module._nf4_setup(config.hidden_size, config.moe_ffn_hidden_size,
                              parallel_state.get_expert_tensor_parallel_world_size(),
                              parallel_state.get_expert_tensor_parallel_rank())


def check_nf4_buffers(model, source: str) -> None:
    """After a load: every NF4 scale finite and its second-level absmax non-negative, else the checkpoint
    ``source`` is corrupt (a bad scale would silently give a whole block garbage weights)."""
    for name, buf in model.named_buffers():
        if name.endswith((ABSMAX2, OFFSET)) and not bool(torch.isfinite(buf).all() and (buf >= 0).all()
                                                         if name.endswith(ABSMAX2) else torch.isfinite(buf).all()):
            raise NF4Error(f"{source}: the NF4 scales {name} hold inf, NaN or a negative absmax: the checkpoint is "
                           "corrupt; convert it again with --qlora-nf4")


_PLAIN: Dict[type, type] = {}


def _plain_class(cls: type) -> type:
    """``cls`` without the NF4 mixin: ``NF4X(mixin, X)`` -> ``X``; an adapted ``LoraNF4X(lora, NF4X)`` ->
    ``LoraX(lora, X)``."""
    if cls.__bases__[0] in (NF4Linear, NF4Duplicated, NF4Experts):
        return cls.__bases__[1]
    if cls not in _PLAIN:
        bases = tuple(_plain_class(b) if issubclass(b, (NF4Linear, NF4Experts)) else b for b in cls.__bases__)
        _PLAIN[cls] = type(cls.__name__.replace("NF4", ""), bases, {"__module__": cls.__module__})
    return _PLAIN[cls]


def _weights(module) -> Dict[str, Callable[[], torch.Tensor]]:
    """An NF4 module's unquantized weights by parameter name, each a function that dequantizes it."""
    if isinstance(module, NF4Experts):
        hidden = module.config.hidden_size
        return {"weight1": lambda: module.nf4_fc1().contiguous().view(hidden, -1),
                "weight2": lambda: module.nf4_fc2().contiguous().view(-1, hidden)}
    return {"weight": module.nf4_dequantize}


def dequantizers(model) -> Dict[str, Callable[[], torch.Tensor]]:
    """The unquantized model's state-dict key of each NF4 weight -> a function that dequantizes it (the model's
    dtype), for readers that take one weight at a time (the RL bridge's export)."""
    return {f"{prefix}.{name}" if prefix else name: dequantize for prefix, module in model.named_modules()
            if isinstance(module, (NF4Linear, NF4Experts)) for name, dequantize in _weights(module).items()}


def is_nf4_buffer(key: str) -> bool:
    return split_name(key)[1] is not None


@contextlib.contextmanager
def dequantized(model):
    """Within: the model's NF4 modules are the unquantized model's -- their classes without the NF4 mixin, their
    weights dequantized (the model's dtype) as frozen parameters, the NF4 buffers set aside -- so its
    ``state_dict`` and ``sharded_state_dict`` are a LoRA model's (``--qlora-save-dequantize``, either format).
    Every NF4 weight is dequantized at once while inside."""
    swapped = []
    for module in model.modules():
        if not isinstance(module, (NF4Linear, NF4Experts)):
            continue
        weights = {name: dequantize() for name, dequantize in _weights(module).items()}
        buffers = {n: module._buffers.pop(n) for n in list(module._buffers) if is_nf4_buffer(n)}
        cls = module.__class__
        module.__class__ = _plain_class(cls)
        for name, value in weights.items():
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        swapped.append((module, cls, buffers, list(weights)))
    try:
        yield model
    finally:
        for module, cls, buffers, names in swapped:
            for name in names:
                del module._parameters[name]
            module._buffers.update(buffers)
            module.__class__ = cls

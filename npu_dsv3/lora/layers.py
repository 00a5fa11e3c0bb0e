"""The LoRA model transform: adapters on megatron's linears and on the grouped routed experts.

``apply_lora(model, config)`` freezes every base parameter and gives each targeted linear (the
``lora_targets`` of the config, ``npu_dsv3.lora.targets``) a low-rank update ``y += (alpha / r) B A x``.
The module keeps its class's behaviour and names: its class becomes a subclass that adds ``lora_A`` /
``lora_B`` beside ``weight``, so the base checkpoint keys do not move.

Tensor parallelism follows the base layer:

- column-parallel (MLA's up-projections, dense and shared fc1, the output layer): A whole on every rank,
  B split by output rows like the weight (fc1's rows as [gate; up] per rank). Under sequence parallelism
  the adapter reads the base layer's one gathered input (no collective of its own) and A's gradient, a
  partial sum over the ranks' B rows, is summed with the norms' (``sequence_parallel``); without it ``A x``
  (r wide) has its gradient all-reduced, so A's gradient is whole on every rank.
- row-parallel (``linear_proj``, dense and shared fc2): A split by input columns, B whole. ``A x`` is a
  partial sum reduced (all-reduce, or reduce-scatter under sequence parallelism) before B; with
  ``lora_fusion`` the LoRA partial output joins the base's partial output before its one reduction, and
  B's gradient, a partial sum then, is summed over the tensor-parallel ranks with the others at the
  end of the step (``average_gradients_across_tp_domain`` on a gradient scaled by the group size).
- duplicated (MLA's down-projections, whole on every rank): A and B whole, their gradients summed over
  the sequence shards like the weight's.
- routed experts (``GroupedExperts``): per local expert an fc1 pair (gate and up share A) and an fc2
  pair, through ``ops.gmm`` like the base GEMMs (no loop over experts; zero-token experts get zero
  gradients; the dualpipev weight-gradient deferral applies to them as to the base). With expert-TP > 1
  fc1's B and fc2's A split like the weights, and the gradients of the pieces held whole (fc1's A, fc2's
  B), partial sums over the expert-TP ranks, are all-reduced in the backward; the token gradients stay
  partial, as the base's, for the dispatcher to sum.

Initialisation does not depend on the layout: A as PEFT draws it (kaiming-uniform, bound 1/sqrt(in)) from
a generator seeded by ``lora_seed`` and the adapter's HF name (per expert for routed experts), drawn whole
and sliced; B zero. The frozen base GEMMs skip their weight gradients (megatron's frozen-weight linear,
``ops.gmm``'s ``needs_input_grad``).
"""

import math
import zlib
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                    gather_from_sequence_parallel_region,
                                                    gather_from_tensor_model_parallel_region,
                                                    reduce_from_tensor_model_parallel_region,
                                                    reduce_scatter_to_sequence_parallel_region)
from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from npu_dsv3.lora.targets import ATTENTION, OUTPUT_LAYER
from npu_dsv3.model.attention import HeadConcat
from npu_dsv3.model.experts import GroupedExperts
from npu_dsv3.model.linear import DuplicatedLinear
from npu_dsv3.ops.gmm import gmm

# --------------------------------------------------------------------------- initialisation


def _generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (1 << 63))


def init_a(seed: int, key: str, r: int, fan_in: int) -> torch.Tensor:
    """A [r, fan_in] as PEFT's kaiming_uniform_(a=sqrt(5)) draws it (bound 1/sqrt(fan_in)), from its own seed."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(r, fan_in).uniform_(-bound, bound, generator=_generator(seed, key))


def _param(value: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.nn.Parameter:
    if like.device.type == "meta":
        return torch.nn.Parameter(torch.empty(value.shape, dtype=dtype, device="meta"))
    return torch.nn.Parameter(value.to(device=like.device, dtype=dtype).contiguous())


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` (a sum over the group, made by an average)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


# --------------------------------------------------------------------------- linear adapters


class _LoraLinear:
    """Mixed into the class of a targeted linear (first in the MRO)."""

    lora_kind: str  # "column", "row" or "duplicated"

    def _lora_setup(self, r: int, scale: float, dropout: float, fusion: bool, a: torch.Tensor,
                    out_rows: int, sequence_parallel: bool, tp: int, glu: bool = False) -> None:
        dtype = self.weight.dtype
        self.lora_scale, self.lora_dropout, self.lora_fusion, self.lora_tp = scale, dropout, fusion, tp
        self.lora_glu = glu
        self.lora_A = _param(a, self.weight, dtype)
        self.lora_B = _param(torch.zeros(out_rows, r), self.weight, dtype)
        if self.lora_kind == "column":
            set_tensor_model_parallel_attributes(self.lora_B, True, 0, 1)
            self.lora_A.sequence_parallel = sequence_parallel
        elif self.lora_kind == "row":
            set_tensor_model_parallel_attributes(self.lora_A, True, 1, 1)
            if fusion and tp > 1:
                self.lora_B.average_gradients_across_tp_domain = True
            else:
                self.lora_B.sequence_parallel = sequence_parallel
        else:
            self.lora_A.sequence_parallel = self.lora_B.sequence_parallel = sequence_parallel

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x


class _LoraColumn(_LoraLinear):
    lora_kind = "column"

    def forward(self, input_, weight=None, runtime_gather_output=None):
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if self.sequence_parallel:
            # One gather of the sequence-split input serves the frozen GEMM and the adapter; its backward
            # reduce-scatters their summed input gradient once.
            x = gather_from_sequence_parallel_region(input_, group=self.tp_group)
            out = self._forward_impl(input=x, weight=self.weight if weight is None else weight,
                                     bias=None if self.skip_bias_add else self.bias,
                                     gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                     allreduce_dgrad=False, sequence_parallel=False, grad_output_buffer=None,
                                     tp_group=self.tp_group)
            bias = self.bias if self.skip_bias_add else None
            h = F.linear(self._lora_input(x), self.lora_A)
        else:
            out, bias = super().forward(input_, weight=weight, runtime_gather_output=False)
            h = F.linear(self._lora_input(input_), self.lora_A)
            if self.lora_tp > 1:
                h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        out = out + F.linear(h, self.lora_B) * self.lora_scale
        if gather:
            out = gather_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # the base layer's (QLoRA's NF4 too)
        out.update(_lora_entries(self, prefix, {"lora_B": 0}, sharded_offsets, metadata))
        if self.lora_glu:  # B's rows are [gate; up] per rank, stored as the whole [gate; up] like the weight
            out[f"{prefix}lora_B"] = apply_swiglu_sharded_factory(out[f"{prefix}lora_B"], sharded_offsets)
        return out


class _LoraRow(_LoraLinear):
    lora_kind = "row"

    def forward(self, input_):
        if not self.lora_fusion:
            out, bias = super().forward(input_)
            h = F.linear(self._lora_input(input_), self.lora_A)
            if self.sequence_parallel:
                h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
            elif self.lora_tp > 1:
                h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
            return out + F.linear(h, self.lora_B) * self.lora_scale, bias
        return self._fused_forward(input_)

    def _fused_forward(self, input_):
        """megatron's RowParallelLinear.forward with the LoRA partial output added before its one reduction."""
        if not self.input_is_parallel:
            raise ValueError("--lora-fusion needs a row-parallel linear whose input is already split")
        partial = self._forward_impl(input=input_, weight=self.weight, bias=None,
                                     gradient_accumulation_fusion=self.gradient_accumulation_fusion,
                                     allreduce_dgrad=False, sequence_parallel=False, tp_group=None,
                                     grad_output_buffer=None)
        b = _ScaleGrad.apply(self.lora_B, self.lora_tp) if self.lora_tp > 1 else self.lora_B
        partial = partial + F.linear(F.linear(self._lora_input(input_), self.lora_A), b) * self.lora_scale
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
        if not self.skip_bias_add:
            return (out + self.bias if self.bias is not None else out), None
        return out, self.bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        out.update(_lora_entries(self, prefix, {"lora_A": 1}, sharded_offsets, metadata))
        return out


def _lora_entries(module, prefix: str, axes: Dict[str, int], sharded_offsets, metadata) -> dict:
    """The adapters' checkpoint entries: split along ``axes`` over the tensor-parallel group, else whole."""
    return make_sharded_tensors_for_checkpoint({"lora_A": module.lora_A, "lora_B": module.lora_B}, prefix, axes,
                                               sharded_offsets, tp_group=module.tp_group,
                                               dp_cp_group=metadata["dp_cp_group"])


class _LoraHeadConcat(_LoraLinear):
    """``--mla-mm-split``'s up-projection (its parts' outputs per head side by side, ``HeadConcat``) adapted as
    the unsplit column-parallel linear it stands for: one A, B's rows in the unsplit order of this rank's
    heads, so the adapter, its names and checkpoints are those of the unsplit model. ``A x`` (r wide) is
    gathered along the sequence under sequence parallelism (the parts gather their input each)."""

    lora_kind = "column"

    @property
    def tp_group(self):
        return self._parts[0].tp_group

    @property
    def weight(self):  # dtype and device for the adapters
        return self._parts[0].weight

    def forward(self, x):
        out, bias = super().forward(x)
        h = F.linear(self._lora_input(x), self.lora_A)
        if self._parts[0].sequence_parallel:
            h = gather_from_sequence_parallel_region(h, group=self.tp_group)
        elif self.lora_tp > 1:
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        return out + F.linear(h, self.lora_B) * self.lora_scale, bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return _lora_entries(self, prefix, {"lora_B": 0}, sharded_offsets, metadata)  # the parts are the attention's


class _LoraDuplicated(_LoraLinear):
    lora_kind = "duplicated"

    def forward(self, x):
        out, bias = super().forward(x)
        lora = F.linear(F.linear(self._lora_input(x), self.lora_A), self.lora_B) * self.lora_scale
        return out + lora, bias


# --------------------------------------------------------------------------- routed experts


class _LoraExperts:
    """GroupedExperts with per-expert adapters on fc1 and/or fc2, as grouped GEMMs."""

    def _lora_setup(self, r: int, scale: float, fc1: Optional[Tuple[torch.Tensor, int]],
                    fc2: Optional[Tuple[torch.Tensor, int]], etp: int, etp_group) -> None:
        """``fc1`` / ``fc2``: (A [experts, r, in] whole per local expert, B's output rows here)."""
        dtype, like = self.weight1.dtype, self.weight1
        self.lora_scale, self.lora_etp, self.lora_etp_group = scale, etp, etp_group
        self.lora_on = (fc1 is not None, fc2 is not None)
        allreduce = getattr(self.weight1, "allreduce", True)
        made = []
        if fc1 is not None:
            a, rows = fc1  # A shared by gate and up; B [experts, r, 2I/etp] as weight1's [gate; up] columns
            self.lora_fc1_A = _param(a.transpose(1, 2), like, dtype)
            self.lora_fc1_B = _param(torch.zeros(a.shape[0], r, rows), like, dtype)
            made += [self.lora_fc1_A, self.lora_fc1_B]
        if fc2 is not None:
            a, rows = fc2  # A [experts, r, I/etp] sliced by the caller; B [experts, r, hidden]
            self.lora_fc2_A = _param(a.transpose(1, 2), like, dtype)
            self.lora_fc2_B = _param(torch.zeros(a.shape[0], r, rows), like, dtype)
            made += [self.lora_fc2_A, self.lora_fc2_B]
        for p in made:
            p.allreduce = allreduce
        # megatron counts a parameter in the grad norm on every tensor-parallel rank when it is split
        # (``tensor_model_parallel``), else on TP rank 0 only: as the base expert weights are, except the
        # pieces held whole on every expert-TP rank (fc1's A, fc2's B).
        split = [(getattr(self, "lora_fc1_B", None), 2), (getattr(self, "lora_fc2_A", None), 1)]
        whole = [(getattr(self, "lora_fc1_A", None), 1), (getattr(self, "lora_fc2_B", None), 2)]
        for p, dim in split + (whole if etp == 1 else []):
            if p is not None:
                set_tensor_model_parallel_attributes(p, True, dim, 1)

    def _lora_fc1(self, x, tokens_per_expert):
        a = self.lora_fc1_A
        if self.lora_etp > 1:
            # Every expert-TP rank holds the same tokens and its own rows of B, so each one's gradient of A
            # (and of the tokens, which the dispatcher sums) is a partial sum: A's is summed here.
            a = copy_to_tensor_model_parallel_region(a, group=self.lora_etp_group)
        return gmm(gmm(x, a, tokens_per_expert), self.lora_fc1_B, tokens_per_expert) * self.lora_scale

    def _lora_fc2(self, act, tokens_per_expert):
        b = self.lora_fc2_B
        if self.lora_etp > 1:  # a partial sum like the base's, reduced by the dispatcher; B's gradient summed
            b = copy_to_tensor_model_parallel_region(b, group=self.lora_etp_group)
        return gmm(gmm(act, self.lora_fc2_A, tokens_per_expert), b, tokens_per_expert) * self.lora_scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """GroupedMLP's entries for the weights, plus one tensor per adapter piece across every expert:
        experts along axis 0 (EP), the expert-TP split of fc1's B and fc2's A along theirs."""
        from megatron.core.dist_checkpointing import ShardedTensor

        names = [n for n in ("lora_fc1_A", "lora_fc1_B", "lora_fc2_A", "lora_fc2_B") if n in self._parameters]
        held = {n: self._parameters.pop(n) for n in names}  # GroupedMLP shards every parameter it holds
        try:
            out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self._parameters.update(held)
        ep_rank, ep = parallel_state.get_expert_model_parallel_rank(), parallel_state.get_expert_model_parallel_world_size()
        etp_rank, dp_rank = parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_data_parallel_rank()
        axis = len(sharded_offsets)
        for name, param in held.items():
            key, experts = f"{prefix}{name}", (axis, ep_rank, ep)
            if name == "lora_fc1_B":  # [experts, r, (gate; up) / etp]: stored as the whole [gate; up]
                out[key] = _glu_columns_factory(key, param, sharded_offsets, experts, etp_rank, self.lora_etp,
                                                (0, 0, dp_rank))
                continue
            split = [(axis + 1, etp_rank, self.lora_etp)] if name == "lora_fc2_A" else []
            replica = (0, 0 if split or self.lora_etp == 1 else etp_rank, dp_rank)
            out[key] = ShardedTensor.from_rank_offsets(key, param, *sharded_offsets, experts, *split,
                                                       replica_id=replica, prepend_axis_num=len(sharded_offsets))
        return out

    def forward(self, permuted_hidden, tokens_per_expert, permuted_probs):
        from megatron.core import tensor_parallel

        tokens_per_expert = torch.as_tensor(tokens_per_expert)
        fc1_out = self._fc1(permuted_hidden, tokens_per_expert)
        if self.lora_on[0]:
            fc1_out = fc1_out + self._lora_fc1(permuted_hidden, tokens_per_expert)
        if self.activation_recompute:
            checkpoint = tensor_parallel.CheckpointWithoutOutput()
            act = checkpoint.checkpoint(self._act_with_probs, fc1_out, permuted_probs)
            out = self._fc2(act, tokens_per_expert)
            if self.lora_on[1]:
                out = out + self._lora_fc2(act, tokens_per_expert)
            checkpoint.discard_output_and_register_recompute(out)
        else:
            act = self._act_with_probs(fc1_out, permuted_probs)
            out = self._fc2(act, tokens_per_expert)
            if self.lora_on[1]:
                out = out + self._lora_fc2(act, tokens_per_expert)
        return out, None


def _glu_columns_factory(key, param, sharded_offsets, experts, etp_rank: int, etp: int, replica):
    """The routed experts' fc1 B ([experts, r, gate_t; up_t] on expert-TP rank t) stored as one tensor
    [experts, r, gate; up] whatever the expert-TP size: its gate and up halves at their own offsets
    (megatron's apply_swiglu_sharded_factory does this for the first axis)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    axis = len(sharded_offsets) + 2

    def build(key, t, replica_id, flattened_range):
        gate, up = torch.chunk(t, 2, dim=2)
        return [ShardedTensor.from_rank_offsets(key, half, *sharded_offsets, experts, (axis, offset, 2 * etp),
                                                replica_id=replica_id, prepend_axis_num=len(sharded_offsets))
                for half, offset in ((gate, etp_rank), (up, etp + etp_rank))]

    def merge(parts):
        return torch.cat(parts, dim=2)

    return ShardedTensorFactory(key, param, build, merge, replica)


# --------------------------------------------------------------------------- the transform

_CLASSES: Dict[Tuple[type, type], type] = {}


def _adapted(module: torch.nn.Module, mixin: type) -> None:
    base = type(module)
    key = (base, mixin)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"Lora{base.__name__}", (mixin, base), {"__module__": __name__})
    module.__class__ = _CLASSES[key]


def _layers(model) -> Iterator[Tuple[int, torch.nn.Module]]:
    """(HF layer index, TransformerLayer) of every real layer of the chunk, MTP's included."""
    for layer in model.decoder.layers:
        if hasattr(layer, "self_attention"):
            yield layer.layer_number - 1, layer
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        for i, mtp_layer in enumerate(mtp.layers):
            yield model.config.num_layers + i, mtp_layer.transformer_layer


def adapter_key(hf_layer: Optional[int], target: str) -> str:
    """The HF name an adapter initialises from (and exports to): ``model.layers.N.<target>`` or the output layer."""
    return "lm_head" if target == OUTPUT_LAYER else f"model.layers.{hf_layer}.{target}"


def linear_targets(layer) -> Iterator[Tuple[str, torch.nn.Module]]:
    """(canonical target, module) of one decoder layer's linears that LoRA can adapt."""
    attention = layer.self_attention
    for name in ATTENTION:
        module = getattr(attention, name, None)
        if module is not None:
            yield name, module
    mlp = layer.mlp
    if isinstance(mlp, MLP):
        yield "mlp.linear_fc1", mlp.linear_fc1
        yield "mlp.linear_fc2", mlp.linear_fc2
        return
    shared = getattr(mlp, "shared_experts", None)
    if shared is not None:
        yield "shared_experts.linear_fc1", shared.linear_fc1
        yield "shared_experts.linear_fc2", shared.linear_fc2
    yield "experts", mlp.experts


def apply_lora(model, config) -> None:
    """Freezes the model chunk's base parameters and adds the adapters ``config.lora_targets`` names."""
    for param in model.parameters():
        param.requires_grad_(False)
    targets = set(config.lora_targets)
    r, scale, seed = config.lora_rank, config.lora_alpha / config.lora_rank, config.lora_seed
    for hf_layer, layer in _layers(model):
        for target, module in linear_targets(layer):
            if target == "experts":
                _adapt_experts(module, config, hf_layer, targets, r, scale, seed)
            elif target in targets:
                _adapt_linear(module, config, adapter_key(hf_layer, target), r, scale, seed,
                              glu=target.endswith("linear_fc1"))
    if OUTPUT_LAYER in targets and getattr(model, "output_layer", None) is not None:
        _adapt_linear(model.output_layer, config, adapter_key(None, OUTPUT_LAYER), r, scale, seed)
    if getattr(model, "embedding", None) is not None:
        model.embedding.register_forward_hook(_track_gradients)


def _track_gradients(module, inputs, output):
    """The frozen embedding's output asks for gradients: megatron's full recompute runs each layer as an
    autograd function whose outputs track gradients only if an input does, so without this no adapter
    inside a recomputed layer would get one (PEFT's enable_input_require_grads, for the same reason)."""
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)
    return output


def _adapt_linear(module, config, key: str, r: int, scale: float, seed: int, glu: bool = False) -> None:
    if isinstance(module, ColumnParallelLinear):
        mixin, tp = _LoraColumn, module.tp_group.size()
        a, rows, sp = init_a(seed, key, r, module.input_size), module.output_size_per_partition, module.sequence_parallel
    elif isinstance(module, RowParallelLinear):
        mixin, tp = _LoraRow, module.tp_group.size()
        rank = module.tp_group.rank()
        a = init_a(seed, key, r, module.input_size).chunk(tp, dim=1)[rank]
        rows, sp = module.output_size, module.sequence_parallel
    elif isinstance(module, HeadConcat):
        mixin, first = _LoraHeadConcat, module._parts[0]
        tp = first.tp_group.size()
        a, sp = init_a(seed, key, r, first.input_size), first.sequence_parallel
        rows = sum(part.output_size_per_partition for part in module._parts)
    elif isinstance(module, DuplicatedLinear):
        mixin, tp = _LoraDuplicated, 1
        a, rows, sp = init_a(seed, key, r, module.in_features), module.out_features, config.sequence_parallel
    else:
        raise TypeError(f"LoRA cannot adapt {key}: {type(module).__name__} is not a megatron linear")
    _adapted(module, mixin)
    module._lora_setup(r, scale, config.lora_dropout, config.lora_fusion, a, rows, sp, tp, glu)


def _expert_a(seed: int, key: str, r: int, fan_in: int, experts, part: Callable) -> torch.Tensor:
    """[local experts, r, in here] from each global expert's own seed."""
    return torch.stack([part(init_a(seed, f"{key}.{e}", r, fan_in)) for e in experts])


def _adapt_experts(module, config, hf_layer: int, targets, r: int, scale: float, seed: int) -> None:
    want = ("experts.linear_fc1" in targets, "experts.linear_fc2" in targets)
    if not any(want):
        return
    if not isinstance(module, GroupedExperts):
        raise ValueError("LoRA on routed experts runs through grouped GEMMs: add --moe-grouped-gemm")
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    first = parallel_state.get_expert_model_parallel_rank() * module.num_local_experts
    experts = range(first, first + module.num_local_experts)
    hidden, ffn = config.hidden_size, config.moe_ffn_hidden_size
    key = adapter_key(hf_layer, "mlp.experts")
    fc1 = fc2 = None
    if want[0]:
        fc1 = (_expert_a(seed, f"{key}.gate_up_proj", r, hidden, experts, lambda a: a), 2 * ffn // etp)
    if want[1]:
        fc2 = (_expert_a(seed, f"{key}.down_proj", r, ffn, experts, lambda a: a.chunk(etp, dim=1)[etp_rank]), hidden)
    _adapted(module, _LoraExperts)
    module._lora_setup(r, scale, fc1, fc2, etp, parallel_state.get_expert_tensor_parallel_group(check_initialized=False))


def local_adapters(model) -> Dict[Tuple[str, Optional[int]], Dict[str, torch.Tensor]]:
    """This chunk's adapters by (canonical target, HF layer), as ``npu_dsv3.lora.export`` orients them:
    linears {"A": [r, in], "B": [out, r]}, routed experts {"A": [E, r, in], "B": [E, out, r]}; each rank's
    piece (whole at world size 1)."""
    out = {}
    for key, (module, target) in _local_modules(model).items():
        if target.startswith("experts"):
            fc = target[-3:]  # the routed experts' pieces are stored for ops.gmm: [E, in, r] / [E, r, out]
            out[key] = {"A": getattr(module, f"lora_{fc}_A").transpose(1, 2),
                        "B": getattr(module, f"lora_{fc}_B").transpose(1, 2)}
        else:
            out[key] = {"A": module.lora_A, "B": module.lora_B}
    return out


def load_adapters(model, adapters) -> None:
    """Sets a single-rank model's adapters from whole ones (``local_adapters``' orientation; the inverse of
    it at world size 1), e.g. those ``npu_dsv3.lora.sources.adapters_of`` reads from any layout."""
    own = local_adapters(model)
    if own.keys() != adapters.keys():
        raise ValueError(f"the adapters ({len(adapters)}) are not this model's ({len(own)}): targets differ, e.g. "
                         f"{sorted(map(str, own.keys() ^ adapters.keys()))[:3]}")
    with torch.no_grad():
        for key, tensors in adapters.items():
            for part in ("A", "B"):
                target, given = own[key][part], tensors[part]
                if key[0] == OUTPUT_LAYER and part == "B":  # vocabulary padding rows stay zero
                    target = target[: given.shape[0]]
                if target.shape != given.shape:
                    raise ValueError(f"adapter {key} {part}: {tuple(given.shape)}, the model has {tuple(target.shape)}")
                target.copy_(given)


def shard_adapters(model, adapters, keep_missing_mtp: bool = True) -> None:
    """Sets this rank's adapter pieces from whole adapters (``local_adapters``' orientation), cut as the layout
    cuts them: column B by rows (fc1's as [gate_t; up_t]), row A by columns, routed experts by this rank's
    experts and expert-TP slice. MTP adapters the source lacks (a PEFT adapter has none) stay as initialised."""
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    for key, local in _local_modules(model).items():
        module, target = local
        if key not in adapters:
            if keep_missing_mtp and key[1] is not None and key[1] >= model.config.num_layers:
                continue
            raise ValueError(f"the adapters lack {key[0]} of layer {key[1]}, which this run adapts: the targets differ")
        whole = adapters[key]
        with torch.no_grad():
            for part, value in _local_pieces(module, target, whole, etp_rank).items():
                param = getattr(module, part)
                if param.shape != value.shape:
                    raise ValueError(f"adapter {key} ({part}): {tuple(value.shape)} here, the model has "
                                     f"{tuple(param.shape)}: another rank or model")
                param.copy_(value)


def _local_modules(model):
    out = {}
    for hf_layer, layer in _layers(model):
        for target, module in linear_targets(layer):
            if target == "experts":
                for fc in ("fc1", "fc2"):
                    if getattr(module, f"lora_{fc}_A", None) is not None:
                        out[(f"experts.linear_{fc}", hf_layer)] = (module, f"experts.linear_{fc}")
            elif hasattr(module, "lora_A"):
                out[(target, hf_layer)] = (module, target)
    head = getattr(model, "output_layer", None)
    if head is not None and hasattr(head, "lora_A"):
        out[(OUTPUT_LAYER, None)] = (head, OUTPUT_LAYER)
    return out


def _local_pieces(module, target: str, whole, etp_rank: int) -> Dict[str, torch.Tensor]:
    a, b = whole["A"], whole["B"]
    if target.startswith("experts"):
        first = parallel_state.get_expert_model_parallel_rank() * module.num_local_experts
        a, b = a[first:first + module.num_local_experts], b[first:first + module.num_local_experts]
        etp = module.lora_etp
        if target == "experts.linear_fc1":  # A [E, r, H] -> [E, H, r]; B [E, 2I, r] -> [E, r, gate_t; up_t]
            gate, up = b.chunk(2, dim=1)
            b = torch.cat([gate.chunk(etp, dim=1)[etp_rank], up.chunk(etp, dim=1)[etp_rank]], dim=1)
            return {"lora_fc1_A": a.transpose(1, 2), "lora_fc1_B": b.transpose(1, 2)}
        a = a.chunk(etp, dim=2)[etp_rank]  # A [E, r, I] -> [E, I_t, r]; B [E, H, r] -> [E, r, H]
        return {"lora_fc2_A": a.transpose(1, 2), "lora_fc2_B": b.transpose(1, 2)}
    if module.lora_kind == "column":
        tp, rank = module.lora_tp, module.tp_group.rank()
        if target == OUTPUT_LAYER:  # padded vocabulary rows: zero
            b = torch.cat([b, b.new_zeros(module.output_size_per_partition * tp - b.shape[0], b.shape[1])])
        if module.lora_glu:
            gate, up = b.chunk(2, dim=0)
            b = torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]])
        else:
            b = b.chunk(tp, dim=0)[rank]
    elif module.lora_kind == "row":
        a = a.chunk(module.lora_tp, dim=1)[module.tp_group.rank()]
    return {"lora_A": a, "lora_B": b}

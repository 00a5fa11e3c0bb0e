"""One rank's model chunks in megatron's local names, built from HF tensors, and back.

``chunk_state_dict`` gives the tensors of one (tensor, pipeline, expert) rank's
model chunk; ``HFFromRanks`` rebuilds the HF tensors from every rank's chunks.
The cuts come from ``sharding`` and the placement of layers from
``npu_dsv3.layout``, so the converter, the single-process loader and training
agree on every name and shape.
"""

from typing import Callable, Dict, Iterator, List, Tuple

import torch

from npu_dsv3.checkpoint import sharding
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.config import moe_layer_pattern_of, padded_vocab_size
from npu_dsv3.layout import LayoutError, ParallelLayout, int_list


def effective_hf_config(hf_config: dict, flags: dict, select_layers: bool = True) -> dict:
    """config.json of the model a conversion writes: ``hf_config`` (the source's) with the
    model-size flags applied as MindSpeed-LLM's converter reads them (Ascend/MindSpeed-LLM,
    mindspeed_llm/tasks/checkpoint/convert_hf2mg.py); unset flags keep the source's values.

    - ``--num-layers`` (noop layers included) keeps the first layers; more than the source has is an error;
    - ``--first-k-dense-replace K`` below the source's keeps dense layers 0..K-1, then the MoE
      layers from the source's first one on (``source_layer_map``); above it is an error, since
      the source has no dense weights for those layers;
    - ``--mtp-num-layers`` keeps that many MTP layers (0: none); more than the source has is an error.

    ``select_layers=False`` is for a megatron source, whose rank files fix its layers: only MTP
    layers may be dropped, and ``ParallelLayout.from_flags`` checks the other flags against the config.
    """
    for name in ("first_k_dense_replace", "mtp_num_layers"):
        if (flags.get(name) or 0) < 0:
            raise LayoutError(f"--{name.replace('_', '-')} must be >= 0, not {flags[name]}")
    layers, first_k = hf_config["num_hidden_layers"], hf_config.get("first_k_dense_replace", 0)
    mtp = hf_config.get("num_nextn_predict_layers") or 0
    want_mtp = mtp if flags.get("mtp_num_layers") is None else flags["mtp_num_layers"]
    if want_mtp > mtp:
        raise LayoutError(f"--mtp-num-layers {want_mtp}: the checkpoint has {mtp} MTP layer(s), there is no "
                          f"model.layers.{layers + mtp}.eh_proj.weight")
    out = {**hf_config, "num_nextn_predict_layers": want_mtp}
    if not select_layers:
        return out
    noop = len(int_list(flags.get("noop_layers")))
    want_layers = flags["num_layers"] - noop if flags.get("num_layers") else layers
    if not 1 <= want_layers <= layers:
        raise LayoutError(f"--num-layers {flags['num_layers']} minus {noop} --noop-layers is {want_layers} layers; "
                          f"the checkpoint has {layers} (model.layers.0 to model.layers.{layers - 1})")
    want_k = first_k if flags.get("first_k_dense_replace") is None else flags["first_k_dense_replace"]
    if min(want_k, want_layers) > first_k:
        raise LayoutError(f"--first-k-dense-replace {want_k}: layer {first_k} would be dense, but the checkpoint's "
                          f"is MoE (there is no model.layers.{first_k}.mlp.gate_proj.weight); use at most {first_k}")
    if want_k != first_k and hf_config.get("moe_layer_freq", 1) != 1:
        raise LayoutError(f"--first-k-dense-replace {want_k} differs from the checkpoint's {first_k}, which "
                          f"only works with moe_layer_freq 1, not {hf_config['moe_layer_freq']}")
    return {**out, "num_hidden_layers": want_layers, "first_k_dense_replace": want_k}


def source_layer_map(source_hf_config: dict, hf_config: dict) -> Dict[int, int]:
    """HF layer index in the model ``hf_config`` describes -> in the source it was cut from
    by ``effective_hf_config`` (decoder layers, then MTP layers)."""
    layers, first_k = hf_config["num_hidden_layers"], hf_config.get("first_k_dense_replace", 0)
    source_first_k = source_hf_config.get("first_k_dense_replace", 0)
    out = {i: i if i < first_k else i - first_k + source_first_k for i in range(layers)}
    for depth in range(hf_config.get("num_nextn_predict_layers") or 0):
        out[layers + depth] = source_hf_config["num_hidden_layers"] + depth
    return out


def source_getter(get: Callable[[str], torch.Tensor], source_hf_config: dict, hf_config: dict):
    """``get`` by the HF names of the model ``hf_config`` describes, reading the source's layers."""
    layers = source_layer_map(source_hf_config, hf_config)
    if all(i == j for i, j in layers.items()):
        return get

    def get_selected(name: str) -> torch.Tensor:
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            name = f"model.layers.{layers[int(index)]}.{rest}"
        return get(name)

    return get_selected


def _layer_specs(config, par: ParallelLayout, moe: bool) -> list:
    specs = sharding.attention_specs(config, par.mla_mm_split)
    specs += sharding.moe_specs(config) if moe else sharding.dense_mlp_specs()
    if getattr(config, "qlora", False):
        from npu_dsv3.lora.nf4_base import is_quantized

        specs = sharding.nf4_specs(specs, lambda hf: is_quantized("model.layers.0." + hf))
    return specs


def _nf4_experts(get, mc: str, hf: str, experts, par: ParallelLayout, etp_rank: int) -> Dict[str, torch.Tensor]:
    """QLoRA's routed experts (``npu_dsv3.lora.nf4_base.NF4Experts``): per part the local experts' codes
    stacked along rows (cut by expert-TP like the weights) and their scales, one row per expert."""
    from npu_dsv3.lora.nf4_base import CODES, EXPERT_PARTS, SCALES, SUFFIXES

    pieces = {f"{mc}mlp.experts.{part}{suffix}": [] for part in EXPERT_PARTS for suffix in SUFFIXES}
    for e in experts:  # an expert's parts together: a quantizing reader quantizes each HF tensor once
        for part in EXPERT_PARTS:
            name = f"{hf}mlp.experts.{e}.{part}.weight"
            cut = sharding.COLS if part == "down_proj" else sharding.ROWS
            pieces[f"{mc}mlp.experts.{part}{CODES}"].append(sharding.shard(
                sharding.Spec(f"mlp.experts.{part}{CODES}", (name + CODES,), cut), [get(name + CODES)], par.etp,
                etp_rank)[0])
            for suffix in SCALES:
                pieces[f"{mc}mlp.experts.{part}{suffix}"].append(get(name + suffix))
    return {key: torch.cat(tensors) for key, tensors in pieces.items()}


def _shard(spec, get, hf: str, mc: str, par: ParallelLayout, tp_rank: int) -> Dict[str, torch.Tensor]:
    pieces = sharding.shard(spec, [get(hf + s) for s in spec.hf], par.tp, tp_rank)
    return {mc + name: piece for name, piece in zip(sharding.mcore_names(spec), pieces)}


def _layer_to_mcore(config, par, get, mc: str, hf: str, moe: bool, tp_rank: int, ep_rank: int):
    out = {}
    for spec in _layer_specs(config, par, moe):
        out.update(_shard(spec, get, hf, mc, par, tp_rank))
    if moe and config.moe_router_enable_expert_bias:
        # megatron keeps the bias in fp32 whatever the model dtype (its 1e-3 updates vanish in bf16).
        out[mc + "mlp.router.expert_bias"] = out[mc + "mlp.router.expert_bias"].float()
    if not moe:
        return out
    etp_rank = tp_rank if par.etp > 1 else 0
    if getattr(config, "qlora", False):
        out.update(_nf4_experts(get, mc, hf, par.local_experts(config.num_moe_experts, tp_rank, ep_rank), par,
                                etp_rank))
        return out
    fc1, fc2 = [], []
    for e in par.local_experts(config.num_moe_experts, tp_rank, ep_rank):
        expert = f"{hf}mlp.experts.{e}."
        fc1.append(sharding.expert_fc1(get(expert + "gate_proj.weight"), get(expert + "up_proj.weight"),
                                       par.etp, etp_rank))
        fc2.append(sharding.expert_fc2(get(expert + "down_proj.weight"), par.etp, etp_rank))
    if par.grouped_gemm:
        for name, tensor in sharding.grouped_weights(fc1, fc2).items():
            out[f"{mc}mlp.experts.{name}"] = tensor
    else:
        for local, (w1, w2) in enumerate(zip(fc1, fc2)):
            out[f"{mc}mlp.experts.local_experts.{local}.linear_fc1.weight"] = w1.t()
            out[f"{mc}mlp.experts.local_experts.{local}.linear_fc2.weight"] = w2.t()
    return out


def _vocab_rows(config, par, tensor: torch.Tensor, tp_rank: int) -> torch.Tensor:
    padded = padded_vocab_size(config.vocab_size, par.tp)
    if tensor.shape[0] != config.vocab_size:
        raise CheckpointError(f"vocabulary tensor has {tensor.shape[0]} rows, config.json says {config.vocab_size}")
    # this rank's rows of the padded vocabulary: its real rows (``narrow``: a lazy source reads only them), then
    # zeros
    per_rank = padded // par.tp
    start = min(tp_rank * per_rank, config.vocab_size)
    rows = tensor.narrow(0, start, min(per_rank, config.vocab_size - start))
    return torch.cat([rows, torch.zeros(per_rank - rows.shape[0], *tensor.shape[1:], dtype=tensor.dtype,
                                        device=tensor.device)])


def chunk_state_dict(config, par: ParallelLayout, get: Callable[[str], torch.Tensor],
                     tp_rank: int, pp_rank: int, ep_rank: int, chunk: int) -> Dict[str, torch.Tensor]:
    """One model chunk of one rank, in megatron's local names, from HF tensors read by ``get``."""
    layout = par.pipeline
    pattern = moe_layer_pattern_of(config)
    out = {}
    if layout.has_embedding(pp_rank, chunk):
        out["embedding.word_embeddings.weight"] = _vocab_rows(config, par, get("model.embed_tokens.weight"), tp_rank)
    for local, global_index in enumerate(layout.chunk_layers(pp_rank, chunk)):
        hf_index = layout.real_layer(global_index)
        if hf_index is not None:  # noop layers hold no weights
            out.update(_layer_to_mcore(config, par, get, f"decoder.layers.{local}.", f"model.layers.{hf_index}.",
                                       bool(pattern[hf_index]), tp_rank, ep_rank))
    if layout.has_head(pp_rank, chunk):
        out["decoder.final_layernorm.weight"] = get("model.norm.weight")
        if not config.tie_word_embeddings:
            out["output_layer.weight"] = _vocab_rows(config, par, get("lm_head.weight"), tp_rank)
        for depth in range(config.mtp_num_layers or 0):
            mc, hf = f"mtp.layers.{depth}.", f"model.layers.{config.num_layers + depth}."
            for spec in sharding.mtp_specs():
                out.update(_shard(spec, get, hf, mc, par, tp_rank))
            out.update(_layer_to_mcore(config, par, get, mc + "transformer_layer.", hf,
                                       bool(config.num_moe_experts), tp_rank, ep_rank))
    return out


def hf_tensor_shapes(config, mtp_layers: int = None) -> Tuple[Dict[str, Tuple[int, ...]], set]:
    """(every HF tensor of the model ``config`` describes with the shape config.json gives it, the
    names a checkpoint may leave out): MTP layers beyond the first ``mtp_layers`` (default: all
    required), the MTP layers' copies of the embedding and head, the head when tied, and the empty
    shared experts of a model without them."""
    hidden, heads, vocab = config.hidden_size, config.num_attention_heads, config.vocab_size
    nope, rope, v = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()

    def mlp(prefix, ffn):
        shapes.update({prefix + "gate_proj.weight": (ffn, hidden), prefix + "up_proj.weight": (ffn, hidden),
                       prefix + "down_proj.weight": (hidden, ffn)})

    def layer(prefix, moe):
        attn = prefix + "self_attn."
        shapes.update({prefix + "input_layernorm.weight": (hidden,),
                       prefix + "post_attention_layernorm.weight": (hidden,),
                       attn + "kv_a_proj_with_mqa.weight": (config.kv_lora_rank + rope, hidden),
                       attn + "kv_a_layernorm.weight": (config.kv_lora_rank,),
                       attn + "kv_b_proj.weight": (heads * (nope + v), config.kv_lora_rank),
                       attn + "o_proj.weight": (hidden, heads * v)})
        if config.q_lora_rank is None:
            shapes[attn + "q_proj.weight"] = (heads * (nope + rope), hidden)
        else:
            shapes.update({attn + "q_a_proj.weight": (config.q_lora_rank, hidden),
                           attn + "q_a_layernorm.weight": (config.q_lora_rank,),
                           attn + "q_b_proj.weight": (heads * (nope + rope), config.q_lora_rank)})
        if not moe:
            mlp(prefix + "mlp.", config.ffn_hidden_size)
            return
        shapes[prefix + "mlp.gate.weight"] = (config.num_moe_experts, hidden)
        if config.moe_router_enable_expert_bias:
            shapes[prefix + "mlp.gate.e_score_correction_bias"] = (config.num_moe_experts,)
        if config.moe_shared_expert_intermediate_size:
            mlp(prefix + "mlp.shared_experts.", config.moe_shared_expert_intermediate_size)
        else:  # n_shared_experts 0: transformers still saves the shared expert, with 0 rows or columns
            before = set(shapes)
            mlp(prefix + "mlp.shared_experts.", 0)
            optional.update(set(shapes) - before)
        for e in range(config.num_moe_experts):
            mlp(f"{prefix}mlp.experts.{e}.", config.moe_ffn_hidden_size)

    for index, moe in enumerate(moe_layer_pattern_of(config)):
        layer(f"model.layers.{index}.", bool(moe))
    mtp = config.mtp_num_layers or 0
    for depth in range(mtp):
        prefix = f"model.layers.{config.num_layers + depth}."
        before = set(shapes)
        layer(prefix, bool(config.num_moe_experts))
        shapes.update({prefix + "enorm.weight": (hidden,), prefix + "hnorm.weight": (hidden,),
                       prefix + "eh_proj.weight": (hidden, 2 * hidden),
                       prefix + "shared_head.norm.weight": (hidden,),
                       prefix + "embed_tokens.weight": (vocab, hidden),
                       prefix + "shared_head.head.weight": (vocab, hidden)})
        optional |= {prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"}
        if mtp_layers is not None and depth >= mtp_layers:
            optional |= set(shapes) - before
    return shapes, optional


class HFFromRanks:
    """HF tensors, by name, from ranks' model chunks: the inverse of ``chunk_state_dict``.

    ``fetch(tp_rank, pp_rank, ep_rank, chunk)`` returns that chunk's state dict
    (memory-mapped files, say) and ``describe(tp_rank, pp_rank, ep_rank)`` names
    it in errors. ``get(name)`` rebuilds one HF tensor from the pieces that hold
    it, so a converter can read in any order (``reshard`` reads in the target
    layout's order) while only the touched pieces are paged in.
    """

    def __init__(self, config, par: ParallelLayout, fetch: Callable, describe: Callable):
        self.config, self.par = config, par
        self.fetch, self.describe = fetch, describe
        self._where: Dict[str, Callable[[], Dict[str, torch.Tensor]]] = {}
        self._last: Dict[str, torch.Tensor] = {}
        self._index()

    def names(self) -> List[str]:
        """Every HF tensor name, in checkpoint order (embedding, layers, norm, head, MTP)."""
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{name} is not a tensor of this model")
        if name not in self._last:
            # A merge can yield siblings (gate and up): keep them for the next call only.
            self._last = self._where[name]()
        return self._last.pop(name)

    def hf_tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def builder(self, name: str) -> Callable[[], Dict[str, torch.Tensor]]:
        """The merge that builds ``name``: called, it reads the pieces through ``fetch`` and returns ``name``
        and the siblings built with it (gate and up: one function for both)."""
        return self._where[name]

    def _pieces(self, pp_rank, chunk, name, ep_rank=0, ranks=None) -> List[torch.Tensor]:
        pieces = []
        for tp_rank in ranks if ranks is not None else range(self.par.tp):
            sd = self.fetch(tp_rank, pp_rank, ep_rank, chunk)
            if name not in sd:
                raise CheckpointError(
                    f"{name} is missing from {self.describe(tp_rank, pp_rank, ep_rank)}: "
                    "the layout flags or the model config disagree with the checkpoint"
                )
            pieces.append(sd[name])
        return pieces

    def _add(self, hf_names, build):
        for name in hf_names:
            self._where[name] = build

    def _spec(self, pp_rank, chunk, mc: str, hf: str, spec):
        def build():
            pieces = [self._pieces(pp_rank, chunk, mc + name) for name in sharding.mcore_names(spec)]
            merged = sharding.merge(spec, pieces)
            return {hf + name: tensor for name, tensor in zip(spec.hf, merged)}
        self._add([hf + name for name in spec.hf], build)

    def _vocab(self, pp_rank, chunk, mc_name: str, hf_name: str):
        def build():
            return {hf_name: torch.cat(self._pieces(pp_rank, chunk, mc_name), 0)[: self.config.vocab_size]}
        self._add([hf_name], build)

    def _index(self):
        config, layout = self.config, self.par.pipeline
        pattern = moe_layer_pattern_of(config)
        for pp_rank, chunk in layout.stages():
            if (pp_rank, chunk) == layout.first_stage():
                self._vocab(pp_rank, chunk, "embedding.word_embeddings.weight", "model.embed_tokens.weight")
            for local, global_index in enumerate(layout.chunk_layers(pp_rank, chunk)):
                hf_index = layout.real_layer(global_index)
                if hf_index is not None:
                    self._layer(pp_rank, chunk, f"decoder.layers.{local}.", f"model.layers.{hf_index}.",
                                bool(pattern[hf_index]))
            if layout.has_head(pp_rank, chunk):
                self._spec(pp_rank, chunk, "", "model.", sharding.Spec("decoder.final_layernorm.weight",
                                                                       ("norm.weight",), sharding.REPLICATED))
                if not config.tie_word_embeddings:
                    self._vocab(pp_rank, chunk, "output_layer.weight", "lm_head.weight")
                for depth in range(config.mtp_num_layers or 0):
                    mc, hf = f"mtp.layers.{depth}.", f"model.layers.{config.num_layers + depth}."
                    for spec in sharding.mtp_specs():
                        self._spec(pp_rank, chunk, mc, hf, spec)
                    self._layer(pp_rank, chunk, mc + "transformer_layer.", hf, bool(config.num_moe_experts))
        # Layer order in the checkpoint: by HF layer index, whatever the pipeline placement.
        order = {name: i for i, name in enumerate(self._where)}
        self._where = dict(sorted(self._where.items(), key=lambda item: (hf_layer(item[0]), order[item[0]])))

    def _layer(self, pp_rank, chunk, mc, hf, moe):
        for spec in _layer_specs(self.config, self.par, moe):
            self._spec(pp_rank, chunk, mc, hf, spec)
        if not moe:
            return
        for e in range(self.config.num_moe_experts):
            expert = f"{hf}mlp.experts.{e}."
            if getattr(self.config, "qlora", False):
                from npu_dsv3.lora.nf4_base import EXPERT_PARTS, SUFFIXES

                self._add([f"{expert}{p}.weight{s}" for p in EXPERT_PARTS for s in SUFFIXES],
                          self._nf4_expert_builder(pp_rank, chunk, mc, expert, e))
                continue
            self._add([expert + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")],
                      self._expert_builder(pp_rank, chunk, mc, expert, e))

    def _nf4_expert_builder(self, pp_rank, chunk, mc, expert, e):
        """One expert's NF4 parts (the inverse of ``_nf4_experts``): its rows of each part's codes from every
        expert-TP rank, joined as the weights are, and its row of the scales."""
        from npu_dsv3.lora.nf4_base import CODES, EXPERT_PARTS, SCALES

        ep_rank, etp_ranks, local = self.par.expert_home(self.config.num_moe_experts, e)
        per_rank = self.par.experts_per_rank(self.config.num_moe_experts)

        def build():
            out = {}
            for part in EXPERT_PARTS:
                pieces = self._pieces(pp_rank, chunk, f"{mc}mlp.experts.{part}{CODES}", ep_rank, etp_ranks)
                mine = [p.view(per_rank, -1, p.shape[-1])[local] for p in pieces]
                out[f"{expert}{part}.weight{CODES}"] = torch.cat(mine, 1 if part == "down_proj" else 0)
                for suffix in SCALES:
                    scales = self._pieces(pp_rank, chunk, f"{mc}mlp.experts.{part}{suffix}", ep_rank, etp_ranks[:1])
                    out[f"{expert}{part}.weight{suffix}"] = scales[0][local:local + 1]
            return out

        return build

    def _expert_builder(self, pp_rank, chunk, mc, expert, e):
        ep_rank, etp_ranks, local = self.par.expert_home(self.config.num_moe_experts, e)
        per_rank = self.par.experts_per_rank(self.config.num_moe_experts)
        hidden = self.config.hidden_size

        def build():
            if self.par.grouped_gemm:
                w1 = self._pieces(pp_rank, chunk, f"{mc}mlp.experts.weight1", ep_rank, etp_ranks)
                w2 = self._pieces(pp_rank, chunk, f"{mc}mlp.experts.weight2", ep_rank, etp_ranks)
                views = [sharding.split_grouped(a, b, per_rank, hidden) for a, b in zip(w1, w2)]
                fc1, fc2 = [v[0][local] for v in views], [v[1][local] for v in views]
            else:
                prefix = f"{mc}mlp.experts.local_experts.{local}."
                fc1 = [p.t() for p in self._pieces(pp_rank, chunk, prefix + "linear_fc1.weight", ep_rank, etp_ranks)]
                fc2 = [p.t() for p in self._pieces(pp_rank, chunk, prefix + "linear_fc2.weight", ep_rank, etp_ranks)]
            gate, up, down = sharding.merge_expert(fc1, fc2)
            return {expert + "gate_proj.weight": gate, expert + "up_proj.weight": up, expert + "down_proj.weight": down}

        return build


def hf_layer(name: str) -> int:
    """Sort key: -1 for the embedding, the layer index, then after all layers."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return -1 if name == "model.embed_tokens.weight" else 1 << 30


def with_mtp_copies(names, hf_config: dict) -> List[Tuple[str, str]]:
    """(HF name, name it is read by) in checkpoint order. HF checkpoints store the MTP layer's
    embedding and head again after its ``shared_head.norm``; megatron shares the main ones."""
    head = "model.embed_tokens.weight" if hf_config.get("tie_word_embeddings", False) else "lm_head.weight"
    out = []
    for name in names:
        out.append((name, name))
        if name.endswith("shared_head.norm.weight"):
            prefix = name[: -len("shared_head.norm.weight")]
            out += [(prefix + "embed_tokens.weight", "model.embed_tokens.weight"),
                    (prefix + "shared_head.head.weight", head)]
    return out


def chunk_state_pieces(config, par: ParallelLayout, get: Callable[[str], torch.Tensor], tp_rank: int,
                       pp_rank: int, ep_rank: int, chunk: int) -> Dict[str, Callable[[], Iterator[torch.Tensor]]]:
    """The lazy twin of ``chunk_state_dict``: the same names in the same order, each mapped to
    a function that builds that tensor only when called and yields it in pieces whose bytes,
    concatenated, are the tensor's (GroupedMLP's weight1 / weight2 one expert at a time, which
    is their storage order). A writer can then stream a rank file while holding about one HF
    tensor rather than the whole chunk. Tests check it against ``chunk_state_dict`` bit for bit."""
    layout = par.pipeline
    pattern = moe_layer_pattern_of(config)
    out: Dict[str, Callable[[], Iterator[torch.Tensor]]] = {}

    def whole(build, *args):
        return lambda: iter((build(*args),))

    def specs(spec_list, mc, hf):
        for spec in spec_list:
            for name in sharding.mcore_names(spec):  # a HeadSplit spec reads its HF tensor once per part
                out[mc + name] = whole(lambda spec, name: _shard(spec, get, hf, mc, par, tp_rank)[name],
                                       spec, mc + name)

    def layer(mc, hf, moe):
        specs(_layer_specs(config, par, moe), mc, hf)
        if moe and config.moe_router_enable_expert_bias:
            bias = out[mc + "mlp.router.expert_bias"]
            out[mc + "mlp.router.expert_bias"] = lambda: (t.float() for t in bias())  # fp32, as chunk_state_dict
        if not moe:
            return
        experts = par.local_experts(config.num_moe_experts, tp_rank, ep_rank)
        etp_rank = tp_rank if par.etp > 1 else 0
        if getattr(config, "qlora", False):
            built = {}

            def nf4_part(key):  # the layer's experts are built once, on the first key asked for
                if not built:
                    built.update(_nf4_experts(get, mc, hf, experts, par, etp_rank))
                return built.pop(key)

            from npu_dsv3.lora.nf4_base import EXPERT_PARTS, SUFFIXES

            for key in (f"{mc}mlp.experts.{p}{s}" for p in EXPERT_PARTS for s in SUFFIXES):
                out[key] = whole(nf4_part, key)
            return

        def fc1(e):
            expert = f"{hf}mlp.experts.{e}."
            return sharding.expert_fc1(get(expert + "gate_proj.weight"), get(expert + "up_proj.weight"),
                                       par.etp, etp_rank)

        def fc2(e):
            return sharding.expert_fc2(get(f"{hf}mlp.experts.{e}.down_proj.weight"), par.etp, etp_rank)

        if par.grouped_gemm:
            out[f"{mc}mlp.experts.weight1"] = lambda: map(fc1, experts)
            out[f"{mc}mlp.experts.weight2"] = lambda: map(fc2, experts)
            return
        for local, e in enumerate(experts):
            out[f"{mc}mlp.experts.local_experts.{local}.linear_fc1.weight"] = whole(lambda e: fc1(e).t(), e)
            out[f"{mc}mlp.experts.local_experts.{local}.linear_fc2.weight"] = whole(lambda e: fc2(e).t(), e)

    if layout.has_embedding(pp_rank, chunk):
        out["embedding.word_embeddings.weight"] = whole(
            lambda: _vocab_rows(config, par, get("model.embed_tokens.weight"), tp_rank))
    for local, global_index in enumerate(layout.chunk_layers(pp_rank, chunk)):
        hf_index = layout.real_layer(global_index)
        if hf_index is not None:
            layer(f"decoder.layers.{local}.", f"model.layers.{hf_index}.", bool(pattern[hf_index]))
    if layout.has_head(pp_rank, chunk):
        out["decoder.final_layernorm.weight"] = whole(get, "model.norm.weight")
        if not config.tie_word_embeddings:
            out["output_layer.weight"] = whole(lambda: _vocab_rows(config, par, get("lm_head.weight"), tp_rank))
        for depth in range(config.mtp_num_layers or 0):
            mc, hf = f"mtp.layers.{depth}.", f"model.layers.{config.num_layers + depth}."
            specs(sharding.mtp_specs(), mc, hf)
            layer(mc + "transformer_layer.", hf, bool(config.num_moe_experts))
    return out

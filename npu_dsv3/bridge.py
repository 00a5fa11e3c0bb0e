"""The online HF <-> Megatron-Core bridge for RL frameworks (verl-style): the model of the current megatron
parallel state built straight from an HF directory, no converted copy on disk, and its weights streamed back
out under HF names for the rollout engine.

    bridge = Bridge.from_hf_pretrained("/data/DeepSeek-V3", dtype=torch.bfloat16)   # BF16 or the FP8 release
    models = bridge.get_model(num_layer_list=[...], sequence_parallel=True)         # this rank's chunks, loaded
    for name, tensor in bridge.export_hf_weights(models): ...                        # every HF tensor, every rank

``hf_to_mcore_config_dpskv3(hf_config, dtype, **overrides)`` is verl's converter signature: the parallel sizes
come from megatron's parallel state, MTP, group-limited routing, the expert bias and YaRN are kept, and the
FP8 release's config is accepted (the weights are dequantized as they are read). The key mapping underneath
is ``npu_dsv3.config``'s; the tensors each rank loads are ``npu_dsv3.checkpoint.rank_state.chunk_state_dict``'s,
the converters' and training's one mapping, so the bridge cannot disagree with them. Each rank reads the HF
tensors its chunks hold, tensor by tensor (``checkpoint.sources.HFInput``), after every shard's header has been
checked against config.json (a missing shard or a truncated tensor is one error before anything is read).

Tests: tests/multiprocess/test_bridge_layouts.py, tests/unit/test_bridge.py.
"""

import os
from typing import Iterator, List, Optional, Tuple, Union

import torch

from npu_dsv3.checkpoint.hf_reader import CheckpointError


def _hf_dict(hf_config) -> dict:
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):  # transformers' PretrainedConfig
        return hf_config.to_dict()
    raise TypeError(f"hf_config must be a dict or a transformers PretrainedConfig, not {type(hf_config).__name__}")


def _parallel_sizes() -> dict:
    """The parallel sizes of megatron's current parallel state (none when it is not initialized)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {}
    return dict(tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
                virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
                expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
                expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size())


def _rank_file(config) -> Tuple[int, int, int]:
    """This process's rank file (tensor, pipeline, the converters' expert rank) in the current parallel state."""
    from megatron.core import parallel_state as ps

    from npu_dsv3.model.placement import checkpoint_expert_rank

    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            checkpoint_expert_rank(config, ps.get_expert_model_parallel_rank()))


def hf_to_mcore_config_dpskv3(hf_config, dtype: torch.dtype, **override_transformer_config_kwargs):
    """verl's ``hf_to_mcore_config_dpskv3``: the ``MLATransformerConfig`` (our ``DeepSeekV3TransformerConfig``) of
    ``hf_config`` (a ``PretrainedConfig`` or a config.json dict) for the current megatron parallel state, in
    ``dtype``; the overrides win. Unlike verl's, MTP (``num_nextn_predict_layers``), ``n_group`` /
    ``topk_group`` routing and the FP8 release's ``quantization_config`` are kept or accepted."""
    from npu_dsv3 import config as mapping

    hf = _hf_dict(hf_config)
    hf.pop("quantization_config", None)  # the bridge reads the FP8 release dequantized
    kwargs = dict(params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
                  fp16=dtype == torch.float16, **_parallel_sizes())
    kwargs.update(override_transformer_config_kwargs)
    return mapping.hf_to_mcore_config_dpskv3(hf, **kwargs)


class Bridge:
    """One HF DeepSeek-V3 (directory or config) and the dtype its megatron model trains in."""

    def __init__(self, hf_config: dict, path: Optional[str], dtype: torch.dtype):
        self.hf_config, self.path, self.dtype = hf_config, path, dtype
        self.export_buffer_bytes = 0  # the last export's most exchange bytes live at once
        self.export_received_bytes = 0  # the bytes the last export received on this rank
        self.read_bytes = 0  # the tensor bytes the last load read on this rank

    @classmethod
    def from_hf_pretrained(cls, path_or_config: Union[str, dict, "object"], dtype: torch.dtype = torch.bfloat16):
        """From an HF directory (its config.json and weights), a config.json dict or a ``PretrainedConfig``
        (no weights: ``get_model(load_weights=False)``)."""
        from npu_dsv3.config import load_hf_config

        if isinstance(path_or_config, (str, os.PathLike)):
            return cls(load_hf_config(str(path_or_config)), str(path_or_config), dtype)
        return cls(_hf_dict(path_or_config), None, dtype)

    def transformer_config(self, **overrides):
        """The megatron config for the current parallel state (``hf_to_mcore_config_dpskv3``)."""
        return hf_to_mcore_config_dpskv3(self.hf_config, self.dtype, **overrides)

    def get_model(self, wrap_with_ddp: bool = False, load_weights: bool = True, use_distributed_optimizer: bool = False,
                  value_model: bool = False, **config_overrides) -> List:
        """This rank's model chunks for the current parallel state (one, or one per virtual stage), with the HF
        weights loaded. ``config_overrides``: config fields of the layout and run (``num_layer_list``,
        ``noop_layers``, ``schedules_method``, ``moe_tp_extend_ep``, ``mla_mm_split``, ``sequence_parallel``,
        ``moe_grouped_gemm``, ...). ``wrap_with_ddp``: megatron's DistributedDataParallel around each chunk.
        ``value_model``: the critic of verl's PPO, the output layer replaced by a one-output head (``ValueHead``,
        exported as ``score.weight``)."""
        from npu_dsv3 import backend
        from npu_dsv3.config import padded_vocab_size
        from npu_dsv3.distributed import ensure_single_process_group
        from npu_dsv3.training.loop import build_chunks
        from npu_dsv3.training.step import wrap_model

        ensure_single_process_group()  # a world of one when nothing is initialized; else megatron's state must be
        # megatron marks its tensor-parallel weights (``tensor_model_parallel``, which the gradient norm and the
        # optimizer read) only while initializing them: never skip it, even when the weights are loaded next
        config_overrides.setdefault("perform_initialization", True)
        config_overrides.setdefault("use_cpu_initialization", backend.device().type == "cpu")
        config = self.transformer_config(**config_overrides)
        if load_weights:
            self._check_source(config)
        chunks = build_chunks(config, padded_vocab_size(config.vocab_size, config.tensor_model_parallel_size))
        chunks = [chunk.to(backend.device()) for chunk in chunks]
        if load_weights:
            self.load_hf_weights(chunks, self.path)
        if value_model:
            for chunk in chunks:
                if getattr(chunk, "output_layer", None) is not None:
                    chunk.output_layer = ValueHead(config).to(backend.device())
        if not wrap_with_ddp:
            return chunks
        return [wrap_model(chunk, use_distributed_optimizer)[0] for chunk in chunks]

    def _hf_dtypes(self) -> Tuple[dict, set]:
        """HF name -> the dtype the HF source gives it in (the FP8 release's weights: bf16), and the names it
        stores in FP8 (those with a ``weight_scale_inv``); both empty without a source."""
        from npu_dsv3.checkpoint.fp8 import SCALE_SUFFIX
        from npu_dsv3.checkpoint.hf_reader import HFCheckpointReader
        from npu_dsv3.checkpoint.sources import HFInput

        if self.path is None:
            return {}, set()
        _, meta_get = HFInput(self.path).getters(self.hf_config)
        names = HFCheckpointReader(self.path).names()
        return ({n: meta_get(n).dtype for n in names if not n.endswith(SCALE_SUFFIX)},
                {n[: -len(SCALE_SUFFIX)] for n in names if n.endswith(SCALE_SUFFIX)})

    def _check_source(self, config) -> None:
        """The HF directory against config.json, from the shards' headers alone, before any rank reads data."""
        from npu_dsv3.checkpoint.sources import check_hf_source

        if self.path is None:
            raise ValueError("this bridge was made from a config, without weights: use get_model(load_weights=False)"
                             " or Bridge.from_hf_pretrained(<HF directory>)")
        check_hf_source(self.path, self.hf_config, config.mtp_num_layers or 0)

    def load_hf_weights(self, models, path: Optional[str] = None) -> None:
        """This rank's tensors of the HF checkpoint ``path`` (default: the bridge's) into ``models`` (the chunks
        ``get_model`` gives, DDP-wrapped or not), cut as the converters cut them for this rank. Only this rank's
        slices are read (``checkpoint.sources.LazyHFTensor``); ``read_bytes`` after the call counts them. A
        QLoRA model reads whole the weights it quantizes (NF4 scales cover the whole tensor)."""
        from npu_dsv3.checkpoint.rank_state import source_getter
        from npu_dsv3.checkpoint.sources import HFInput, check_hf_source
        from npu_dsv3.model.loading import load_hf_weights, parallel_layout

        path = path or self.path
        if path is None:
            raise ValueError("load_hf_weights needs the HF directory to read")
        chunks = [getattr(m, "module", m) for m in models]  # inside megatron's DDP wrapper
        if not chunks:
            raise CheckpointError("no model chunks to load")
        config = chunks[0].config
        if path != self.path:
            check_hf_source(path, self.hf_config, config.mtp_num_layers or 0)
        get, reader = HFInput(path).lazy_getter(self.hf_config)  # each slice read when cut: only this rank's
        get = source_getter(get, self.hf_config, self.hf_config)
        if config.qlora:  # a QLoRA model: its base quantized to NF4 as it is read
            from npu_dsv3.lora.nf4_base import quantizing_getter

            get = quantizing_getter(get)
        ranks = _rank_file(config)
        for index, chunk in enumerate(chunks):
            load_hf_weights(chunk, get, path, parallel_layout(config), (*ranks, index))
        self.read_bytes = reader.bytes_read

    # ----------------------------------------------------------------------------------------- export

    def export_hf_weights(self, models, *, merge_lora: bool = True, dtype: Optional[torch.dtype] = None,
                          bucket_bytes: int = 1 << 25, names: str = "release") -> Iterator[Tuple[str, torch.Tensor]]:
        """Every HF tensor of the model, exactly once, as ``(hf_name, tensor)`` on every rank (what vLLM / SGLang
        ``load_weights`` and verl's weight sync consume), in the HF source's dtypes unless ``dtype`` is given.

        The ranks' pieces travel in buckets of about ``bucket_bytes``: per bucket each process reads the pieces it
        holds in place and receives each other piece once, at its exact size, from the least loaded of its
        holders (data-parallel and expert replicas share the sending): point to point where a piece is missing
        on no more processes than hold it, else broadcast (``_Export._launch``). Every rank joins the bucket's HF tensors with the converters' merge (``rank_state.HFFromRanks``) while
        the next bucket's exchange is under way. A rank's extra memory is two buckets' sent and received bytes
        (``export_buffer_bytes`` after the call: their most at once; a bucket is ``bucket_bytes`` or one merge's
        pieces, whichever is larger) plus the tensors being joined. The tensors handed out may be views of the
        model's weights or of the exchange's buffers (a routed expert is GroupedMLP's rows transposed): copy
        them (as ``load_weights`` does) to keep them past the next training step. Consume each export to its
        end on every rank: its collectives run as it is read. The plan (who holds what, which merge builds each
        tensor) is made on a model's first export and reused. ``names``: "release" (the HF release's: per
        expert, MTP as layer ``num_hidden_layers``) or "transformers" (transformers 5's state dict: fused
        experts, no MTP).
        ``merge_lora``: a LoRA model's adapters added to the weights they adapt. ``dtype=torch.float8_e4m3fn``:
        DeepSeek's FP8 release format for an FP8 rollout engine, the weights the release stores in FP8 (those of
        an FP8 source, else ``checkpoint.fp8.is_release_fp8``'s) re-quantized per block (the source's
        ``weight_block_size``, else 128 x 128), each followed by its ``<name>_scale_inv``; the rest in the
        source's dtypes."""
        if names not in ("release", "transformers"):
            raise ValueError(f"names must be 'release' or 'transformers', not {names!r}")
        if dtype == torch.float8_e4m3fn and names != "release":
            raise ValueError("dtype=torch.float8_e4m3fn is DeepSeek's FP8 release format (per-expert weights with "
                             "their weight_scale_inv): use names='release'")
        self.export_buffer_bytes = self.export_received_bytes = 0
        chunks = [getattr(m, "module", m) for m in models]
        stream = self._export_plan(chunks)
        stream.start(chunks, merge_lora, dtype, bucket_bytes)
        out = stream.tensors()
        return _transformers_names(out, stream.config) if names == "transformers" else out

    def _export_plan(self, chunks) -> "_Export":
        """The model's export plan, made on its first export and kept while the model lives: who holds which
        piece and which merge builds each HF tensor do not change between weight syncs."""
        self._plans = {k: v for k, v in getattr(self, "_plans", {}).items() if all(r() is not None for r in v.refs)}
        key = tuple(map(id, chunks))
        plan = self._plans.get(key)
        if plan is None or any(ref() is not chunk for ref, chunk in zip(plan.refs, chunks)):
            plan = self._plans[key] = _Export(self, chunks)
        return plan


    def export_adapter_weights(self, models) -> Iterator[Tuple[str, torch.Tensor]]:
        """A LoRA model's adapters, whole, on every rank, under PEFT's names (``adapter_model.safetensors``'
        keys, the MTP layer's left out as transformers has none): verl's adapter-only weight sync. The
        matching ``adapter_config.json`` is ``npu_dsv3.lora.export.peft_config``."""
        from npu_dsv3.lora.export import peft_tensors

        chunks = [getattr(m, "module", m) for m in models]
        if not chunks[0].config.lora_rank:
            raise ValueError("export_adapter_weights: the model has no LoRA adapters (get_model(lora_rank=..., "
                             "lora_targets=...))")
        yield from peft_tensors(_gathered_adapters(chunks, chunks[0].config), chunks[0].config.num_layers).items()


def _gathered_adapters(chunks, config):
    """Every adapter of the model, whole (``lora.export``'s orientation), from every rank's pieces."""
    import torch.distributed as dist

    from npu_dsv3.lora.sources import rank_adapters
    from npu_dsv3.lora.targets import is_lora_param
    from npu_dsv3.model.loading import parallel_layout

    par = parallel_layout(config)
    here = _rank_file(config)
    mine = {par.chunk_key(c): {k: v.detach().cpu() for k, v in chunk.state_dict().items() if is_lora_param(k)}
            for c, chunk in enumerate(chunks)}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (here, mine))  # the adapters are small
    by_rank = {}
    for coords, payload in everyone:
        by_rank.setdefault(tuple(coords), payload)
    # a file no process holds (expert-TP 1: tensor rank t's experts) reads its adapters from one that holds them
    return rank_adapters(lambda t, p, e: by_rank.get((t, p, e)) or _same_tensors(by_rank, t, p, e), config, par)


def _same_tensors(by_rank, t, p, e):
    dense = next(v for (tt, pp, _), v in by_rank.items() if (tt, pp) == (t, p))
    experts = next(v for (_, pp, ee), v in by_rank.items() if (pp, ee) == (p, e))
    return {chunk: {**{k: v for k, v in dense[chunk].items() if ".mlp.experts." not in k},
                    **{k: v for k, v in experts[chunk].items() if ".mlp.experts." in k}} for chunk in dense}


class ValueHead(torch.nn.Module):
    """The critic's head: hidden -> one value per token, whole on every tensor-parallel rank (one output does not
    split), drawn from the config's init std with a fixed seed so every rank holds the same. Under sequence
    parallelism it gathers the sequence; its gradient is then each rank's own part (every rank computes the
    whole output)."""

    NAME = "score.weight"  # its HF name (transformers' token-classification head)

    def __init__(self, config):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        weight = torch.empty(1, config.hidden_size, dtype=config.params_dtype)
        weight.normal_(0.0, config.init_method_std, generator=torch.Generator().manual_seed(0))
        self.weight = torch.nn.Parameter(weight)

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        if self.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return torch.nn.functional.linear(hidden_states, self.weight), None


class _Export:
    """A model's export (``Bridge.export_hf_weights``): the plan, made once per model (what every rank file
    holds, who holds it, which merge builds each HF tensor from which pieces), and the state of the export
    under way (``start``)."""

    def __init__(self, bridge: "Bridge", chunks):
        import weakref

        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from npu_dsv3.checkpoint.rank_state import HFFromRanks, chunk_state_dict, hf_tensor_shapes
        from npu_dsv3.model.loading import parallel_layout

        self.refs = [weakref.ref(chunk) for chunk in chunks]
        self.config = config = chunks[0].config
        if config.qlora:  # the NF4 base goes out dequantized, a weight at a time as it is sent (``_local_bytes``)
            import copy

            self.config = config = copy.copy(config)
            config.qlora = False
        self.par = parallel_layout(config)
        self.hf_config = bridge.hf_config
        self.hf_dtypes, self.fp8_source = bridge._hf_dtypes()
        shapes = hf_tensor_shapes(config)[0]

        def meta(name: str) -> torch.Tensor:
            return torch.empty(shapes[name], dtype=config.params_dtype, device="meta")

        # every rank file's tensors (shapes and dtypes, as meta tensors): what each rank holds
        self.metas = {(t, p, e, c): chunk_state_dict(config, self.par, meta, t, p, e, c)
                      for t, p, e in self.par.ranks() for c in range(self.par.pipeline.num_chunks)}
        here = _rank_file(config)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (*here, ps.get_expert_tensor_parallel_rank()))
        # Who holds a piece of rank file (t, p, e): every process with the same tensors. A dense tensor is the
        # same on every expert rank; a routed expert's slice lives on expert-TP rank t (the file of tensor rank
        # t), or with --moe-tp-extend-ep on tensor rank t itself.
        self.dense_holders, self.expert_holders = {}, {}
        for rank, (t, p, e, et) in enumerate(everyone):
            self.dense_holders.setdefault((t, p), []).append(rank)
            self.expert_holders.setdefault((t if self.par.tp_extend_ep else et, p, e), []).append(rank)
        self.rank = dist.get_rank()
        self.device = next(chunks[0].parameters()).device
        self.received: dict = {}
        self.source = HFFromRanks(config, self.par, lambda t, p, e, c: self.received[(t, p, e, c)],
                                  lambda t, p, e: f"rank (tensor {t}, pipeline {p}, expert {e})")
        # a critic (get_model(value_model=True)) exports its value head instead of the output layer
        value = torch.tensor([int(any(isinstance(getattr(c, "output_layer", None), ValueHead) for c in chunks))])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        self.value_head = bool(value.item())
        if self.value_head:
            last = (0, *self.par.pipeline.last_stage())
            self.metas[(*last[:2], 0, last[2])]["output_layer.weight"] = torch.empty(
                1, config.hidden_size, dtype=config.params_dtype, device="meta")
        self.bridge, self.groups = bridge, None

    def start(self, chunks, merge_lora: bool, dtype, bucket_bytes: int) -> None:
        """An export of the chunks' current weights."""
        self.dtype, self.bucket_bytes = dtype, bucket_bytes
        self.fp8 = dtype == torch.float8_e4m3fn
        if self.fp8:
            from npu_dsv3.checkpoint.fp8 import fp8_block

            self.dtype, self.fp8_block = None, fp8_block(self.hf_config)
        self.local = {c: self._local_state(chunk) for c, chunk in enumerate(chunks)}
        self.dequantized: dict = {}  # a QLoRA model's last two dequantized weights (an expert's fc1 and fc2)
        self.deltas = self._deltas(chunks) if merge_lora and self.config.lora_rank else {}
        self.live_bytes = 0  # the received buckets' bytes (two at most: one handed out, the next arriving)
        self.send_buffers: list = []

    def _in_fp8(self, name: str, shape) -> bool:
        """Whether ``name`` goes out in FP8: the FP8 source's FP8 weights, or those the release stores in FP8."""
        from npu_dsv3.checkpoint.fp8 import is_release_fp8

        return name in self.fp8_source if self.fp8_source else is_release_fp8(name, shape)

    def _deltas(self, chunks) -> dict:
        """The adapters' merge updates by HF name (``lora.export.delta_builders``), from every rank's pieces."""
        from npu_dsv3.lora.export import delta_builders

        adapters = _gathered_adapters(chunks, self.config)
        return delta_builders(adapters, self.config.lora_alpha, self.config.lora_rank)

    def _groups(self):
        """HF names in checkpoint order, grouped by the merge that builds them together, each with the pieces
        (rank file, chunk, key) it reads: ``(names, build, pieces, read_as)``. The MTP layer's copies of the
        embedding and head (stored again by HF checkpoints, shared in megatron) are groups of their own that read
        the main tensor's pieces again, so nothing is held between buckets."""
        from npu_dsv3.checkpoint.rank_state import with_mtp_copies

        hf_config = {**self.hf_config, "num_nextn_predict_layers": self.config.mtp_num_layers or 0}
        seen, groups = set(), []
        for name, read_as in with_mtp_copies(self.source.names(), hf_config):
            build = self.source.builder(read_as)
            if name == read_as:
                if id(build) in seen:
                    continue
                seen.add(id(build))
            used = []
            self.received = _Recorder(self.metas, used)
            built = build()
            names = list(built) if name == read_as else [name]
            groups.append((names, build, self._expert_rows(read_as, used), {name: read_as}))
        if self.value_head:  # the output layer (and MTP's copy of it) is the critic's value head instead
            head = {id(g) for g in groups for n in g[0] if g[3].get(n, n) == "lm_head.weight"}
            groups = [g for g in groups if id(g) not in head]
            t, (p, c) = 0, self.par.pipeline.last_stage()
            head_piece = (t, p, 0, c, "output_layer.weight")
            groups.append(([ValueHead.NAME], lambda: {ValueHead.NAME: self.received[head_piece[:4]][head_piece[4]]},
                           [head_piece], {}))
        return groups

    def _expert_rows(self, name: str, used: list) -> list:
        """A routed expert's merge reads GroupedMLP's weight1 / weight2, which hold every local expert: only its
        own expert's rows travel (the rest of the received tensor is never read)."""
        import re

        match = re.match(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.", name)
        if match is None:
            return used
        _, _, local = self.par.expert_home(self.config.num_moe_experts, int(match.group(1)))
        out = []
        for piece in used:
            if piece[4].endswith(("experts.weight1", "experts.weight2")):
                meta = self.metas[piece[:4]][piece[4]]
                per_expert = _nbytes(meta) // self.par.experts_per_rank(self.config.num_moe_experts)
                piece = (*piece[:5], (local * per_expert, per_expert))
            out.append(piece)
        return out

    def tensors(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Bucket by bucket, pipelined: the next bucket's exchange is under way while this one's tensors are
        joined and handed out."""
        in_flight = None
        for bucket in self._buckets():
            launched = (bucket, self._launch(bucket))
            if in_flight is not None:
                yield from self._hand_out(*in_flight)
            in_flight = launched
        if in_flight is not None:
            yield from self._hand_out(*in_flight)
        # the plan outlives the export: it keeps no tensor of the model (nor, through a QLoRA model's
        # dequantizers, the model itself)
        self.local, self.deltas, self.dequantized, self.send_buffers = {}, {}, {}, []

    def _buckets(self) -> Iterator[list]:
        if self.groups is None:
            self.groups = self._groups()
        bucket, size = [], 0
        for group in self.groups:
            nbytes = sum(self._bytes(k) for k in group[2])
            if bucket and size + nbytes > self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(group)
            size += nbytes
        if bucket:
            yield bucket

    def _holders(self, piece) -> list:
        return self.expert_holders[piece[:3]] if ".mlp.experts." in piece[4] else self.dense_holders[piece[:2]]

    def _launch(self, bucket) -> tuple:
        """Start the bucket's exchange; every process reads the pieces it holds in place and receives each other
        piece once. A piece lacking on no more processes than hold it (a replicated tensor's other half) goes
        by an all-to-all, each lacking process served by a different holder, so pieces travel only where
        missing; a piece more processes lack than hold (another stage's, an expert on one rank) is broadcast by
        one holder (one broadcast per sending process, of its pieces packed), so no sender's traffic grows with
        the world. Either way a process sends each piece at most once; the senders are the least loaded
        holders (replicas share the sending) and pieces travel at their exact sizes."""
        import torch.distributed as dist

        # (t, p, e, c, key[, (first byte, bytes)]), in bucket order, each once
        pieces = list(dict.fromkeys(k for _, _, used, _ in bucket for k in used))
        world, me = dist.get_world_size(), self.rank
        load = [0] * world
        routes = []  # per piece: (its sender to this process, None where held; its broadcasting process or None)
        to_send = [[] for _ in range(world)]  # this process's all-to-all pieces, per destination
        receive_bytes, broadcasts = 0, {}
        for k in pieces:
            holders, n = self._holders(k), _aligned(self._bytes(k))
            held = set(holders)
            lacking = [r for r in range(world) if r not in held]
            if len(lacking) > len(holders):
                sender = min(holders, key=lambda r: (load[r], r))
                load[sender] += n
                broadcasts.setdefault(sender, []).append(k)
                routes.append((None if me in held else sender, sender))
                continue
            free, mine = list(holders), None
            for destination in lacking:
                sender = min(free, key=lambda r: (load[r], r))
                free.remove(sender)
                load[sender] += n
                if sender == me:
                    to_send[destination].append(k)
                if destination == me:
                    mine = sender
                    receive_bytes += n
            routes.append((mine, None))
        # the all-to-all as a batch of point-to-point sends from the weights themselves (nothing packed) and
        # receives into one buffer: an all-to-all without the packing copy (NCCL's all-to-all is this batch)
        receive = torch.empty(receive_bytes, dtype=torch.uint8, device=self.device)
        ops = [dist.P2POp(dist.isend, self._local_bytes(k), destination)
               for destination, pieces_to in enumerate(to_send) for k in pieces_to]
        offset = 0
        for k, (sender, broadcaster) in zip(pieces, routes):
            if broadcaster is None and sender is not None:
                n = self._bytes(k)
                ops.append(dist.P2POp(dist.irecv, receive[offset: offset + n], sender))
                offset += _aligned(n)
        handles = dist.batch_isend_irecv(ops) if ops else []
        # the broadcasts: each sender's pieces packed (in piece order), one broadcast per sender
        received = {"all-to-all": receive}
        for sender in sorted(broadcasts):
            size = sum(_aligned(self._bytes(k)) for k in broadcasts[sender])
            if sender == me:
                buffer, offset = self._send_buffer(size), 0
                for k in broadcasts[sender]:
                    data = self._local_bytes(k)
                    buffer[offset: offset + data.numel()] = data
                    offset += _aligned(data.numel())
            else:
                buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
            received[sender] = buffer
            handles.append(dist.broadcast(buffer, src=sender, async_op=True))
        incoming = sum(b.numel() for r, b in received.items() if r != me)
        self.live_bytes += incoming
        self.bridge.export_received_bytes += incoming
        self.bridge.export_buffer_bytes = max(self.bridge.export_buffer_bytes,
                                              self.live_bytes + sum(b.numel() for b in self.send_buffers))
        return pieces, routes, received, incoming, handles

    def _send_buffer(self, nbytes: int) -> torch.Tensor:
        """Send bytes of a bucket: the export's two send buffers in turn (the one of the bucket before last is
        free again), grown as needed: the packing then writes into memory already mapped."""
        self.send_buffers.append(self.send_buffers.pop(0) if len(self.send_buffers) == 2 else None)
        if self.send_buffers[-1] is None or self.send_buffers[-1].numel() < nbytes:
            self.send_buffers[-1] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.send_buffers[-1][:nbytes]

    def _hand_out(self, bucket, launched) -> Iterator[Tuple[str, torch.Tensor]]:
        pieces, routes, received, incoming, handles = launched
        for handle in handles:
            handle.wait()
        self.received = self._unpack(pieces, routes, received)
        del launched, handles
        for names, build, _, read_as in bucket:
            built = build()
            for name in names:
                tensor = self._merged(name, built[read_as.get(name, name)])
                if self.fp8 and self._in_fp8(name, tensor.shape):
                    from npu_dsv3.checkpoint.fp8 import SCALE_SUFFIX, quantize_fp8_block

                    codes, scale = quantize_fp8_block(tensor, self.fp8_block)
                    yield name, codes
                    yield name + SCALE_SUFFIX, scale
                else:
                    yield name, tensor.to(self.dtype or self.hf_dtypes.get(name, tensor.dtype))
        self.received = {}
        self.live_bytes -= incoming

    def _unpack(self, pieces, routes, received) -> dict:
        """The bucket's pieces as rank files' tensors: this process's own in place, the rest views of the
        received bytes (the point-to-point ones in piece order; each broadcast's, which hold the pieces held here
        too)."""
        offsets = {sender: 0 for sender in received}
        out = {}
        for k, (sender, broadcaster) in zip(pieces, routes):
            n, data = self._bytes(k), None
            # every piece starts on a 16-byte boundary: its dtype's view needs it
            if broadcaster is not None:
                data = received[broadcaster][offsets[broadcaster]: offsets[broadcaster] + n]
                offsets[broadcaster] += _aligned(n)
            elif sender is not None:
                data = received["all-to-all"][offsets["all-to-all"]: offsets["all-to-all"] + n]
                offsets["all-to-all"] += _aligned(n)
            chunk = out.setdefault(k[:4], {})
            if sender is None:
                chunk[k[4]] = self._local_tensor(k)  # an expert's rows: the merge cuts them from the whole
                continue
            meta = self.metas[k[:4]][k[4]]
            if len(k) == 5:
                chunk[k[4]] = data.view(meta.dtype).view(meta.shape)
            else:  # one expert's rows of GroupedMLP's weight1 / weight2
                chunk.setdefault(k[4], _ExpertRows(meta)).add(k[5], data)
        return out

    def _local_tensor(self, piece) -> torch.Tensor:
        """A held piece's whole tensor, a QLoRA model's NF4 weight dequantized."""
        data = self.local[piece[3]][piece[4]]
        return self._dequantized_weight(piece, data) if callable(data) else data

    def _bytes(self, piece) -> int:
        return piece[5][1] if len(piece) == 6 else _nbytes(self.metas[piece[:4]][piece[4]])

    @staticmethod
    def _local_state(chunk) -> dict:
        """A chunk's tensors by state-dict key; a QLoRA model's NF4 weights as functions that dequantize them."""
        state = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
        if chunk.config.qlora:
            from npu_dsv3.lora.nf4_base import dequantizers, is_nf4_buffer

            state = {k: v for k, v in state.items() if not is_nf4_buffer(k)}
            state.update(dequantizers(chunk))
        return state

    def _dequantized_weight(self, piece, dequantize) -> torch.Tensor:
        """A QLoRA model's NF4 weight, dequantized once for the pieces read from it in a row."""
        if piece[3:5] not in self.dequantized:
            while len(self.dequantized) >= 2:
                self.dequantized.pop(next(iter(self.dequantized)))
            self.dequantized[piece[3:5]] = dequantize()
        return self.dequantized[piece[3:5]]

    def _local_bytes(self, piece) -> torch.Tensor:
        data = self._local_tensor(piece).contiguous().view(-1).view(torch.uint8)
        return data if len(piece) == 5 else data[piece[5][0]: piece[5][0] + piece[5][1]]

    def _merged(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        delta = self.deltas.get(name)
        if delta is not None:
            tensor = (tensor.float() + delta().to(tensor.device)).to(tensor.dtype)
        return tensor


class _ExpertRows:
    """GroupedMLP's weight1 / weight2 of another process, of which only some experts' rows came: what the expert
    merge reads of it (``sharding.split_grouped``'s ``view(experts, ...)[local]``), without a tensor of the whole."""

    def __init__(self, meta: torch.Tensor, rows: Optional[dict] = None, shape=None):
        self.meta, self.rows, self.shape = meta, {} if rows is None else rows, shape

    def add(self, where, data: torch.Tensor) -> None:
        self.rows[where[0] // where[1]] = data.view(self.meta.dtype)

    def view(self, *shape) -> "_ExpertRows":
        return _ExpertRows(self.meta, self.rows, shape)

    def __getitem__(self, local: int) -> torch.Tensor:
        return self.rows[local].view(self.shape[1:])


class _Recorder(dict):
    """A stand-in for the received pieces: every rank file's meta tensors, noting which ones a merge reads."""

    def __init__(self, metas, used):
        super().__init__()
        self.metas, self.used = metas, used

    def __getitem__(self, rank_file):
        return _RecordingChunk(self.metas[rank_file], rank_file, self.used)


class _RecordingChunk(dict):
    def __init__(self, tensors, rank_file, used):
        super().__init__(tensors)
        self.rank_file, self.used = rank_file, used

    def __getitem__(self, key):
        self.used.append((*self.rank_file, key))
        return super().__getitem__(key)


def _aligned(n: int) -> int:
    return -(-n // 16) * 16


def _nbytes(meta: torch.Tensor) -> int:
    return meta.numel() * meta.element_size()


def _transformers_names(stream, config) -> Iterator[Tuple[str, torch.Tensor]]:
    """The release stream under transformers 5's names: a layer's routed experts fused into ``gate_up_proj``
    [E, 2 I, H] and ``down_proj`` [E, H, I] once all of them went by; MTP (which transformers lacks) left out."""
    import re

    expert = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
    pending: dict = {}
    for name, tensor in stream:
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= config.num_layers:
            continue
        match = expert.fullmatch(name)
        if match is None:
            yield name, tensor
            continue
        layer, e, part = int(match.group(1)), int(match.group(2)), match.group(3)
        pending.setdefault(layer, {})[(e, part)] = tensor
        if len(pending[layer]) == 3 * config.num_moe_experts:
            parts = pending.pop(layer)
            experts = range(config.num_moe_experts)
            prefix = f"model.layers.{layer}.mlp.experts."
            yield prefix + "gate_up_proj", torch.stack([torch.cat([parts[(i, "gate_proj")], parts[(i, "up_proj")]])
                                                        for i in experts])
            yield prefix + "down_proj", torch.stack([parts[(i, "down_proj")] for i in experts])

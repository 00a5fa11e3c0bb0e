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
        self.export_buffer_bytes = 0  # the largest gathered bucket of the last export (bytes)

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

    def _hf_dtypes(self) -> dict:
        """HF name -> the dtype the HF source stores it in (the FP8 release's weights: bf16), or {} without one."""
        from npu_dsv3.checkpoint.hf_reader import HFCheckpointReader
        from npu_dsv3.checkpoint.sources import HFInput

        if self.path is None:
            return {}
        _, meta_get = HFInput(self.path).getters(self.hf_config)
        out = {}
        for name in HFCheckpointReader(self.path).names():
            dtype = meta_get(name).dtype
            out[name] = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype
        return out

    def _check_source(self, config) -> None:
        """The HF directory against config.json, from the shards' headers alone, before any rank reads data."""
        from npu_dsv3.checkpoint.sources import check_hf_source

        if self.path is None:
            raise ValueError("this bridge was made from a config, without weights: use get_model(load_weights=False)"
                             " or Bridge.from_hf_pretrained(<HF directory>)")
        check_hf_source(self.path, self.hf_config, config.mtp_num_layers or 0)

    def load_hf_weights(self, models, path: Optional[str] = None) -> None:
        """This rank's tensors of the HF checkpoint ``path`` (default: the bridge's) into ``models`` (the chunks
        ``get_model`` gives, DDP-wrapped or not), cut as the converters cut them for this rank."""
        from megatron.core import parallel_state as ps

        from npu_dsv3.checkpoint.rank_state import source_getter
        from npu_dsv3.checkpoint.sources import HFInput, check_hf_source
        from npu_dsv3.model.loading import load_hf_weights, parallel_layout
        from npu_dsv3.model.placement import checkpoint_expert_rank

        path = path or self.path
        if path is None:
            raise ValueError("load_hf_weights needs the HF directory to read")
        chunks = [getattr(m, "module", m) for m in models]  # inside megatron's DDP wrapper
        config = chunks[0].config
        if path != self.path:
            check_hf_source(path, self.hf_config, config.mtp_num_layers or 0)
        get, _ = HFInput(path).getters(self.hf_config)
        get = source_getter(get, self.hf_config, self.hf_config)
        if config.qlora:  # a QLoRA model: its base quantized to NF4 as it is read
            from npu_dsv3.lora.nf4_base import quantizing_getter

            get = quantizing_getter(get)
        ranks = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                 checkpoint_expert_rank(config, ps.get_expert_model_parallel_rank()))
        for index, chunk in enumerate(chunks):
            load_hf_weights(chunk, get, path, parallel_layout(config), (*ranks, index))
        if not chunks:
            raise CheckpointError("no model chunks to load")

    # ----------------------------------------------------------------------------------------- export

    def export_hf_weights(self, models, *, merge_lora: bool = True, dtype: Optional[torch.dtype] = None,
                          bucket_bytes: int = 1 << 28, names: str = "release") -> Iterator[Tuple[str, torch.Tensor]]:
        """Every HF tensor of the model, exactly once, as ``(hf_name, tensor)`` on every rank (what vLLM / SGLang
        ``load_weights`` and verl's weight sync consume), in the HF source's dtypes unless ``dtype`` is given.

        The ranks' pieces travel in buckets of about ``bucket_bytes``: one all-gather over the world per bucket,
        each piece sent by one rank (the first data-parallel replica of its tensor / pipeline / expert rank); every
        rank then joins the bucket's HF tensors with the converters' merge (``rank_state.HFFromRanks``). A rank's
        extra memory is about one gathered bucket plus the bucket's joined tensors (``export_buffer_bytes`` after
        the call: the largest gathered bucket). ``names``: "release" (the HF release's: per expert, MTP as layer
        ``num_hidden_layers``) or "transformers" (transformers 5's state dict: fused experts, no MTP).
        ``merge_lora``: a LoRA model's adapters added to the weights they adapt."""
        if names not in ("release", "transformers"):
            raise ValueError(f"names must be 'release' or 'transformers', not {names!r}")
        self.export_buffer_bytes = 0
        stream = _Export(self, [getattr(m, "module", m) for m in models], merge_lora, dtype, bucket_bytes)
        out = stream.tensors()
        return _transformers_names(out, stream.config) if names == "transformers" else out


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
    from megatron.core import parallel_state as ps

    from npu_dsv3.lora.sources import rank_adapters
    from npu_dsv3.lora.targets import is_lora_param
    from npu_dsv3.model.loading import parallel_layout
    from npu_dsv3.model.placement import checkpoint_expert_rank

    par = parallel_layout(config)
    here = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            checkpoint_expert_rank(config, ps.get_expert_model_parallel_rank()))
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
    """One export: which rank sends which piece, and the buckets (``Bridge.export_hf_weights``)."""

    def __init__(self, bridge: "Bridge", chunks, merge_lora: bool, dtype, bucket_bytes: int):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from npu_dsv3.checkpoint.rank_state import HFFromRanks, chunk_state_dict, hf_tensor_shapes
        from npu_dsv3.model.loading import parallel_layout
        from npu_dsv3.model.placement import checkpoint_expert_rank

        self.config = config = chunks[0].config
        if config.qlora:
            raise ValueError("export_hf_weights of a QLoRA model: its base is NF4; export the adapters, or save with "
                             "--qlora-save-dequantize and convert")
        self.par, self.dtype, self.bucket_bytes = parallel_layout(config), dtype, bucket_bytes
        self.hf_config = bridge.hf_config
        self.hf_dtypes = bridge._hf_dtypes()
        shapes = hf_tensor_shapes(config)[0]

        def meta(name: str) -> torch.Tensor:
            return torch.empty(shapes[name], dtype=config.params_dtype, device="meta")

        # every rank file's tensors (shapes and dtypes, as meta tensors): what each rank holds
        self.metas = {(t, p, e, c): chunk_state_dict(config, self.par, meta, t, p, e, c)
                      for t, p, e in self.par.ranks() for c in range(self.par.pipeline.num_chunks)}
        here = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
                checkpoint_expert_rank(config, ps.get_expert_model_parallel_rank()))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (*here, ps.get_expert_tensor_parallel_rank()))
        # Who sends a piece of rank file (t, p, e): the first process holding the same tensors. A dense tensor is
        # the same on every expert rank; a routed expert's slice lives on expert-TP rank t (the file of tensor
        # rank t), or with --moe-tp-extend-ep on tensor rank t itself.
        self.dense_sender, self.expert_sender = {}, {}
        for rank, (t, p, e, et) in enumerate(everyone):
            self.dense_sender.setdefault((t, p), rank)
            self.expert_sender.setdefault((t if self.par.tp_extend_ep else et, p, e), rank)
        self.rank, self.here = dist.get_rank(), here
        self.local = {c: {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
                      for c, chunk in enumerate(chunks)}
        self.device = next(chunks[0].parameters()).device
        self.deltas = self._deltas(chunks) if merge_lora and config.lora_rank else {}
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
        self.bridge = bridge

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
        from npu_dsv3.checkpoint.mcore_legacy import _with_mtp_copies

        hf_config = {**self.hf_config, "num_nextn_predict_layers": self.config.mtp_num_layers or 0}
        seen, groups = set(), []
        for name, read_as in _with_mtp_copies(self.source.names(), hf_config):
            build = self.source._where[read_as]
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
            groups.append(([ValueHead.NAME], lambda: {ValueHead.NAME: self.received[(t, p, 0, c)]["output_layer.weight"]},
                           [(t, p, 0, c, "output_layer.weight")], {}))
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
        import torch.distributed as dist

        bucket, size = [], 0
        for group in self._groups() + [None]:
            if group is not None:
                nbytes = sum(self._bytes(k) for k in group[2])
                if not bucket or size + nbytes <= self.bucket_bytes:
                    bucket.append(group)
                    size += nbytes
                    continue
            self.received = self._gather(bucket, dist)
            for names, build, _, read_as in bucket:
                built = build()
                for name in names:
                    yield name, self._finish(name, built[read_as.get(name, name)])
            self.received = {}
            bucket, size = ([group], sum(self._bytes(k) for k in group[2])) if group is not None else ([], 0)

    def _gather(self, bucket, dist) -> dict:
        """Every piece of the bucket on every rank: one all-gather of each rank's packed bytes."""
        # (t, p, e, c, key[, (first byte, bytes)]), in bucket order, each once
        pieces = list(dict.fromkeys(k for _, _, used, _ in bucket for k in used))
        senders = [self.expert_sender[k[:3]] if ".mlp.experts." in k[4] else self.dense_sender[k[:2]] for k in pieces]
        sizes = [0] * dist.get_world_size()
        for k, rank in zip(pieces, senders):
            sizes[rank] += _aligned(self._bytes(k))
        width = max(sizes) or 1
        mine = [_padded(self._local_bytes(k)) for k, r in zip(pieces, senders) if r == self.rank]
        send = torch.zeros(width, dtype=torch.uint8, device=self.device)
        if mine:
            packed = torch.cat(mine)
            send[: packed.numel()] = packed
        gathered = torch.empty(width * len(sizes), dtype=torch.uint8, device=self.device)
        dist.all_gather_into_tensor(gathered, send)
        self.bridge.export_buffer_bytes = max(self.bridge.export_buffer_bytes, gathered.numel() + send.numel())
        offsets, out = [r * width for r in range(len(sizes))], {}
        for k, rank in zip(pieces, senders):
            meta, n = self.metas[k[:4]][k[4]], self._bytes(k)
            data = gathered[offsets[rank]: offsets[rank] + n]
            offsets[rank] += _aligned(n)  # every piece starts on a 16-byte boundary: its dtype's view needs it
            chunk = out.setdefault(k[:4], {})
            if len(k) == 5:
                chunk[k[4]] = data.view(meta.dtype).view(meta.shape)
                continue
            # one expert's rows: placed in an uninitialized tensor of the whole (its other rows are never read)
            whole = chunk.get(k[4])
            if whole is None:
                whole = chunk[k[4]] = torch.empty(meta.shape, dtype=meta.dtype, device=self.device)
            first, count = k[5]
            whole.view(-1).view(torch.uint8)[first:first + count] = data
        return out

    def _bytes(self, piece) -> int:
        return piece[5][1] if len(piece) == 6 else _nbytes(self.metas[piece[:4]][piece[4]])

    def _local_bytes(self, piece) -> torch.Tensor:
        data = self.local[piece[3]][piece[4]].contiguous().view(-1).view(torch.uint8)
        return data if len(piece) == 5 else data[piece[5][0]: piece[5][0] + piece[5][1]]

    def _finish(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        delta = self.deltas.get(name)
        if delta is not None:
            tensor = (tensor.float() + delta().to(tensor.device)).to(tensor.dtype)
        return tensor.to(self.dtype or self.hf_dtypes.get(name, tensor.dtype))


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


def _padded(data: torch.Tensor) -> torch.Tensor:
    pad = _aligned(data.numel()) - data.numel()
    return torch.cat([data, data.new_zeros(pad)]) if pad else data


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

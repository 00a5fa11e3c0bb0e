"""The online HF -> Megatron-Core bridge for RL frameworks (verl-style): the model of the current megatron
parallel state built straight from an HF directory, no converted copy on disk.

    bridge = Bridge.from_hf_pretrained("/data/DeepSeek-V3", dtype=torch.bfloat16)   # BF16 or the FP8 release
    models = bridge.get_model(num_layer_list=[...], sequence_parallel=True)         # this rank's chunks, loaded

``hf_to_mcore_config_dpskv3(hf_config, dtype, **overrides)`` is verl's converter signature: the parallel sizes
come from megatron's parallel state, MTP, group-limited routing, the expert bias and YaRN are kept, and the
FP8 release's config is accepted (the weights are dequantized as they are read). The key mapping underneath
is ``npu_dsv3.config``'s; the tensors each rank loads are ``npu_dsv3.checkpoint.rank_state.chunk_state_dict``'s,
the converters' and training's one mapping, so the bridge cannot disagree with them. Each rank reads the HF
tensors its chunks hold, tensor by tensor (``checkpoint.sources.HFInput``), after every shard's header has been
checked against config.json (a missing shard or a truncated tensor is one error before anything is read).

Tests: tests/multiprocess/test_bridge.py, tests/unit/test_bridge.py.
"""

import os
from typing import List, Optional, Union

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
                  **config_overrides) -> List:
        """This rank's model chunks for the current parallel state (one, or one per virtual stage), with the HF
        weights loaded. ``config_overrides``: config fields of the layout and run (``num_layer_list``,
        ``noop_layers``, ``schedules_method``, ``moe_tp_extend_ep``, ``mla_mm_split``, ``sequence_parallel``,
        ``moe_grouped_gemm``, ...). ``wrap_with_ddp``: megatron's DistributedDataParallel around each chunk."""
        from npu_dsv3 import backend
        from npu_dsv3.config import padded_vocab_size
        from npu_dsv3.distributed import ensure_single_process_group
        from npu_dsv3.training.loop import build_chunks
        from npu_dsv3.training.step import wrap_model

        ensure_single_process_group()  # a world of one when nothing is initialized; else megatron's state must be
        config_overrides.setdefault("perform_initialization", not load_weights)
        config_overrides.setdefault("use_cpu_initialization", backend.device().type == "cpu")
        config = self.transformer_config(**config_overrides)
        if load_weights:
            self._check_source(config)
        chunks = build_chunks(config, padded_vocab_size(config.vocab_size, config.tensor_model_parallel_size))
        chunks = [chunk.to(backend.device()) for chunk in chunks]
        if load_weights:
            self.load_hf_weights(chunks, self.path)
        return wrap_model(chunks, use_distributed_optimizer) if wrap_with_ddp else chunks

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

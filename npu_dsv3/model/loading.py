"""Build the model from an HF DeepSeek-V3 directory (one process, TP=PP=EP=1)."""

import warnings
from typing import Callable, Optional

import torch

from npu_dsv3.checkpoint.hf_reader import CheckpointError, HFCheckpointReader
from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.distributed import ensure_single_process_group
from npu_dsv3.model.builder import build_model
# The module, not its names: rank_state imports npu_dsv3.model, which may still be importing this.
from npu_dsv3.checkpoint import rank_state
from npu_dsv3.layout import ParallelLayout, PipelineLayout, training_flag
from npu_dsv3.lora.targets import is_lora_param


def _mtp_present(reader: HFCheckpointReader, hf_config: dict) -> bool:
    return f"model.layers.{hf_config['num_hidden_layers']}.eh_proj.weight" in reader


def load_hf(path: str, dtype: torch.dtype = torch.float32, **overrides):
    """The DeepSeek-V3 model with the HF checkpoint in ``path`` loaded, in eval mode.

    A checkpoint without MTP tensors (transformers does not save them) gives a
    model without the MTP block, with a warning. ``overrides`` are config fields.
    """
    from npu_dsv3.checkpoint.sources import check_hf_source

    ensure_single_process_group()
    hf_config = load_hf_config(path)
    reader = HFCheckpointReader(path)
    if hf_config.get("num_nextn_predict_layers") and not _mtp_present(reader, hf_config):
        warnings.warn(
            f"{path} declares {hf_config['num_nextn_predict_layers']} MTP layer(s) but holds no "
            f"model.layers.{hf_config['num_hidden_layers']}.* tensors; building the model without MTP"
        )
        overrides.setdefault("mtp_num_layers", None)
    check_hf_source(path, hf_config, None if _mtp_present(reader, hf_config) else 0)
    config = hf_to_mcore_config_dpskv3(
        hf_config,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=False,
        **overrides,
    )
    model = build_model(config)
    get = reader.get
    if config.qlora:  # the targetable linears in NF4, quantized as --qlora-nf4 does
        from npu_dsv3.lora.nf4_base import quantizing_getter

        get = quantizing_getter(get)
    load_hf_weights(model, get, path)
    return model.eval()


def load_mcore(path: str, dtype: torch.dtype = torch.float32, **layout):
    """The model from a megatron checkpoint of any layout, in one process.

    A torch_dist checkpoint is read by ``megatron.core.dist_checkpointing.load`` into
    this single-rank model (megatron reshards; ``layout`` is not needed). A legacy
    per-rank one is read in the layout it records, or in ``layout``: the layout flags by their names
    (``tensor_model_parallel_size``, ``pipeline_model_parallel_size``,
    ``expert_model_parallel_size``, ``expert_tensor_parallel_size``,
    ``num_layers_per_virtual_pipeline_stage``, ``num_layer_list``, ``noop_layers``,
    ``schedules_method``, ``moe_grouped_gemm``). The model config is the
    ``config.json`` the converter writes beside the checkpoint.
    """
    from npu_dsv3.checkpoint.mcore_dist import release_dir
    from npu_dsv3.checkpoint.mcore_legacy import read_hf_tensors
    from npu_dsv3.checkpoint.sources import model_config

    from npu_dsv3.checkpoint.layout_record import recorded_layout
    from npu_dsv3.layout import resolve_layout

    ensure_single_process_group()
    hf_config = load_hf_config(path)
    dist_dir = release_dir(path)
    if dist_dir is None:  # a legacy checkpoint reads back only in its layout: what is not given, it records
        layout = {**layout, **resolve_layout(layout, recorded_layout(path), str, path)[0]}
    # For torch_dist, which megatron reshards, moe_grouped_gemm only picks the experts' kernel (load_hf's).
    config = model_config(hf_config, layout.get("moe_grouped_gemm", True), params_dtype=dtype,
                          bf16=dtype == torch.bfloat16, use_cpu_initialization=True, perform_initialization=False)
    if dist_dir is not None:
        return _load_dist(config, dist_dir).eval()
    tensors = dict(read_hf_tensors(path, config, ParallelLayout.from_flags(config, **layout, flag=training_flag)))
    model = build_model(config)
    load_hf_weights(model, tensors.__getitem__, path)
    return model.eval()


def single_rank_layout(config) -> ParallelLayout:
    """TP = PP = EP = 1: the whole model in one chunk, with the config's MLA and expert storage."""
    pipeline = PipelineLayout(config.num_layers, mtp_num_layers=config.mtp_num_layers or 0)
    return ParallelLayout(pipeline, grouped_gemm=config.moe_grouped_gemm, mla_mm_split=config.mla_mm_split)


def parallel_layout(config) -> ParallelLayout:
    """The converters' description of the layout ``config`` (a training run's) builds: its placement, and the
    checkpoint's EP (``--moe-tp-extend-ep`` spreads megatron's experts over EP x TP ranks)."""
    from npu_dsv3.model.placement import pipeline_layout

    tp, extend = config.tensor_model_parallel_size, bool(getattr(config, "moe_tp_extend_ep", False))
    return ParallelLayout(pipeline_layout(config), tp=tp,
                          ep=config.expert_model_parallel_size // (tp if extend else 1),
                          etp=config.expert_tensor_parallel_size or tp, grouped_gemm=config.moe_grouped_gemm,
                          tp_extend_ep=extend, mla_mm_split=config.mla_mm_split)


def load_hf_weights(model, get: Callable[[str], torch.Tensor], source: str, par: Optional[ParallelLayout] = None,
                    ranks=(0, 0, 0, 0)) -> None:
    """Copy every tensor the model chunk owns from HF tensors read by ``get``, cut for ``ranks`` (tensor, pipeline,
    the converter's expert rank, chunk) of the layout ``par`` (default: one rank); any mismatch is an error."""
    values = rank_state.chunk_state_dict(model.config, par or single_rank_layout(model.config), get, *ranks)
    params = model.state_dict(keep_vars=True)
    expected = {k for k in params if not k.endswith("_extra_state") and not is_lora_param(k)}
    if values.keys() != expected:
        missing, extra = sorted(expected - values.keys()), sorted(values.keys() - expected)
        raise CheckpointError(f"{source} does not fit the model: no source for {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for name, value in values.items():
        target = params[name]
        if value.shape != target.shape:
            raise CheckpointError(
                f"{name} from {source} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}: config.json and weights disagree"
            )
        with torch.no_grad():
            target.copy_(value)
    if model.config.qlora:
        from npu_dsv3.lora.nf4_base import check_nf4_buffers

        check_nf4_buffers(model, source)


def _load_dist(config, directory: str):
    """megatron's own distributed-checkpoint load, at this model's (single-rank) layout."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from npu_dsv3.config import padded_vocab_size

    stored = dist_checkpointing.load_tensors_metadata(directory)
    rows = stored["embedding.word_embeddings.weight"].global_shape[0]
    if rows < padded_vocab_size(config.vocab_size):
        raise CheckpointError(f"{directory} has {rows} embedding rows for a vocabulary of {config.vocab_size}")
    model = build_model(config, padded_vocab=rows)
    try:
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
    except CheckpointingException as e:
        raise CheckpointError(f"{directory} does not fit the model in config.json ({e})") from e
    model.load_state_dict(state["model"])
    return model

"""Where this rank's layers and experts are: the model's side of ``npu_dsv3.layout``.

The builder takes its layers from the same ``PipelineLayout`` the checkpoint
converter writes with, built here from the config (megatron's PP / VPP sizes plus
our ``num_layer_list`` / ``noop_layers`` / ``schedules_method`` fields).

Layer numbers: megatron numbers layers from 1 and uses ``layer_number - 1`` as the
layer's index in distributed-checkpoint keys, in the MoE aux-loss tracker (sized by
``config.num_layers``) and to find the stage of the last layer. Real layers are
therefore numbered by their HF index (``real_layer + 1``); noop layers hold no
weights and take no number. ``layer_offset`` is what megatron's
``get_transformer_layer_offset`` returns for our configs (see ``model.patches``): the
real layers before the chunk, so ``layer_number - 1 - offset`` is the module index
of every real layer in a chunk whose noop layers, if any, come after its real ones.
"""

from typing import Optional

from megatron.core import parallel_state

from npu_dsv3.layout import LayoutError, PipelineLayout

DUALPIPEV = "dualpipev"


def pipeline_layout(config) -> PipelineLayout:
    """The placement of every layer, embedding, head and MTP layer for ``config``."""
    method = getattr(config, "schedules_method", None)
    if method not in (None, DUALPIPEV):
        raise LayoutError(f"--schedules-method {method!r} is not supported (only {DUALPIPEV!r})")
    noop = frozenset(getattr(config, "noop_layers", None) or ())
    total = config.num_layers + len(noop)
    pp = config.pipeline_model_parallel_size
    chunks = config.virtual_pipeline_model_parallel_size
    vpp_layers = None
    if method == DUALPIPEV and chunks != 2:
        raise LayoutError(f"dualpipev builds two model chunks per rank: megatron's "
                          f"virtual_pipeline_model_parallel_size must be 2, not {chunks}")
    if chunks is not None and method != DUALPIPEV:
        if total % (pp * chunks):
            raise LayoutError(f"--num-layers {total} does not split into {pp} pipeline ranks x {chunks} "
                              "virtual stages")
        vpp_layers = total // (pp * chunks)
    num_layer_list = getattr(config, "num_layer_list", None)
    return PipelineLayout(
        num_layers=total,
        pp=pp,
        vpp_layers=vpp_layers,
        num_layer_list=tuple(num_layer_list) if num_layer_list else None,
        noop_layers=noop,
        dualpipev=method == DUALPIPEV,
        mtp_num_layers=config.mtp_num_layers or 0,
    )


def stage(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """(pp rank, chunk) of a model chunk; the process's own pipeline rank by default."""
    if pp_rank is None:
        single = config.pipeline_model_parallel_size == 1
        pp_rank = 0 if single else parallel_state.get_pipeline_model_parallel_rank()
    return pp_rank, vp_stage or 0


def layer_offset(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None) -> int:
    """Real layers placed before this chunk's first layer, in global layer order."""
    layout = pipeline_layout(config)
    first = layout.chunk_layers(*stage(config, vp_stage, pp_rank))[0]
    return first - sum(1 for i in layout.noop_layers if i < first)


def check_expert_parallel(config) -> None:
    """``--moe-tp-extend-ep`` is megatron's expert parallelism over an EP x TP group with
    expert TP 1: megatron numbers expert rank ``e * TP + t`` for tensor rank t of the
    converter's EP rank e (TP ranks are adjacent), whose local experts
    ``(e * TP + t) * n + i`` are exactly what the converter writes into that rank's file."""
    if not getattr(config, "moe_tp_extend_ep", False):
        return
    tp, ep = config.tensor_model_parallel_size, config.expert_model_parallel_size
    if config.expert_tensor_parallel_size != 1 or ep % tp:
        raise LayoutError(
            f"--moe-tp-extend-ep needs expert_tensor_parallel_size 1 (not {config.expert_tensor_parallel_size}) "
            f"and expert_model_parallel_size = EP x TP, a multiple of TP {tp} (not {ep}); "
            "see npu_dsv3.model.placement.tp_extended_expert_sizes"
        )


def tp_extended_expert_sizes(tensor_parallel: int, expert_parallel: int) -> dict:
    """megatron's expert sizes (config and ``initialize_model_parallel``) for ``--moe-tp-extend-ep``
    with the EP of the flags: experts spread whole over the EP x TP ranks."""
    return {"expert_model_parallel_size": expert_parallel * tensor_parallel, "expert_tensor_parallel_size": 1}


def checkpoint_expert_rank(config, expert_rank: int) -> int:
    """The EP rank of the converter's file (``mp_rank_TT_EEE``) that megatron expert rank
    ``expert_rank`` reads: with ``--moe-tp-extend-ep`` megatron's expert rank is e * TP + t."""
    if getattr(config, "moe_tp_extend_ep", False):
        return expert_rank // config.tensor_model_parallel_size
    return expert_rank


def dualpipev_embedding_ranks(pp_ranks, *_):
    """``get_embedding_ranks`` for megatron's ``initialize_model_parallel`` under dualpipev: the
    embedding and MTP's copy of it both live on pipeline rank 0, so the group that keeps
    the copies equal is that rank alone (megatron's default pairs the first and last rank)."""
    return [pp_ranks[0]]

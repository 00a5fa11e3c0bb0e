"""One training iteration through megatron-core's own machinery.

The model is wrapped in megatron's DistributedDataParallel, the step runs
through megatron's pipeline schedule (``get_forward_backward_func``, which ``import
npu_dsv3`` makes run ``npu_dsv3.schedules.dualpipev`` for a dualpipev model), and
``finalize_model_grads`` reduces gradients and applies the aux-loss-free
expert-bias update (noaux_tc: bias += rate * sign(mean load - load)). The MTP
loss and the MoE aux losses are attached to the graph by megatron's
auto-scalers, so backward includes them with their coefficients.
"""

from functools import partial
from typing import Dict, Iterable, Iterator, List, Optional

import torch
from megatron.core import parallel_state, pipeline_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker,
                                                    reduce_aux_losses_tracker_across_ranks)
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper


def wrap_model(model, use_distributed_optimizer: bool = False) -> List[DistributedDataParallel]:
    """Model chunks wrapped for gradient reduction, with the grad finaliser and the pipeline's
    point-to-point mode installed."""
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    pipeline_p2p(config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer
    )
    return [DistributedDataParallel(config, ddp_config, model)]


def pipeline_p2p(config) -> None:
    """The interleaved schedule's point-to-point mode as Megatron-LM's training sets it: activations
    and gradients in separate exchanges, overlapped with compute.

    Without the overlap the schedule's steady state sends a rank's activation to the next rank and
    its input gradient to the previous one in one exchange; megatron-core's default batch of it
    (and its shape exchange under variable sequence lengths, always batched) posts the gradient
    first while the peer posts the activation's receive first. With two pipeline ranks next and
    previous are one peer, whose messages match in the order they are posted: the activation and
    the gradient arrive swapped.
    """
    if config.virtual_pipeline_model_parallel_size:
        config.batch_p2p_comm = False
        config.overlap_p2p_comm = True


def build_optimizer(model_chunks, lr: float, weight_decay: float = 0.0, clip_grad: float = 1.0,
                    use_distributed_optimizer: bool = False, bf16: bool = False, min_lr: float = 0.0):
    # min_lr: megatron's LR scheduler reads each parameter group's bounds, which come from here.
    config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, clip_grad=clip_grad, bf16=bf16,
        use_distributed_optimizer=use_distributed_optimizer, adam_beta1=0.9, adam_beta2=0.95,
    )
    return get_megatron_optimizer(config, model_chunks)


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    total = (per_token_loss.float().reshape(-1) * mask).sum()
    count = mask.sum()
    return total / count, {"lm loss": torch.stack([total.detach(), count])}


def _packed_seq_params(batch: Dict[str, torch.Tensor]) -> Optional[PackedSeqParams]:
    """Megatron's THD format for a batch that carries ``cu_seqlens`` (one [1, t] sequence of documents)."""
    cu_seqlens = batch.get("cu_seqlens")
    if cu_seqlens is None:
        return None
    # The true longest document: RoPE restarts positions per document only when the
    # rotary table is shorter than the whole pack (megatron's _apply_rotary_pos_emb_thd).
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _forward_step(data_iterator: Iterator[Dict[str, torch.Tensor]], model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], None, labels=batch["labels"], loss_mask=batch["loss_mask"],
        packed_seq_params=_packed_seq_params(batch),
    )
    return output, partial(_loss_func, batch["loss_mask"])


# megatron's tracker names of the aux losses each --moe-router-load-balancing-type adds.
_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                   "global_aux_loss": "global_load_balancing_loss"}


def _reduced_aux_losses(config, num_microbatches: int) -> Dict[str, float]:
    """Each MoE aux loss (without its coefficient) averaged over the MoE layers, reduced over
    pipeline stages, tensor / sequence shards and data-parallel ranks as megatron's training
    logs it. Every rank takes part, a stage without MoE layers with zeros."""
    if not config.num_moe_experts:
        return {}
    types = config.moe_router_load_balancing_type
    types = types if isinstance(types, list) else [types]
    names = [name for kind, name in _AUX_LOSS_NAMES.items() if kind in types]
    if config.moe_z_loss_coeff:
        names.append("z_loss")
    tracker = get_moe_layer_wise_logging_tracker()
    layers = config.num_layers + (config.mtp_num_layers or 0)
    for name in names:
        tracker.setdefault(name, {"values": torch.zeros(layers, device=torch.cuda.current_device()),
                                  "reduce_group": None, "avg_group": None, "reduce_group_has_dp": False})
    reduce_aux_losses_tracker_across_ranks(names)
    return {name: _mean_over_moe_layers(tracker[name]["values"]) / num_microbatches for name in names}


def _mean_over_moe_layers(per_layer: torch.Tensor) -> float:
    """megatron tracks one (coefficient-free) value per layer, zero for dense layers."""
    nonzero = per_layer[per_layer != 0]
    return nonzero.mean().item() if nonzero.numel() else 0.0


def train_step(model_chunks, optimizer, data_iterator, num_microbatches: int, seq_length: int,
               micro_batch_size: int) -> Dict[str, float]:
    """Forward/backward over ``num_microbatches`` and one optimizer step.

    Returns the token-weighted lm loss, the MTP loss per depth, each MoE aux
    loss averaged over MoE layers (without its coefficient) and the grad norm.
    """
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # megatron's tracker is process-global and sized by the first model that logs;
    # emptying it (not just zeroing) keeps it right for whichever model steps now.
    get_moe_layer_wise_logging_tracker().clear()
    # The schedule copies this step's loss scale into this class-level tensor; one left
    # behind by a backward outside the schedule (a 0-d default) has the wrong shape for it.
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    losses = pipeline_parallel.get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=_per_chunk(model_chunks, data_iterator),
        model=model_chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    mtp_tracker = MTPLossLoggingHelper.tracker
    # Each rank tracked its own tokens: the logged loss is the whole batch's, as megatron logs it.
    MTPLossLoggingHelper.reduce_loss_in_tracker()
    mtp_losses = mtp_tracker.get("values") if mtp_tracker else None
    if mtp_losses is not None:
        mtp_losses = (mtp_losses / num_microbatches).tolist()
        MTPLossLoggingHelper.clean_loss_in_tracker()
    aux = _reduced_aux_losses(model_chunks[0].config, num_microbatches)
    update_ok, grad_norm, _ = optimizer.step()
    result = {"grad_norm": grad_norm, "update_successful": update_ok, "mtp_loss": mtp_losses, **aux}
    if losses:  # only the last pipeline stage computes the loss
        summed = _global_sum(losses)
        result["lm_loss"] = (summed[0] / summed[1]).item()
    return result


def _per_chunk(model_chunks, data_iterator):
    if len(model_chunks) == 1:
        return data_iterator
    # The interleaved and DualPipeV schedules read each chunk's micro-batches from that chunk's own iterator.
    microbatches = list(data_iterator)
    return [iter(microbatches) for _ in model_chunks]


def _global_sum(losses) -> torch.Tensor:
    """(loss sum, token count) over the micro-batches and the data-parallel ranks: its ratio is the
    token-weighted mean one process computing the whole global batch reports."""
    summed = torch.stack([x["lm loss"] for x in losses]).sum(0)
    if parallel_state.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(summed, group=parallel_state.get_data_parallel_group())
    return summed


def evaluate(model_chunks, batches: Iterable[Iterator[Dict[str, torch.Tensor]]], num_microbatches: int,
             seq_length: int, micro_batch_size: int) -> Optional[float]:
    """The token-weighted lm loss of forward-only passes over ``batches`` (each one global batch's
    micro-batches), on the last pipeline stage; None elsewhere.

    In eval mode and without autograd nothing that training accumulates moves: no dropout, no
    MoE aux-loss or MTP-loss tracking, no expert-bias token counts, no gradients.
    """
    for chunk in model_chunks:
        chunk.eval()
    total = None
    try:
        with torch.no_grad():
            for microbatches in batches:
                losses = pipeline_parallel.get_forward_backward_func()(
                    forward_step_func=_forward_step, data_iterator=_per_chunk(model_chunks, microbatches),
                    model=model_chunks, num_microbatches=num_microbatches, seq_length=seq_length,
                    micro_batch_size=micro_batch_size, forward_only=True)
                if losses:
                    summed = _global_sum(losses)
                    total = summed if total is None else total + summed
    finally:
        for chunk in model_chunks:
            chunk.train()
    return None if total is None else (total[0] / total[1]).item()

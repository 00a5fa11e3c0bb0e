"""Build DeepSeek-V3 as a megatron-core ``GPTModel``."""

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.experts import GroupedMLP, SequentialMLP

from npu_dsv3.config import padded_vocab_size
from npu_dsv3.layout import LayoutError
from npu_dsv3.model.placement import check_expert_parallel, pipeline_layout, stage
from npu_dsv3.model.spec import decoder_block_spec, mtp_block_spec
from npu_dsv3.model.vocab import mask_vocab_padding


def _check_head_holds_last_layer(config, layout) -> None:
    """With MTP megatron puts the final norm beside the last real layer, the converter on the
    head's chunk: they must be the same chunk."""
    if not config.mtp_num_layers:
        return
    last = max(i for i in range(layout.num_layers) if i not in layout.noop_layers)
    if last not in layout.chunk_layers(*layout.last_stage()):
        raise LayoutError(f"with MTP the last real layer ({last}) must be on the chunk of the head "
                          f"{layout.last_stage()}; move --noop-layers so that chunk keeps a real layer")


def build_model(config, pre_process=None, post_process=None, vp_stage=None, padded_vocab=None) -> GPTModel:
    """The model chunk for this pipeline rank and virtual stage, as ``placement.pipeline_layout``
    places it; pre/post (embedding; final norm and head) default to that layout's.

    ``padded_vocab``: the embedding rows when they must match another layout's padding
    (a distributed checkpoint for TP 8 written from one process).
    """
    layout = pipeline_layout(config)
    check_expert_parallel(config)
    _check_head_holds_last_layer(config, layout)
    here = stage(config, vp_stage)
    if pre_process is None:
        pre_process = here == layout.first_stage()
    if post_process is None:
        post_process = layout.has_head(*here)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, vp_stage=vp_stage),
        vocab_size=padded_vocab or padded_vocab_size(config.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        # MLA owns its (YaRN) rotary embedding; GPTModel must not add another.
        position_embedding_type="none",
        mtp_block_spec=mtp_block_spec(config, vp_stage=vp_stage),
        vp_stage=vp_stage,
    )
    if getattr(model, "output_layer", None) is not None:
        mask_vocab_padding(model.output_layer, config.vocab_size)
    _reduce_expert_grads_over_expert_data_parallel(model, config)
    if config.qlora:
        from npu_dsv3.lora.nf4_base import apply_nf4_base

        apply_nf4_base(model, config)
    if config.lora_rank:
        from npu_dsv3.lora.layers import apply_lora

        apply_lora(model, config)
    return model


def _reduce_expert_grads_over_expert_data_parallel(model, config) -> None:
    """With EP 1 megatron marks the routed experts' weights for the dense data-parallel gradient
    reduction (their ``allreduce`` attribute). When the experts are not split like attention
    (--expert-tensor-parallel-size != --tensor-model-parallel-size), the tensor-parallel ranks hold
    the same experts and route them different tokens: those gradients must be summed over the
    expert data-parallel group, which spans them, as they are with EP > 1."""
    etp = config.expert_tensor_parallel_size or config.tensor_model_parallel_size
    if not config.num_moe_experts or config.expert_model_parallel_size > 1 or etp == config.tensor_model_parallel_size:
        return
    for module in model.modules():
        if isinstance(module, (GroupedMLP, SequentialMLP)):
            for param in module.parameters():
                param.allreduce = False


def forward_logits(model: GPTModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Main-head logits ``[batch, seq, vocab_size]`` (vocab padding removed), no MTP.

    megatron's GPTModel runs the MTP block whenever it exists and then requires
    labels; inference through the main head (what transformers computes) skips it.
    """
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
    mtp_process, mtp_layers = model.mtp_process, model.config.mtp_num_layers
    model.mtp_process, model.config.mtp_num_layers = False, None
    try:
        logits = model(input_ids, position_ids, attention_mask=None)
    finally:
        model.mtp_process, model.config.mtp_num_layers = mtp_process, mtp_layers
    return logits[..., : model.config.vocab_size]

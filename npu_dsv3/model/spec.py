"""DeepSeek-V3 layer specs on megatron-core without TransformerEngine.

Every layer: RMSNorm -> MLA (q/kv low-rank projections, RMSNorm on the latents,
our core attention) -> RMSNorm -> dense SwiGLU MLP (first k layers) or MoE
(DeepSeek-V3 router, grouped-GEMM routed experts, shared experts).

Which layers a (pipeline rank, virtual stage) builds, and whether it has the MTP
block, comes from ``npu_dsv3.model.placement.pipeline_layout`` (the converter's
layout); whether a layer is dense or MoE from its real (HF) layer index.
"""

from typing import Optional

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mtp_layer_spec_for_backend
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionBlockSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from npu_dsv3.config import moe_layer_pattern_of
from npu_dsv3.model.linear import DuplicatedLinear
from npu_dsv3.model.activation import SwiGLU
from npu_dsv3.model.attention import MLACoreAttention, SplitMLASelfAttention
from npu_dsv3.model.experts import GroupedExperts
from npu_dsv3.model.layers import NoopTransformerLayer, PlacedTransformerLayer
from npu_dsv3.model.moe_layer import DeepSeekV3MoELayer
from npu_dsv3.model.norm import LatentRMSNorm, RMSNorm
from npu_dsv3.model.placement import pipeline_layout, stage
from npu_dsv3.model.router import DeepSeekV3Router


class DeepSeekV3SpecProvider(LocalSpecProvider):
    """megatron-core's local modules, with ours where DeepSeek-V3 needs them."""

    def layer_norm(self, rms_norm: bool = True, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> type:
        return MLACoreAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm):
        """--moe-grouped-gemm: grouped GEMMs (ops.gmm), else megatron's per-expert loop."""
        if moe_use_grouped_gemm:
            return GroupedExperts, None
        return SequentialMLP, _mlp_submodules()

    def activation_func(self) -> type:
        return SwiGLU


BACKEND = DeepSeekV3SpecProvider()


def _mlp_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear, activation_func=SwiGLU)


def moe_spec(grouped_gemm: bool) -> ModuleSpec:
    experts, expert_submodules = BACKEND.grouped_mlp_modules(grouped_gemm, False)
    return ModuleSpec(
        module=DeepSeekV3MoELayer,
        submodules=MoESubmodules(
            experts=ModuleSpec(module=experts, submodules=expert_submodules),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=_mlp_submodules()),
            router=DeepSeekV3Router,
        ),
    )


def layer_spec(moe: bool, grouped_gemm: bool = True, mla_mm_split: bool = False,
               real_layer: Optional[int] = None) -> ModuleSpec:
    """One decoder layer; ``real_layer`` (its HF index) when the pipeline layout places it."""
    return ModuleSpec(
        module=TransformerLayer if real_layer is None else PlacedTransformerLayer,
        params={} if real_layer is None else {"real_layer": real_layer},
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SplitMLASelfAttention if mla_mm_split else MLASelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=ColumnParallelLinear,
                    linear_q_down_proj=DuplicatedLinear,
                    linear_q_up_proj=ColumnParallelLinear,
                    linear_kv_down_proj=DuplicatedLinear,
                    linear_kv_up_proj=ColumnParallelLinear,
                    core_attention=MLACoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=LatentRMSNorm,
                    kv_layernorm=LatentRMSNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=moe_spec(grouped_gemm) if moe else ModuleSpec(module=MLP, submodules=_mlp_submodules()),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def noop_layer_spec(followed_by_real: bool) -> ModuleSpec:
    return ModuleSpec(module=NoopTransformerLayer, params={"followed_by_real": followed_by_real})


def decoder_block_spec(config, vp_stage=None, pp_rank=None) -> TransformerBlockSubmodules:
    """Specs of the decoder layers this (pp rank, virtual stage) builds, plus the final norm."""
    layout, pattern = pipeline_layout(config), moe_layer_pattern_of(config)
    real = [layout.real_layer(i) for i in layout.chunk_layers(*stage(config, vp_stage, pp_rank))]
    specs = []
    for position, hf_index in enumerate(real):
        if hf_index is None:
            specs.append(noop_layer_spec(any(r is not None for r in real[position + 1:])))
        else:
            specs.append(layer_spec(bool(pattern[hf_index]), config.moe_grouped_gemm, config.mla_mm_split, hf_index))
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def mtp_block_spec(config, vp_stage=None, pp_rank=None):
    """The MTP block on the chunk the layout gives the head; MTP layers reuse the MoE
    decoder layer, as DeepSeek-V3's MTP module does."""
    if not config.mtp_num_layers or not pipeline_layout(config).has_head(*stage(config, vp_stage, pp_rank)):
        return None
    layer = layer_spec(bool(config.num_moe_experts), config.moe_grouped_gemm, config.mla_mm_split)
    return MultiTokenPredictionBlockSubmodules(
        layer_specs=[get_mtp_layer_spec_for_backend(layer, BACKEND)] * config.mtp_num_layers
    )

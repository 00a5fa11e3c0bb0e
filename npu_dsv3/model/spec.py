"""DeepSeek-V3 layer specs on megatron-core without TransformerEngine.

Every layer: RMSNorm -> MLA (q/kv low-rank projections, RMSNorm on the latents,
our core attention) -> RMSNorm -> dense SwiGLU MLP (first k layers) or MoE
(DeepSeek-V3 router, grouped-GEMM routed experts, shared experts).
"""

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec_for_backend
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_latent_attention import MLASelfAttention, MLASelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from npu_dsv3.config import moe_layer_pattern as config_moe_layer_pattern
from npu_dsv3.model.activation import SwiGLU
from npu_dsv3.model.attention import MLACoreAttention
from npu_dsv3.model.experts import GroupedExperts
from npu_dsv3.model.moe_layer import DeepSeekV3MoELayer
from npu_dsv3.model.norm import LatentRMSNorm, RMSNorm
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


def layer_spec(moe: bool, grouped_gemm: bool = True) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=MLASelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=MLASelfAttentionSubmodules(
                    linear_q_proj=ColumnParallelLinear,
                    linear_q_down_proj=ColumnParallelLinear,
                    linear_q_up_proj=ColumnParallelLinear,
                    linear_kv_down_proj=ColumnParallelLinear,
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


def moe_layer_pattern(config) -> list:
    """1 for an MoE layer, 0 for a dense one, for every global layer."""
    freq = config.moe_layer_freq
    if not config.num_moe_experts:
        return [0] * config.num_layers
    if isinstance(freq, int):  # megatron's int form: MoE iff i % freq == 0
        return config_moe_layer_pattern(config.num_layers, 0, freq)
    if len(freq) != config.num_layers:
        raise ValueError(f"moe_layer_freq lists {len(freq)} layers, the model has {config.num_layers}")
    return list(freq)


def decoder_block_spec(config, vp_stage=None, pp_rank=None) -> TransformerBlockSubmodules:
    """Specs of the decoder layers this (pp rank, virtual stage) builds, plus the final norm."""
    specs = [layer_spec(bool(m), config.moe_grouped_gemm) for m in moe_layer_pattern(config)]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=RMSNorm)


def mtp_block_spec(config, vp_stage=None, pp_rank=None):
    """MTP layers reuse the MoE decoder layer, as DeepSeek-V3's MTP module does."""
    if not config.mtp_num_layers:
        return None
    return get_gpt_mtp_block_spec_for_backend(
        config, layer_spec(bool(config.num_moe_experts), config.moe_grouped_gemm), BACKEND,
        vp_stage=vp_stage, pp_rank=pp_rank,
    )

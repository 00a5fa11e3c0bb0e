"""Model FLOPs of a DeepSeek-V3 training step: what TFLOPS/device and MFU are computed from.

Counted per token as 2 FLOPs per multiply-accumulate of every matmul the model
runs: MLA's down/up projections (or the plain q projection), attention scores
and values, the output projection; the dense MLP or, in MoE layers, the router,
the shared experts and only the ``top-k`` routed experts a token visits; the
output head; and each MTP depth (its eh_proj, one MoE layer, the shared head).
Causal attention counts the half of the score matrix that is computed. A
training step is 3x the forward (backward = 2x); recomputation is not counted,
as usual for model FLOPs. Norms, activations, softmax and the embedding lookup
are left out (a fraction of a percent).
"""

from npu_dsv3.config import moe_layer_pattern_of


def _attention_macs(config, seq_length: int, causal: bool) -> float:
    """Multiply-accumulates of one MLA layer, per token."""
    h, heads = config.hidden_size, config.num_attention_heads
    qk, rope, v = config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim
    if config.q_lora_rank is None:
        q = h * heads * (qk + rope)
    else:
        q = h * config.q_lora_rank + config.q_lora_rank * heads * (qk + rope)
    kv = h * (config.kv_lora_rank + rope) + config.kv_lora_rank * heads * (qk + v)
    # Keys a query sees: all of them, or on average (seq + 1) / 2 under the causal mask.
    keys = (seq_length + 1) / 2 if causal else seq_length
    scores = heads * keys * (qk + rope + v)
    return q + kv + scores + heads * v * h


def _mlp_macs(config, moe: bool) -> float:
    h = config.hidden_size
    if not moe:
        return 3 * h * config.ffn_hidden_size
    shared = config.moe_shared_expert_intermediate_size or 0
    return h * config.num_moe_experts + 3 * h * (config.moe_router_topk * config.moe_ffn_hidden_size + shared)


def forward_flops_per_token(config, seq_length: int, causal: bool = True, mtp: bool = True,
                            vocab_size: int = None) -> float:
    """Forward FLOPs per token of the whole model (``mtp=False``: the main model only).
    ``vocab_size``: the head's rows as run (megatron's padded vocabulary; default the real one)."""
    vocab = vocab_size or config.vocab_size
    macs = config.hidden_size * vocab
    for moe in moe_layer_pattern_of(config):
        macs += _attention_macs(config, seq_length, causal) + _mlp_macs(config, bool(moe))
    if mtp:
        h = config.hidden_size
        depth = _attention_macs(config, seq_length, causal) + _mlp_macs(config, bool(config.num_moe_experts))
        macs += (config.mtp_num_layers or 0) * (2 * h * h + depth + h * vocab)
    return 2.0 * macs


def train_flops(config, seq_length: int, tokens: int, vocab_size: int = None) -> float:
    """Model FLOPs of a training step over ``tokens`` tokens of ``seq_length``-long sequences."""
    return 3.0 * forward_flops_per_token(config, seq_length, vocab_size=vocab_size) * tokens

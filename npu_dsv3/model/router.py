"""DeepSeek-V3's router: sigmoid scores, aux-loss-free expert bias, group-limited top-k.

megatron-core's generic top-k differs from DeepSeek-V3 in two ways that change
which experts a token reaches, so the selection is ours:
- a group's score is the sum of its two best biased scores (DeepSeek-V3's
  definition), not of ``topk // group_topk`` scores;
- ``norm_topk_prob=False`` leaves the selected sigmoid scores unnormalised.
Aux losses, z-loss and the expert-bias token counting stay megatron's.
"""

from typing import Optional, Tuple

import torch
from megatron.core.transformer.moe.moe_utils import compute_routing_scores_for_aux_loss
from megatron.core.transformer.moe.router import TopKRouter

GROUP_SCORE_TOPK = 2


def deepseek_v3_topk(
    logits: torch.Tensor,
    topk: int,
    expert_bias: Optional[torch.Tensor],
    num_groups: Optional[int],
    group_topk: Optional[int],
    norm_topk_prob: bool,
    scaling_factor: Optional[float],
    score_function: str = "sigmoid",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return dense ``probs`` and boolean ``routing_map``, both ``[tokens, experts]``."""
    num_tokens, num_experts = logits.shape
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits.float())
    else:
        scores = torch.softmax(logits.float(), dim=-1)
    choice = scores if expert_bias is None else scores + expert_bias.float()
    if num_groups and num_groups > 1 and group_topk:
        per_group = choice.view(num_tokens, num_groups, num_experts // num_groups)
        group_scores = per_group.topk(min(GROUP_SCORE_TOPK, per_group.shape[-1]), dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(group_topk, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.repeat_interleave(num_experts // num_groups, dim=1).bool()
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    top_idx = choice.topk(topk, dim=-1, sorted=False)[1]
    top_probs = scores.gather(1, top_idx)
    if norm_topk_prob:
        top_probs = top_probs / (top_probs.sum(-1, keepdim=True) + 1e-20)
    if scaling_factor:
        top_probs = top_probs * scaling_factor
    probs = torch.zeros_like(scores).scatter(1, top_idx, top_probs).type_as(logits)
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, top_idx, True)
    return probs, routing_map


class DeepSeekV3Router(TopKRouter):
    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq_length, bsz = logits.shape[:2]
        logits = logits.view(-1, self.config.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        cfg = self.config
        probs, routing_map = deepseek_v3_topk(
            logits,
            self.topk,
            self.expert_bias,
            cfg.moe_router_num_groups,
            cfg.moe_router_group_topk,
            getattr(cfg, "moe_router_norm_topk_prob", True),
            cfg.moe_router_topk_scaling_factor,
            self.score_function,
        )
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_map, aux_scores = compute_routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, fused=False, padding_mask=padding_mask
            )
            with_mask = padding_mask is not None
            probs = self._apply_aux_loss(probs, aux_scores, aux_map, with_padding_mask=with_mask)
            probs = self._apply_seq_aux_loss(
                probs, aux_scores, aux_map, seq_length, bsz, with_padding_mask=with_mask
            )
            probs = self._apply_global_aux_loss(probs, aux_scores, aux_map, with_padding_mask=with_mask)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map

"""MoE token permutation by routing map.

``permute(tokens, routing_map, probs=None, num_out_tokens=None)`` returns
``(permuted_tokens, permuted_probs, sorted_indices)``: rows grouped by expert
(expert-major, tokens ascending within an expert), with each row's routing
probability. ``unpermute(permuted_tokens, sorted_indices, restore_shape)``
sums every token's expert outputs back into place. ``sorted_indices`` is only
meant for ``unpermute`` of the same path.

- NPU: ``torch_npu.npu_moe_token_permute(tokens, indices, num_out_tokens)`` /
  ``npu_moe_token_unpermute(permuted, sorted_indices, probs)`` on the top-k
  expert indices, when every token has the same number of experts (no
  capacity dropping); otherwise the portable path. Unpermute passes unit
  probs: without probs the op takes topK = 1 and sums nothing.
- Portable: megatron-core's own index-select permutation (``moe_utils.permute``
  / ``unpermute``), which is already loop-free.
"""

from typing import Optional, Tuple

import torch
from megatron.core.transformer.moe import moe_utils

from npu_dsv3.ops._npu import on_npu, torch_npu


def _permuted_probs(probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    # Same order as the permuted rows: expert-major, tokens ascending.
    return probs.t().contiguous().masked_select(routing_map.t().contiguous())


def _topk_indices(routing_map: torch.Tensor) -> Optional[torch.Tensor]:
    """[T, K] expert indices (ascending per token), or None where the NPU path does not apply:
    no tokens, no experts chosen, or tokens with different expert counts."""
    per_token = routing_map.sum(-1)
    topk = int(per_token[0]) if per_token.numel() else 0
    if topk == 0 or not bool((per_token == topk).all()):
        return None
    return routing_map.nonzero()[:, 1].view(routing_map.shape[0], topk)


def npu_permute(tokens, routing_map, probs=None, num_out_tokens=None):
    indices = _topk_indices(routing_map)
    if indices is None:
        raise ValueError("npu_moe_token_permute needs the same number of experts for every token")
    permuted, sorted_indices = torch_npu().npu_moe_token_permute(
        tokens, indices.to(torch.int32), num_out_tokens=num_out_tokens
    )
    permuted_probs = None if probs is None else _permuted_probs(probs, routing_map)
    return permuted, permuted_probs, sorted_indices


def npu_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None):
    # Without probs npu_moe_token_unpermute takes topK = 1 and only un-sorts the rows; [T, K]
    # weights (the routing probs, or ones) make it sum each token's K expert rows.
    num_tokens = restore_shape[0]
    if num_tokens == 0:
        return permuted_tokens.new_zeros(restore_shape) + permuted_tokens.sum() * 0
    if probs is not None:
        weights = probs.gather(1, _topk_indices(routing_map)).to(permuted_tokens.dtype)
    else:
        weights = permuted_tokens.new_ones(num_tokens, sorted_indices.numel() // num_tokens)
    return torch_npu().npu_moe_token_unpermute(permuted_tokens, sorted_indices, weights).view(restore_shape)


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    num_out_tokens: Optional[int] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    if routing_map.shape[0] != tokens.shape[0]:
        raise ValueError(f"routing_map has {routing_map.shape[0]} rows for {tokens.shape[0]} tokens")
    if on_npu(tokens) and _topk_indices(routing_map) is not None:
        return npu_permute(tokens, routing_map, probs, num_out_tokens)
    return moe_utils.permute(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens)


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape: torch.Size,
    probs: Optional[torch.Tensor] = None,
    routing_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``routing_map`` is the one given to ``permute``: it tells which path produced ``sorted_indices``."""
    if on_npu(permuted_tokens) and routing_map is not None and _topk_indices(routing_map) is not None:
        return npu_unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map)
    return moe_utils.unpermute(permuted_tokens, sorted_indices, restore_shape, probs=probs, routing_map=routing_map)

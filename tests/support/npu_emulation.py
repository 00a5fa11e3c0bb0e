"""EMULATION of the documented ``torch_npu`` semantics, in plain torch. Tests only.

This module is a test double. It lets the NPU code paths of ``npu_dsv3.ops``
(the ``npu_*`` functions) run on CPU tensors, so the tests can check OUR
calling conventions against what the Ascend documentation says each API does:
argument names, layouts, cumulative vs per-group counts, masks, shapes, dtypes.
It makes NO claim about NPU numerics, speed or memory, and passing tests here
are not NPU results; only ``pytest -m npu`` on Ascend hardware measures those.

Only what ``npu_dsv3.ops`` calls is emulated, and each function refuses inputs
the documentation rules out (so a wrong convention fails a test instead of
silently producing numbers). Anything documented but not used by us raises
``NotImplementedError`` rather than guessing. Sources: the torch_npu API
reference (op-plugin ``docs/context/torch_npu-*.md``, the op-plugin
``op_plugin_functions.yaml`` signatures) and the CANN aclnn pages for
MoeTokenPermute / MoeTokenUnpermute.

Note: torch_npu has no ``npu_gmm``; that name (cumulative ``group_list``,
``group_type``) belongs to MindSpeed's ``mindspeed.ops.gmm``. torch_npu's grouped
GEMM is ``npu_grouped_matmul``, which is what is emulated here; a call to
``torch_npu.npu_gmm`` fails against this module as it would on hardware.

Every function is built from differentiable torch ops, so backward paths that
call them (directly or through our autograd Functions) can be tested.

Knobs (set them with ``monkeypatch.setattr`` on this module):

- ``REQUIRE_PADDED_HEAD_DIM`` (default True): the OLDER-CANN behaviour of
  ``npu_fusion_attention`` that our padding exists for: q, k and v must share
  one head dim that is a multiple of ``HEAD_DIM_MULTIPLE``. With it False the
  current documented rule applies (Dq == Dk, Dk >= Dv, D <= 768; DESIGN.md dates
  it to CANN >= 8.2.RC1, not verified here). The multiple-of-128 rule is this
  project's conservative stand-in for the old constraint, not a quotation of it.

``calls`` records (name, details) for every call, so tests can assert on what
was passed (e.g. that ``group_list`` was the cumulative count).
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

REQUIRE_PADDED_HEAD_DIM = True
HEAD_DIM_MULTIPLE = 128
MAX_HEAD_DIM = 768
CAUSAL_MASK_SIZE = 2048
MAX_GMM_GROUPS = 1024
MAX_PERMUTE_TOPK = 512
MAX_ROTARY_HEAD_DIM = 896

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

calls: List[tuple] = []


def _record(name: str, **details) -> None:
    calls.append((name, details))


def _require(cond: bool, message: str, exc=ValueError) -> None:
    if not cond:
        raise exc(f"[torch_npu emulation] {message}")


def _dtype_ok(*tensors: torch.Tensor) -> None:
    for t in tensors:
        _require(t.dtype in _FLOATS, f"dtype {t.dtype} is not one of float16/bfloat16/float32", TypeError)


# --------------------------------------------------------------------------- grouped matmul


def npu_grouped_matmul(x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                       activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                       group_list_type=0, act_type=0, output_dtype=None, tuning_config=None) -> List[torch.Tensor]:
    """Non-quantised, single-tensor ``x``/``weight``/``y`` grouped GEMM (split_item 2/3).

    - group_type 0 (split M): x [M, K] (not transposed), weight [E, K, N] (may be a
      transposed view), y [M, N]; rows ``group_list[e-1]:group_list[e]`` of x use weight[e].
    - group_type 2 (split K): x [K, M] (e.g. ``x.t()``), weight [M, N], y [E, K, N];
      group e reduces over columns/rows ``group_list[e-1]:group_list[e]`` of the M axis.

    ``group_list`` is a 1-D int64 tensor: cumulative ends (group_list_type 0, non-negative,
    non-decreasing, last == M) or per-group sizes (type 1, non-negative, length != 1, sum == M).
    """
    for name, value in dict(bias=bias, scale=scale, offset=offset, antiquant_scale=antiquant_scale,
                            antiquant_offset=antiquant_offset, per_token_scale=per_token_scale,
                            activation_input=activation_input, activation_quant_scale=activation_quant_scale,
                            activation_quant_offset=activation_quant_offset, tuning_config=tuning_config,
                            output_dtype=output_dtype).items():
        _require(value is None, f"npu_grouped_matmul: `{name}` is not emulated (training passes None)",
                 NotImplementedError)
    _require(act_type == 0, "npu_grouped_matmul: activations are not emulated", NotImplementedError)
    _require(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)),
             "npu_grouped_matmul takes Tensor[] for x and weight (pass [x], [weight])", TypeError)
    _require(len(x) == 1 and len(weight) == 1,
             "only single-tensor x and weight are emulated", NotImplementedError)
    _require(group_type is not None, "npu_grouped_matmul requires group_type to be passed explicitly")
    _require(group_type in (0, 2), f"group_type {group_type} is not emulated (0 = split M, 2 = split K)",
             NotImplementedError)
    _require(split_item in (2, 3), f"single-tensor y needs split_item 2 or 3, got {split_item}")
    _require(isinstance(group_list, torch.Tensor), "group_list must be a Tensor when group_type is given",
             TypeError)
    _require(group_list.dim() == 1 and group_list.dtype == torch.int64,
             f"group_list must be 1-D int64, got {tuple(group_list.shape)} {group_list.dtype}", TypeError)
    _require(group_list_type in (0, 1), f"group_list_type {group_list_type} is not emulated", NotImplementedError)
    a, w = x[0], weight[0]
    _dtype_ok(a, w)
    _require(a.dtype == w.dtype, f"x {a.dtype} and weight {w.dtype} must share a dtype", TypeError)
    values = [int(v) for v in group_list.tolist()]
    _require(all(v >= 0 for v in values), f"group_list must be non-negative, got {values}")
    if group_list_type == 0:
        _require(all(b >= a_ for a_, b in zip(values, values[1:])),
                 f"group_list (cumulative, group_list_type 0) must be non-decreasing, got {values}")
        ends = values
    else:
        _require(len(values) != 1, "group_list of per-group sizes (group_list_type 1) cannot have length 1")
        ends = torch.tensor(values).cumsum(0).tolist() if values else []
    groups = len(values)
    _require(0 < groups <= MAX_GMM_GROUPS, f"group_list length must be in 1..{MAX_GMM_GROUPS}, got {groups}")
    starts = [0] + ends[:-1]
    _record("npu_grouped_matmul", group_type=group_type, group_list=values, group_list_type=group_list_type,
            split_item=split_item, x_shape=tuple(a.shape), weight_shape=tuple(w.shape))

    if group_type == 0:
        _require(a.dim() == 2 and w.dim() == 3, f"group_type 0 needs x 2-D and weight 3-D, got {a.dim()}-D "
                                                f"and {w.dim()}-D")
        _require(a.is_contiguous(), "x must not be transposed (row-major contiguous) for group_type 0")
        _require(w.shape[0] == groups, f"weight has {w.shape[0]} groups, group_list {groups}")
        _require(a.shape[1] == w.shape[1], f"x K {a.shape[1]} != weight K {w.shape[1]}")
        _require(ends[-1] == a.shape[0], f"group_list must end at the rows of x ({a.shape[0]}), got {ends[-1]}")
        pieces = [a[s:e].float() @ w[g].float() for g, (s, e) in enumerate(zip(starts, ends))]
        return [torch.cat(pieces, 0).to(a.dtype)]

    _require(a.dim() == 2 and w.dim() == 2, f"group_type 2 needs x and weight 2-D, got {a.dim()}-D and {w.dim()}-D")
    _require(a.shape[1] == w.shape[0], f"x [K, M] {tuple(a.shape)} and weight [M, N] {tuple(w.shape)} disagree on M")
    _require(ends[-1] == a.shape[1], f"group_list must end at the M axis of x ({a.shape[1]}), got {ends[-1]}")
    blocks = [a[:, s:e].float() @ w[s:e].float() for s, e in zip(starts, ends)]
    return [torch.stack(blocks, 0).to(a.dtype)]


# --------------------------------------------------------------------------- fusion attention

_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


def _cumulative(name: str, values, total: int) -> List[int]:
    _require(values is not None, f"input_layout TND needs {name} (cumulative sequence ends)")
    vals = [int(v) for v in values]
    while len(vals) > 1 and vals[-1] == 0:  # trailing zeros: batches that do not take part
        vals.pop()
    _require(len(vals) > 0 and all(v >= 0 for v in vals), f"{name} must be non-negative, got {list(values)}")
    _require(all(b >= a for a, b in zip(vals, vals[1:])),
             f"{name} holds CUMULATIVE lengths and must be non-decreasing, got {list(values)}")
    _require(vals[-1] == total, f"{name} must end at T={total}, got {vals[-1]}")
    return vals


def _to_bnsd(t: torch.Tensor, layout: str, heads: Optional[int], head_dim: Optional[int]) -> torch.Tensor:
    if layout in ("BSH", "SBH"):
        _require(t.dim() == 3, f"{layout} tensors are 3-D, got {tuple(t.shape)}")
        if heads is None:
            _require(t.shape[-1] % head_dim == 0, f"hidden {t.shape[-1]} is not a multiple of D {head_dim}")
            heads = t.shape[-1] // head_dim
        _require(t.shape[-1] % heads == 0, f"hidden {t.shape[-1]} is not a multiple of N {heads}")
        t = t if layout == "BSH" else t.transpose(0, 1)
        return t.reshape(t.shape[0], t.shape[1], heads, t.shape[-1] // heads).transpose(1, 2)
    _require(t.dim() == 4, f"{layout} tensors are 4-D, got {tuple(t.shape)}")
    return t.transpose(1, 2) if layout == "BSND" else t


def _from_bnsd(out: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BNSD":
        return out
    bsnd = out.transpose(1, 2)
    if layout == "BSND":
        return bsnd
    bsh = bsnd.reshape(bsnd.shape[0], bsnd.shape[1], -1)
    return bsh if layout == "BSH" else bsh.transpose(0, 1)


def _allowed(sq: int, skv: int, sparse_mode: int, atten_mask, pre: int, nxt: int, device) -> Optional[torch.Tensor]:
    """[sq, skv] bool, True = attend; None = no masking at all."""
    if atten_mask is None:
        return None  # documented: without atten_mask, sparse_mode / pre / next tokens have no effect
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(skv, device=device).unsqueeze(0)
    if sparse_mode == 0:
        allowed = ~atten_mask.bool()[..., :sq, :skv]
        return allowed & ((j - i) <= nxt) & ((i - j) <= pre)
    if sparse_mode == 2:  # leftUpCausal
        return (j <= i).expand(sq, skv)
    if sparse_mode == 3:  # rightDownCausal
        return (j - (skv - sq) <= i).expand(sq, skv)
    # sparse_mode 4: band between pre and next tokens, origin at the bottom-right corner
    diag = (j - i) - (skv - sq)
    return ((diag <= nxt) & (-diag <= pre)).expand(sq, skv)


def _attend(q, k, v, allowed, scale, keep_prob):
    """q [N, Sq, D], k [Nkv, Skv, D], v [Nkv, Skv, Dv] -> [N, Sq, Dv] (plus row max / sum)."""
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, 0)
    v = v.repeat_interleave(group, 0)
    scores = torch.einsum("nsd,ntd->nst", q.float(), k.float()) * scale
    if allowed is not None:
        allowed = allowed.expand_as(scores) if allowed.dim() == 2 else allowed
        scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    row_max = scores.amax(-1, keepdim=True)
    row_sum = torch.exp(scores - row_max).sum(-1, keepdim=True)
    probs = torch.softmax(scores, -1)
    if allowed is not None:  # a fully masked row outputs zeros (no NaN, no gradient)
        probs = probs * allowed.any(-1, keepdim=True)
    if keep_prob < 1.0:
        probs = F.dropout(probs, 1.0 - keep_prob)
    return torch.einsum("nst,ntd->nsd", probs, v.float()), row_max, row_sum


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None):
    """``softmax(mask(scale * q k^T)) v`` per batch (per document in TND) and head.

    Returns ``(out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)`` like
    torch_npu; ``out`` is in the input layout with v's head dim. Masks: ``atten_mask``
    True = masked out. sparse_mode 0 = the given mask (+ pre/next tokens band, origin
    top-left); 2 = leftUpCausal, 3 = rightDownCausal, 4 = band (origin bottom-right),
    each of 2/3/4 needing the compressed 2048x2048 ``triu(1)`` bool mask. No mask at all
    means full attention whatever sparse_mode says (documented).
    """
    for name, val in dict(pse=pse, padding_mask=padding_mask, prefix=prefix, sink=sink).items():
        _require(val is None, f"npu_fusion_attention: `{name}` is not emulated", NotImplementedError)
    _require(input_layout in _LAYOUTS, f"input_layout must be one of {_LAYOUTS}, got {input_layout!r}")
    _require(sparse_mode in (0, 2, 3, 4), f"sparse_mode {sparse_mode} is not emulated", NotImplementedError)
    _dtype_ok(query, key, value)
    _require(query.dtype == key.dtype == value.dtype, "query, key and value must share a dtype", TypeError)
    _require(0.0 < keep_prob <= 1.0, f"keep_prob must be in (0, 1], got {keep_prob}")
    _require(key.shape[:-1] == value.shape[:-1] or input_layout in ("BSH", "SBH"),
             "key and value must agree on every dim but the head dim")
    tnd = input_layout == "TND"
    _require(tnd or (actual_seq_qlen is None and actual_seq_kvlen is None),
             "actual_seq_qlen / actual_seq_kvlen belong to the TND (varlen) layout")

    # Head dims.
    if input_layout in ("BSH", "SBH"):
        _require(query.shape[-1] % head_num == 0, f"hidden {query.shape[-1]} not divisible by head_num {head_num}")
        dq = query.shape[-1] // head_num
        dk = dq
        _require(key.shape[-1] % dk == 0, f"key hidden {key.shape[-1]} not a multiple of D {dk}")
        kv_heads = key.shape[-1] // dk
        _require(value.shape[-1] % kv_heads == 0, f"value hidden {value.shape[-1]} not divisible by N {kv_heads}")
        dv = value.shape[-1] // kv_heads
    else:
        head_axis = 1 if input_layout in ("BNSD", "TND") else 2
        _require(query.shape[head_axis] == head_num,
                 f"query has {query.shape[head_axis]} heads, head_num says {head_num}")
        kv_heads = key.shape[head_axis]
        dq, dk, dv = query.shape[-1], key.shape[-1], value.shape[-1]
    _require(kv_heads > 0 and head_num % kv_heads == 0, f"Nq {head_num} must be a multiple of Nkv {kv_heads}")
    _require(dq == dk and dk >= dv, f"head dims must satisfy Dq == Dk >= Dv, got {dq}, {dk}, {dv}")
    _require(1 <= dq <= MAX_HEAD_DIM, f"head dim {dq} outside 1..{MAX_HEAD_DIM}")
    if REQUIRE_PADDED_HEAD_DIM:
        _require(dq == dk == dv and dq % HEAD_DIM_MULTIPLE == 0,
                 f"(older CANN) q, k, v need one head dim that is a multiple of {HEAD_DIM_MULTIPLE}; "
                 f"got {dq}, {dk}, {dv}")

    # Mask.
    if atten_mask is not None:
        _require(atten_mask.dtype in (torch.bool, torch.uint8),
                 f"atten_mask must be bool/uint8, got {atten_mask.dtype}")
        if sparse_mode in (2, 3, 4):
            size = CAUSAL_MASK_SIZE
            expected = torch.ones(size, size, dtype=torch.bool, device=atten_mask.device).triu(1)
            _require(tuple(atten_mask.shape) == (CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE)
                     and bool(torch.equal(atten_mask.bool(), expected)),
                     f"sparse_mode {sparse_mode} needs the compressed {CAUSAL_MASK_SIZE}x{CAUSAL_MASK_SIZE} "
                     "triu(diagonal=1) mask (True = masked)")
        else:
            _require(atten_mask.dim() in (2, 4), "atten_mask must be SS, 11SS, B1SS or BNSS")
            _require(not tnd or atten_mask.dim() == 2, "TND (varlen) takes only an SS atten_mask")

    _record("npu_fusion_attention", input_layout=input_layout, head_num=head_num, sparse_mode=sparse_mode,
            has_mask=atten_mask is not None, scale=scale, keep_prob=keep_prob,
            head_dims=(dq, dk, dv), actual_seq_qlen=None if actual_seq_qlen is None else list(actual_seq_qlen),
            actual_seq_kvlen=None if actual_seq_kvlen is None else list(actual_seq_kvlen))

    if tnd:
        _require(query.dim() == 3 and key.dim() == 3 and value.dim() == 3, "TND tensors are 3-D")
        q_ends = _cumulative("actual_seq_qlen", actual_seq_qlen, query.shape[0])
        kv_ends = _cumulative("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
        _require(len(q_ends) == len(kv_ends), "actual_seq_qlen and actual_seq_kvlen need one entry per batch")
        outs, maxes, sums = [], [], []
        for (qa, qb), (ka, kb) in zip(zip([0] + q_ends[:-1], q_ends), zip([0] + kv_ends[:-1], kv_ends)):
            if qb == qa:
                continue
            allowed = _allowed(qb - qa, kb - ka, sparse_mode, atten_mask, pre_tockens, next_tockens, query.device)
            if kb == ka:
                allowed = torch.zeros(qb - qa, 0, dtype=torch.bool, device=query.device)
            o, m, s = _attend(query[qa:qb].transpose(0, 1), key[ka:kb].transpose(0, 1),
                              value[ka:kb].transpose(0, 1), allowed, scale, keep_prob)
            outs.append(o.transpose(0, 1))
            maxes.append(m.transpose(0, 1))
            sums.append(s.transpose(0, 1))
        out = torch.cat(outs, 0).to(query.dtype)
        softmax_max = torch.cat(maxes, 0).expand(-1, -1, 8).contiguous()
        softmax_sum = torch.cat(sums, 0).expand(-1, -1, 8).contiguous()
        return out, softmax_max, softmax_sum, query.new_empty(0), 0, 0, 0

    q = _to_bnsd(query, input_layout, head_num, None)
    k = _to_bnsd(key, input_layout, None, dk)
    v = _to_bnsd(value, input_layout, kv_heads, None)
    _require(q.shape[0] == k.shape[0] == v.shape[0], "batch sizes of query, key and value differ")
    sq, skv = q.shape[2], k.shape[2]
    allowed = _allowed(sq, skv, sparse_mode, atten_mask, pre_tockens, next_tockens, query.device)
    outs, maxes, sums = [], [], []
    for b in range(q.shape[0]):
        mask_b = allowed
        if allowed is not None and allowed.dim() == 4:
            mask_b = allowed[b if allowed.shape[0] > 1 else 0]
        o, m, s = _attend(q[b], k[b], v[b], mask_b, scale, keep_prob)
        outs.append(o)
        maxes.append(m)
        sums.append(s)
    out = _from_bnsd(torch.stack(outs, 0).to(query.dtype), input_layout)
    softmax_max = torch.stack(maxes, 0).expand(-1, -1, -1, 8).contiguous()
    softmax_sum = torch.stack(sums, 0).expand(-1, -1, -1, 8).contiguous()
    return out, softmax_max, softmax_sum, query.new_empty(0), 0, 0, 0


# --------------------------------------------------------------------------- rms norm, swiglu, rotary


def npu_rms_norm(self, gamma, epsilon=1e-6):
    """``(x * rstd * gamma, rstd)``, statistics in fp32 over gamma's dims; rstd is fp32."""
    x = self
    _dtype_ok(x, gamma)
    _require(gamma.dtype == x.dtype, f"gamma dtype {gamma.dtype} must match x dtype {x.dtype}", TypeError)
    _require(1 <= x.dim() <= 8, f"x must be 1-8 dims, got {x.dim()}")
    _require(gamma.dim() <= x.dim() and tuple(x.shape[x.dim() - gamma.dim():]) == tuple(gamma.shape),
             f"gamma {tuple(gamma.shape)} must match the trailing dims of x {tuple(x.shape)}")
    _record("npu_rms_norm", shape=tuple(x.shape), epsilon=epsilon)
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(dims, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.float()).to(x.dtype), rstd


def npu_swiglu(self, dim=-1):
    """``silu(A) * B`` with A the first and B the second half of ``self`` along ``dim``."""
    x = self
    _dtype_ok(x)
    _require(1 <= x.dim() <= 8, f"input must be 1-8 dims, got {x.dim()}")
    _require(-x.dim() <= dim < x.dim(), f"dim {dim} out of range for {x.dim()} dims")
    _require(x.numel() > 0, "empty tensors are not supported")
    _require(x.is_contiguous(), "non-contiguous tensors are not supported")
    _require(x.shape[dim] % 2 == 0, f"size {x.shape[dim]} along dim {dim} must be even")
    _record("npu_swiglu", shape=tuple(x.shape), dim=dim)
    a, b = x.float().chunk(2, dim=dim)
    return (F.silu(a) * b).to(x.dtype)


def npu_rotary_mul(self, r1, r2, rotary_mode="half", rotate=None):
    """``r1 * x + r2 * rotate(x)``; half: rotate = cat(-x2, x1); interleave: pairs (-x_odd, x_even)."""
    x = self
    _require(rotate is None, "`rotate` is not emulated", NotImplementedError)
    _require(rotary_mode in ("half", "interleave"), f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
    _dtype_ok(x, r1, r2)
    _require(x.dtype == r1.dtype == r2.dtype, "input, r1 and r2 must share a dtype", TypeError)
    _require(x.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "input, r1 and r2 must be 4-D")
    _require(r1.shape == r2.shape, f"r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} differ")
    d = x.shape[-1]
    _require(d % 2 == 0 and d < MAX_ROTARY_HEAD_DIM, f"D must be even and < {MAX_ROTARY_HEAD_DIM}, got {d}")
    _require(r1.shape[-1] == d and all(r in (1, s) for r, s in zip(r1.shape[:3], x.shape[:3])),
             f"r1/r2 {tuple(r1.shape)} do not broadcast onto input {tuple(x.shape)} with the same D")
    if rotary_mode == "interleave":
        _require(sum(r != 1 for r in r1.shape[:3]) <= 1, "interleave mode takes r1/r2 of layout 11SD, 1S1D or S11D")
    for name, r in (("r1", r1), ("r2", r2)):
        _require(bool((r.abs() <= 1.0).all()), f"{name} values must lie in [-1, 1] (documented data range)")
    _record("npu_rotary_mul", shape=tuple(x.shape), r_shape=tuple(r1.shape), rotary_mode=rotary_mode)
    xf = x.float()
    if rotary_mode == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        rotated = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    return (r1.float() * xf + r2.float() * rotated).to(x.dtype)


# --------------------------------------------------------------------------- MoE token permute / unpermute


def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
    """Rows of ``tokens`` repeated per chosen expert and stably sorted by expert index.

    With ``flat = indices.flatten()`` (token-major: entry ``t*K + k``), ``order =
    argsort(flat)`` and ``sorted_indices = argsort(order)`` (int32), ``permuted[sorted_indices[i]]
    = tokens[i // K]``: expert-major, and token-ascending within an expert. ``num_out_tokens``
    keeps the first rows (None or 0: all ``T*K``).
    """
    _require(not padded_mode, "padded_mode=True is not supported", NotImplementedError)
    _dtype_ok(tokens)
    _require(tokens.dim() == 2, f"tokens must be 2-D [num_tokens, hidden], got {tuple(tokens.shape)}")
    _require(indices.dtype in (torch.int32, torch.int64), f"indices must be int32/int64, got {indices.dtype}",
             TypeError)
    _require(indices.dim() in (1, 2) and indices.shape[0] == tokens.shape[0],
             f"indices must be [num_tokens] or [num_tokens, topK], got {tuple(indices.shape)}")
    topk = 1 if indices.dim() == 1 else indices.shape[1]
    _require(topk <= MAX_PERMUTE_TOPK, f"topK {topk} > {MAX_PERMUTE_TOPK}")
    total = indices.numel()
    keep = total if not num_out_tokens else int(num_out_tokens)
    _require(0 <= keep <= total, f"num_out_tokens {num_out_tokens} outside 0..{total}")
    _record("npu_moe_token_permute", num_tokens=tokens.shape[0], topk=topk, num_out_tokens=num_out_tokens)
    order = torch.argsort(indices.reshape(-1), stable=True)
    sorted_indices = torch.argsort(order, stable=True).to(torch.int32)
    permuted = tokens.index_select(0, torch.div(order, topk, rounding_mode="floor"))
    return permuted[:keep], sorted_indices


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """``out[i] = sum_k T[S[i*K + k]] * probs[i, k]`` with topK = ``probs.shape[1]``.

    Without ``probs`` topK is 1 (documented): the result is ``permuted_tokens[sorted_indices]``,
    one row per permuted row, nothing summed.
    """
    _require(not padded_mode, "padded_mode=True is not supported", NotImplementedError)
    _dtype_ok(permuted_tokens)
    _require(permuted_tokens.dim() == 2, "permuted_tokens must be 2-D [num_tokens * topK, hidden]")
    _require(sorted_indices.dtype == torch.int32, f"sorted_indices must be int32, got {sorted_indices.dtype}",
             TypeError)
    _require(sorted_indices.dim() == 1 and sorted_indices.numel() == permuted_tokens.shape[0],
             f"sorted_indices {tuple(sorted_indices.shape)} must be 1-D with one entry per permuted row "
             f"({permuted_tokens.shape[0]})")
    n = sorted_indices.numel()
    _require(torch.equal(torch.sort(sorted_indices.long()).values, torch.arange(n, device=sorted_indices.device)),
             "sorted_indices must be a permutation of 0..num_tokens*topK-1 (no repeats)")
    if probs is None:
        topk = 1
    else:
        _dtype_ok(probs)
        _require(probs.dim() == 2 and probs.numel() == n,
                 f"probs must be [num_tokens, topK] with num_tokens*topK == {n}, got {tuple(probs.shape)}")
        topk = probs.shape[1]
    _record("npu_moe_token_unpermute", rows=n, topk=topk, has_probs=probs is not None)
    gathered = permuted_tokens.index_select(0, sorted_indices.long()).float()
    if probs is not None:
        gathered = gathered * probs.reshape(-1, 1).float()
    return gathered.view(n // topk, topk, -1).sum(1).to(permuted_tokens.dtype)


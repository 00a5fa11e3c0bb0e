"""4-bit NormalFloat (NF4) quantization with double-quantized scales, as bitsandbytes does it.

``nf4_quantize(w)`` -> ``NF4``: the flattened tensor in blocks of ``blocksize`` (64) values, each value
the nearest of NF4's 16 levels times its block's absmax, two codes per byte (the first value of a pair
in the high nibble, an odd count padded with the code of 0.0). With ``double_quant`` the fp32 absmax per
block is itself stored in 8 bits: its mean (``offset``) subtracted, then blocks of 256 scaled by their
own fp32 absmax (``absmax2``) onto bitsandbytes' signed dynamic 8-bit map. ``nf4_dequantize`` computes
in fp32 (level x scale) and casts once, to the input's dtype by default.

Bit for bit what ``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4",
compress_statistics=double_quant)`` and ``dequantize_4bit`` give on CPU, the oracle of
``tests/unit/test_nf4.py``; every step is plain torch, so it runs the same on NPU, CUDA and CPU, and
bitsandbytes is never imported here. The rounding rules that make it exact:

- 4 bits: a value becomes ``clamp(x * (1 / absmax), -1, 1)`` (the last, partial block: ``x / absmax``),
  an all-zero block's absmax counts as 1e-38; the code is the number of midpoints between adjacent
  levels strictly below it (a tie goes to the lower level).
- 8 bits (the scales): a zero block's codes are all 0; otherwise ``v = x * (1 / absmax)`` is rounded
  to one of 65536 evenly spaced points of [-1, 1] (``trunc((v + 1) / 2 * 65535 + 0.5)``, the last
  multiply-add fused, as bitsandbytes' compiled CPU kernel does) and a point's code is the number of
  map midpoints strictly below it.

Inf and NaN are refused: bitsandbytes quantizes them to garbage without a word.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

# The NF4 levels: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA, Dettmers et al. 2023).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
BLOCKSIZE = 64
SCALE_BLOCKSIZE = 256  # the double quantization's blocks of absmax values
_LUT_POINTS = 65536


@dataclass
class NF4:
    """One tensor in NF4: ``codes`` uint8 [ceil(numel / 2)]; ``absmax`` uint8 [blocks] with ``absmax2`` fp32
    [ceil(blocks / 256)] and ``offset`` fp32 [] (double quantization), or fp32 [blocks] alone."""

    codes: torch.Tensor
    absmax: torch.Tensor
    absmax2: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    shape: Tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = BLOCKSIZE

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


_CACHE: Dict[Tuple[str, torch.device], torch.Tensor] = {}


def _cached(name: str, device: torch.device, build) -> torch.Tensor:
    key = (name, torch.device(device))
    if key not in _CACHE:
        _CACHE[key] = build().to(device)
    return _CACHE[key]


def nf4_levels(device="cpu") -> torch.Tensor:
    return _cached("nf4", device, lambda: torch.tensor(NF4_LEVELS, dtype=torch.float32))


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map()``): for each decade 10^-6 .. 10^0,
    2^i + 1 evenly spaced fp32 points of [0.1, 1] give 2^i bin centres, both signs; then 0 and 1."""
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * centres).tolist() + (-(10 ** (i - 6)) * centres).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(device="cpu") -> torch.Tensor:
    return _cached("dynamic", device, _dynamic_map)


def _point_codes(device) -> torch.Tensor:
    """Code of each of the 65536 points of [-1, 1] the 8-bit quantizer rounds to."""
    def build():
        points = -1.0 + (2.0 * torch.arange(_LUT_POINTS, dtype=torch.float32)) / (_LUT_POINTS - 1)
        code = _dynamic_map()
        return torch.searchsorted(0.5 * (code[:-1] + code[1:]), points).to(torch.uint8)
    return _cached("points", device, build)


def _check_finite(w: torch.Tensor, what: str) -> None:
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"{what} holds inf or NaN (first at index {bad}): NF4 cannot represent it; "
                         "fix the weights before quantizing")


def _blocks(flat: torch.Tensor, blocksize: int):
    """(full blocks [b, blocksize], the partial last block or None)."""
    full = flat.numel() - flat.numel() % blocksize
    rest = flat[full:]
    return flat[:full].view(-1, blocksize), (rest if rest.numel() else None)


def _quantize_scales(absmax: torch.Tensor):
    """absmax fp32 [blocks] -> (uint8 codes, fp32 absmax per 256, fp32 offset)."""
    offset = absmax.mean()
    centred = absmax - offset
    points = _point_codes(absmax.device)
    codes, maxima = [], []
    full, rest = _blocks(centred, SCALE_BLOCKSIZE)
    for block in ([full] if full.numel() else []) + ([rest.view(1, -1)] if rest is not None else []):
        amax = block.abs().amax(dim=1, keepdim=True)
        v = torch.clamp(block * (1.0 / torch.where(amax == 0, torch.ones_like(amax), amax)), -1.0, 1.0)
        # (v + 1) * 0.5 rounds in fp32; the multiply-add after it is one fused operation (float64 holds
        # the exact product and sum of two fp32 values here), then truncated.
        half = (v + 1.0) * 0.5
        index = (half.double() * (_LUT_POINTS - 1) + 0.5).float().to(torch.int64)
        code = points[index]
        codes.append(torch.where(amax == 0, torch.zeros_like(code), code).reshape(-1))
        maxima.append(amax.reshape(-1))
    return torch.cat(codes), torch.cat(maxima), offset


def nf4_quantize(w: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = True,
                 what: str = "the tensor") -> NF4:
    """``w`` (bf16, fp16 or fp32, any shape) in NF4; ``what`` names it in errors."""
    if w.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{what}: NF4 quantizes bf16, fp16 or fp32 weights, not {w.dtype}")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"NF4 blocksize must be a positive even number, not {blocksize}")
    if w.numel() == 0:
        raise ValueError(f"{what} is empty: nothing to quantize")
    _check_finite(w, what)
    flat = w.detach().reshape(-1).float()
    full, rest = _blocks(flat, blocksize)
    absmax = full.abs().amax(dim=1)
    scaled = torch.clamp(full * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if rest is not None:
        last = rest.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, torch.clamp(rest / last, -1, 1)])
    if scaled.numel() % 2:  # the pad value is 0.0, whose code is the zero level's (7)
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    levels = nf4_levels(w.device)
    codes = torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2).to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4(packed, absmax, None, None, tuple(w.shape), w.dtype, blocksize)
    qabsmax, absmax2, offset = _quantize_scales(absmax)
    return NF4(packed, qabsmax, absmax2, offset, tuple(w.shape), w.dtype, blocksize)


def nf4_scales(absmax: torch.Tensor, absmax2: Optional[torch.Tensor] = None,
               offset: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fp32 absmax per block (the double quantization undone); leading dimensions are batches of
    tensors: absmax [..., blocks], absmax2 [..., blocks / 256], offset [..., 1] or []."""
    if absmax2 is None:
        return absmax.float()
    n = absmax.shape[-1]
    if absmax2.shape[-1] != -(-n // SCALE_BLOCKSIZE) or offset is None or offset.shape[-1:] not in ((1,), ()):
        raise ValueError(f"NF4 scales do not fit together: {n} block scales need "
                         f"{-(-n // SCALE_BLOCKSIZE)} second-level scales and one offset, got "
                         f"{absmax2.shape[-1]} and {None if offset is None else tuple(offset.shape)}")
    per = absmax2.float().repeat_interleave(SCALE_BLOCKSIZE, dim=-1)[..., :n]
    offset = offset.float().reshape(*absmax.shape[:-1], 1)
    return dynamic_map(absmax.device)[absmax.to(torch.int64)] * per + offset


def _pair_levels(device) -> torch.Tensor:
    """[256, 2]: the two NF4 values of each byte."""
    def build():
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
        byte = torch.arange(256)
        return torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1)
    return _cached("pairs", device, build)


def nf4_values(codes: torch.Tensor, scales: torch.Tensor, numel: int, blocksize: int = BLOCKSIZE) -> torch.Tensor:
    """fp32 values of ``numel`` packed codes per row ([..., bytes]) whose consecutive blocks have the fp32
    ``scales`` ([..., blocks])."""
    if scales.shape[-1] != -(-numel // blocksize):
        raise ValueError(f"NF4 data of {numel} values needs {-(-numel // blocksize)} block scales, "
                         f"got {scales.shape[-1]}: the scale tensor does not belong to these codes")
    # one lookup per byte: its two values (high nibble first)
    pairs = _pair_levels(codes.device).index_select(0, codes.reshape(-1).to(torch.int32))  # faster than [] on CPU
    levels = pairs.reshape(*codes.shape[:-1], -1)[..., :numel]
    lead = levels.shape[:-1]
    full = numel - numel % blocksize
    head = (levels[..., :full].reshape(*lead, -1, blocksize) * scales[..., : full // blocksize, None])
    head = head.reshape(*lead, full)
    if full == numel:
        return head
    return torch.cat([head, levels[..., full:] * scales[..., -1:]], dim=-1)


def nf4_dequantize(q: NF4, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The tensor ``q`` holds, in ``dtype`` (default: the quantized tensor's)."""
    if q.codes.dtype != torch.uint8 or q.codes.numel() != -(-q.numel // 2):
        raise ValueError(f"NF4 codes of a {list(q.shape)} tensor must be {-(-q.numel // 2)} uint8 bytes, got "
                         f"{q.codes.numel()} {q.codes.dtype}")
    scales = nf4_scales(q.absmax, q.absmax2, q.offset)
    values = nf4_values(q.codes.reshape(-1), scales, q.numel, q.blocksize)
    return values.to(dtype or q.dtype).reshape(q.shape)

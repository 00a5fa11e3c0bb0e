"""``npu_dsv3.ops.nf4`` against bitsandbytes' NF4 on CPU, bit for bit: packed codes, the double-quantized
scales (8-bit codes, second-level absmax, offset) and the dequantized values, in bf16, fp16 and fp32,
odd sizes, partial and all-zero blocks, tiny and huge magnitudes; plus our refusals (inf, NaN)."""

import pytest
import torch
import bitsandbytes.functional as bnb

from npu_dsv3.ops.nf4 import NF4, dynamic_map, nf4_dequantize, nf4_levels, nf4_quantize, nf4_scales

SHAPES = [(1,), (3,), (63,), (64,), (65,), (7, 130), (33, 96), (5, 3, 17), (64 * 256 + 5,), (300, 257), (3, 64 * 769 + 11)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weights(shape, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    flat = w.view(-1)
    if kind == "zero blocks":
        flat[:64] = 0
        flat[-min(flat.numel(), 70):] = 0
    elif kind == "magnitudes":  # blocks from 1e-4 to 1e3: the 8-bit scales use the whole dynamic map
        flat.mul_(torch.logspace(-4, 3, flat.numel()))
    elif kind == "zeros":
        flat.zero_()
    return w


def _bnb(w: torch.Tensor, blocksize: int = 64, double: bool = True):
    return bnb.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double)


def _assert_same(ours: NF4, packed, state, w):
    assert torch.equal(ours.codes, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    if state.state2 is not None:
        assert torch.equal(ours.absmax2, state.state2.absmax)
        assert torch.equal(ours.offset.reshape(()), state.offset.reshape(()))
    # Dequantized as one row: bitsandbytes' AVX-512 CPU kernel reads a 2-D tensor's scales per row, which
    # is wrong when a row is not whole blocks (e.g. [33, 96]); flat, every block gets its own scale.
    state.shape = torch.Size([w.numel()])
    theirs = bnb.dequantize_4bit(packed, state)
    mine = nf4_dequantize(ours)
    assert mine.dtype == theirs.dtype == w.dtype and mine.shape == w.shape
    assert torch.equal(mine, theirs.reshape(w.shape))


def test_code_books_are_bitsandbytes():
    assert torch.equal(nf4_levels(), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_bitsandbytes(shape, dtype):
    for seed, kind in enumerate(("normal", "zero blocks", "magnitudes")):
        w = _weights(shape, kind, seed).to(dtype)
        _assert_same(nf4_quantize(w), *_bnb(w), w)


def test_all_zero_and_single_value_tensors():
    for w in (torch.zeros(130), torch.zeros(1), torch.full((1,), -3.5), torch.full((5, 64), 2.0)):
        _assert_same(nf4_quantize(w), *_bnb(w), w)


def test_many_scale_blocks_random_magnitudes():
    """The 8-bit scale codes: many 256-block groups over a wide spread, where rounding ties are likeliest."""
    g = torch.Generator().manual_seed(7)
    for n in (64 * 256 * 3 + 1, 200_000):
        w = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(6) * 37.0
        _assert_same(nf4_quantize(w), *_bnb(w), w)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_block_sizes(blocksize):
    w = _weights((37, 300), "magnitudes", 3)
    _assert_same(nf4_quantize(w, blocksize=blocksize), *_bnb(w, blocksize), w)


def test_without_double_quantization():
    w = _weights((9, 200), "normal", 4).bfloat16()
    ours = nf4_quantize(w, double_quant=False)
    assert ours.absmax.dtype == torch.float32 and ours.absmax2 is None
    _assert_same(ours, *_bnb(w, double=False), w)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_refuses_inf_and_nan(bad):
    w = torch.randn(4, 64)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"inf or NaN \(first at index \[2, 5\]\).*fix the weights"):
        nf4_quantize(w, what="model.layers.0.mlp.up_proj.weight")


def test_refuses_other_dtypes_and_mismatched_scales():
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        nf4_quantize(torch.ones(64, dtype=torch.float64))
    q = nf4_quantize(torch.randn(1000))
    with pytest.raises(ValueError, match="second-level scales"):
        nf4_scales(q.absmax, q.absmax2[:0], q.offset)
    cut = NF4(q.codes[:-1], q.absmax, q.absmax2, q.offset, q.shape, q.dtype)
    with pytest.raises(ValueError, match="must be 500 uint8 bytes"):
        nf4_dequantize(cut)

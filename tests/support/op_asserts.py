"""The tolerance check the op tests share."""

import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, dtype, tol_scale=1.0, what="", same_dtype=False):
    """Same shape (and dtype if ``same_dtype``), and max |actual - expected| <= tol * max(1, max |expected|),
    compared in float64 (references may be computed in float64)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if same_dtype:
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    if e.numel() == 0:
        return
    err = (a - e).abs().max().item()
    bound = TOLERANCE[dtype] * tol_scale * max(1.0, e.abs().max().item())
    assert err <= bound, f"{what} ({dtype}): max error {err:.3g} > {bound:.3g}"

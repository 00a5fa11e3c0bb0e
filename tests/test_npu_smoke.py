"""Smoke tests on real Ascend hardware: every op's torch_npu path vs its portable path on CPU.

Run with ``python -m pytest -q -m npu tests/test_npu_smoke.py`` on a machine with torch_npu and
a visible NPU; ``tests/conftest.py`` skips them everywhere else. Inputs are bfloat16 on the NPU
(tensors on "npu" take the torch_npu path by dispatch); the reference is the portable path on CPU
in float32 from the same bf16 values; forward and backward (random upstream gradient) are compared
at bf16 resolution. Shapes are small: this checks the calls, not performance.
"""

import math

import pytest
import torch

from npu_dsv3.ops import apply_rotary, gmm, mla_attention, permute, rms_norm, swiglu, unpermute

pytestmark = pytest.mark.npu

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def npu():
    import torch_npu  # noqa: F401  (registers the "npu" device)

    return torch.device("npu")


def assert_close(actual, expected, tol=2e-2, what=""):
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values on the NPU"
    if e.numel() == 0:
        return
    err = (a - e).abs().max().item()
    bound = tol * max(1.0, e.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _run_both(fn, inputs, device, *extra):
    """fn on the NPU (bf16 leaves) and on CPU (float32 leaves from the same bf16 values); outputs and grads."""
    npu_in = [t.to(BF16).to(device).requires_grad_(True) for t in inputs]
    cpu_in = [t.to(BF16).float().requires_grad_(True) for t in inputs]
    out_npu = fn(*npu_in, *extra)
    out_cpu = fn(*cpu_in, *extra)
    assert out_npu.device.type == "npu"
    g = torch.randn(out_cpu.shape).to(BF16)
    grads_npu = torch.autograd.grad(out_npu, npu_in, g.to(device))
    grads_cpu = torch.autograd.grad(out_cpu, cpu_in, g.float())
    return out_npu, out_cpu, grads_npu, grads_cpu


def test_gmm_on_npu(npu):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 0, 8])
    x, w = torch.randn(16, 64), torch.randn(5, 64, 32) / 8
    out_n, out_c, grads_n, grads_c = _run_both(lambda a, b: gmm(a, b, counts.to(a.device)), [x, w], npu)
    assert_close(out_n, out_c, what="gmm forward")
    for name, a, e in zip(("dx", "dW"), grads_n, grads_c):
        assert_close(a, e, what=f"gmm {name}")


@pytest.mark.parametrize("cu", [None, [0, 20, 20, 64]], ids=["sbh", "packed_tnd"])
@pytest.mark.parametrize("causal", [True, False])
def test_mla_attention_on_npu(npu, cu, causal):
    torch.manual_seed(0)
    seq, batch, heads = 64, (2 if cu is None else 1), 2
    q, k, v = (torch.randn(seq, batch, heads, d) for d in (192, 192, 128))

    def attend(q_, k_, v_):
        cu_seqlens = None if cu is None else torch.tensor(cu, device=q_.device)
        return mla_attention(q_, k_, v_, 1 / math.sqrt(192), causal=causal, cu_seqlens=cu_seqlens)

    out_n, out_c, grads_n, grads_c = _run_both(attend, [q, k, v], npu)
    assert_close(out_n, out_c, what="attention forward")
    for name, a, e in zip("qkv", grads_n, grads_c):
        assert_close(a, e, tol=3e-2, what=f"attention d{name}")


def test_rms_norm_on_npu(npu):
    torch.manual_seed(0)
    out_n, out_c, grads_n, grads_c = _run_both(lambda a, b: rms_norm(a, b, 1e-6),
                                               [torch.randn(4, 3, 128) * 3, torch.rand(128) + 0.5], npu)
    assert_close(out_n, out_c, what="rms_norm forward")
    for name, a, e in zip(("dx", "dw"), grads_n, grads_c):
        assert_close(a, e, tol=3e-2, what=f"rms_norm {name}")


def test_swiglu_on_npu(npu):
    torch.manual_seed(0)
    out_n, out_c, (dx_n,), (dx_c,) = _run_both(swiglu, [torch.randn(6, 2 * 96) * 2], npu)
    assert_close(out_n, out_c, what="swiglu forward")
    assert_close(dx_n, dx_c, what="swiglu dx")


@pytest.mark.parametrize("mscale", [1.0, 1.369])
def test_rotary_on_npu(npu, mscale):
    torch.manual_seed(0)
    seq, dim = 32, 64
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    freqs = torch.cat((angles, angles), -1).view(seq, 1, 1, dim)
    out_n, out_c, (dt_n,), (dt_c,) = _run_both(
        lambda t: apply_rotary(t, freqs.to(t.device), mscale), [torch.randn(seq, 2, 4, dim)], npu)
    assert_close(out_n, out_c, what="rotary forward")
    assert_close(dt_n, dt_c, what="rotary dx")


def test_permute_unpermute_on_npu(npu):
    torch.manual_seed(0)
    num_tokens, num_experts, topk = 12, 6, 2
    chosen = torch.rand(num_tokens, num_experts).topk(topk, dim=-1).indices
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter(1, chosen, True)
    probs = torch.rand(num_tokens, num_experts) * routing_map
    expert_scale = (routing_map.t().nonzero()[:, 0] + 1).float().unsqueeze(-1)

    def moe_round_trip(x):
        rmap = routing_map.to(x.device)
        permuted, permuted_probs, sorted_indices = permute(x, rmap, probs=probs.to(x.device, x.dtype))
        expert_out = permuted * expert_scale.to(x.device, x.dtype) * permuted_probs.unsqueeze(-1)
        return unpermute(expert_out, sorted_indices, x.shape, routing_map=rmap)

    out_n, out_c, (dx_n,), (dx_c,) = _run_both(moe_round_trip, [torch.randn(num_tokens, 64)], npu)
    assert_close(out_n, out_c, what="permute/unpermute forward")
    assert_close(dx_n, dx_c, what="permute/unpermute backward")

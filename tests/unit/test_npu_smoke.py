"""Smoke tests on real Ascend hardware: every op's torch_npu path vs its portable path on CPU; one
training step of the tiny model through megatron-core on the npu backend (one rank, and two over
HCCL when two NPUs are visible) against the same step on CPU; a conversion round trip.

Run with ``python -m pytest -q -m npu tests/unit/test_npu_smoke.py`` on a machine with torch_npu and
a visible NPU; ``tests/conftest.py`` skips them everywhere else. Inputs are bfloat16 on the NPU
(tensors on "npu" take the torch_npu path by dispatch); the reference is the portable path on CPU
in float32 from the same bf16 values; forward and backward (random upstream gradient) are compared
at bf16 resolution. Shapes are small: this checks the calls, not performance.
"""

import math
import os

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


# --------------------------------------------------------------------------- megatron on the npu backend

# One SGD step (no momentum, clipping or decay: the weights move by exactly lr * gradient), as the
# CPU training tests run it. Float32 on both devices.
ONE_SGD_STEP = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
                "--train-iters", "1", "--optimizer", "sgd", "--sgd-momentum", "0", "--lr", "0.1", "--min-lr", "0.1",
                "--lr-decay-style", "constant", "--weight-decay", "0", "--clip-grad", "0", "--eval-iters", "0",
                "--log-interval", "1", "--finetune", "--no-save-optim", "--no-save-rng"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF directory of the tests' tiny model with MTP, its torch_dist weights for --load)."""
    from support.checkpoint_files import release_like_hf_dir
    from npu_dsv3.cli import main

    root = tmp_path_factory.mktemp("npu-tiny")
    hf = release_like_hf_dir(str(root / "hf"), seed=11)
    weights = str(root / "start")
    assert main(["convert", "hf2mcore", "--load-dir", hf, "--save-dir", weights, "--save-format", "torch_dist",
                 "--no-progress"]) == 0
    return hf, weights


def _train_one_step(device: str, world: int, flags, tiny, out):
    """(logged record of the step, the weights it saved, exported to HF) of a run with NPU_DSV3_DEVICE=device."""
    from support.checkpoint_files import hf_tensors
    from npu_dsv3.cli import main
    from support.pretrain_runs import run_pretrain

    hf, weights = tiny
    out.mkdir()
    os.environ["NPU_DSV3_DEVICE"] = device
    try:
        records = run_pretrain(world, ["--hf-config", hf, "--load", weights, "--save", str(out / "ckpt"),
                                       *ONE_SGD_STEP, *flags], out / "run.jsonl")
    finally:
        del os.environ["NPU_DSV3_DEVICE"]
    assert len(records) == 1
    assert main(["convert", "mcore2hf", "--load-dir", str(out / "ckpt"), "--save-dir", str(out / "hf"),
                 "--no-progress"]) == 0
    return records[0], hf_tensors(out / "hf")


def _assert_same_step(npu_run, cpu_run, start):
    (npu_record, npu_after), (cpu_record, cpu_after) = npu_run, cpu_run
    assert math.isfinite(npu_record["lm_loss"])
    assert npu_record["lm_loss"] == pytest.approx(cpu_record["lm_loss"], rel=1e-3)
    assert npu_after.keys() == cpu_after.keys() == start.keys()
    moved = 0
    for name, before in start.items():
        # the update lr * gradient, NPU against CPU, at the precision of the NPU's float32 matmuls
        assert_close(npu_after[name].double() - before.double(), cpu_after[name].double() - before.double(),
                     tol=5e-2, what=f"update of {name}")
        moved += not torch.equal(npu_after[name], before)
    assert moved > len(start) // 2, "the step left most weights unchanged"


def test_one_training_step_on_npu_matches_cpu(npu, tiny, tmp_path):
    from support.checkpoint_files import hf_tensors

    start = hf_tensors(tiny[0])
    cpu_run = _train_one_step("cpu", 1, [], tiny, tmp_path / "cpu")
    _assert_same_step(_train_one_step("npu", 1, [], tiny, tmp_path / "npu"), cpu_run, start)
    if torch.npu.device_count() >= 2:
        # two ranks over HCCL: expert parallel all-to-alls and data-parallel gradient all-reduce
        ep2 = _train_one_step("npu", 2, ["--expert-model-parallel-size", "2"], tiny, tmp_path / "npu-ep2")
        _assert_same_step(ep2, cpu_run, start)


def test_conversion_round_trip_on_npu_backend_is_bit_exact(npu, tmp_path):
    """The converters under the npu backend (torch_npu's transfer_to_npu and the npu patches applied)."""
    import npu_dsv3
    from support.checkpoint_files import hf_tensors, release_like_hf_dir
    from npu_dsv3.cli import main

    assert npu_dsv3.backend() == "npu"
    hf = release_like_hf_dir(str(tmp_path / "hf"), seed=13)
    layout = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--moe-grouped-gemm"]
    assert main(["convert", "hf2mcore", "--load-dir", hf, "--save-dir", str(tmp_path / "mcore"), "--workers", "2",
                 "--no-progress", *layout]) == 0
    source = [flag.replace("--target-", "--source-") for flag in layout]
    assert main(["convert", "mcore2hf", "--load-dir", str(tmp_path / "mcore"), "--save-dir", str(tmp_path / "back"),
                 "--no-progress", *source]) == 0
    original, back = hf_tensors(hf), hf_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name in original:
        assert back[name].dtype == original[name].dtype and torch.equal(back[name], original[name]), name

"""Backend selection and the CPU adapter, exercised through real megatron-core code."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import npu_dsv3
from npu_dsv3 import backend
from npu_dsv3.backend import ENV_VAR, BackendUnavailableError, select_backend
from npu_dsv3.patching import apply_patches, patch_status, revert_patches

# The adapter tests call torch.cuda without importing megatron.core, which is what otherwise
# triggers the deferred setup that applies the patches.
npu_dsv3.setup()

on_cpu_backend = pytest.mark.skipif(
    npu_dsv3.backend() != "cpu", reason="the CPU adapter is only applied on the cpu backend"
)


# --------------------------------------------------------------------------- selection


def test_auto_selects_cpu_here(monkeypatch):
    if importlib.util.find_spec("torch_npu") is not None or torch.cuda.is_available():
        pytest.skip("this machine has an accelerator")
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend() == "cpu"
    monkeypatch.setenv(ENV_VAR, "")  # empty = unset
    assert select_backend() == "cpu"


@on_cpu_backend
def test_current_backend_device_dist_backend():
    assert npu_dsv3.backend() == backend.current_backend() == "cpu"
    assert backend.device() == torch.device("cpu")
    assert backend.dist_backend() == "gloo"


def test_env_override_cpu(monkeypatch):
    monkeypatch.setenv(ENV_VAR, " CPU ")
    assert select_backend() == "cpu"


def test_env_invalid_value_lists_valid_ones(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "tpu")
    with pytest.raises(ValueError) as e:
        select_backend()
    assert "'tpu'" in str(e.value)
    for name in ("npu", "cuda", "cpu"):
        assert name in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_env_npu_without_torch_npu(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "npu")
    with pytest.raises(BackendUnavailableError) as e:
        select_backend()
    msg = str(e.value)
    assert "torch_npu is not installed" in msg
    assert "set_env.sh" in msg and ENV_VAR in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available")
def test_env_cuda_without_gpu(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError) as e:
        select_backend()
    assert "cuda" in str(e.value).lower() and ENV_VAR in str(e.value)


def test_backend_is_initialised_once():
    assert backend.init_backend() == npu_dsv3.backend()
    assert npu_dsv3.setup() == npu_dsv3.backend()  # idempotent
    other = next(b for b in backend.BACKENDS if b != npu_dsv3.backend())
    with pytest.raises(RuntimeError):
        backend.init_backend(other)


# --------------------------------------------------------------------------- CPU adapter


@on_cpu_backend
def test_adapter_listed_and_applied():
    rows = [r for r in patch_status() if r["feature"] == "backend-cpu"]
    assert rows and all(r["status"] == "applied" and r["backends"] == ["cpu"] for r in rows)
    assert {r["target"] for r in rows} >= {
        "torch.cuda.current_device",
        "torch.cuda.Stream",
        "torch.cuda.manual_seed",
        "megatron.core.tensor_parallel.random._set_cuda_rng_state",
        "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
        "megatron.core.tensor_parallel.mappings._gather_along_first_dim",
        "npu_dsv3.backend.cuda_to_cpu.mode",
    }


@on_cpu_backend
def test_cuda_device_arguments_land_on_cpu():
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    y = torch.ones(2).to("cuda:0", torch.float64)
    assert y.device.type == "cpu" and y.dtype == torch.float64
    assert torch.ones(2).new_zeros(3, device="cuda").device.type == "cpu"
    lin = torch.nn.Linear(2, 2).to("cuda")
    assert lin.weight.device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    # megatron's optimizers and grad clipping insist on torch.cuda.* type names
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64  # the converting form is untouched
    assert torch.cuda.is_available() is False  # never lies about that


@on_cpu_backend
def test_revert_restores_cuda_behaviour():
    adapted_current_device = torch.cuda.current_device
    revert_patches("backend-cpu")
    try:
        assert torch.cuda.current_device is not adapted_current_device
        assert torch.ones(1).type() == "torch.FloatTensor"
        if not torch.cuda.is_available():
            with pytest.raises((AssertionError, RuntimeError)):
                torch.empty(3, device="cuda")
        assert all(r["status"] == "pending" for r in patch_status() if r["feature"] == "backend-cpu")
    finally:
        apply_patches("cpu")
    assert torch.cuda.current_device is adapted_current_device
    assert torch.empty(3, device="cuda").device.type == "cpu"


@on_cpu_backend
def test_streams_events_nvtx():
    s = torch.cuda.Stream(device=torch.cuda.current_device())
    assert s == torch.cuda.current_stream() == torch.cuda.default_stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x = torch.ones(4) * 2
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    x.record_stream(s)
    end.record(s)
    end.wait()
    end.synchronize()
    assert start.query() and start.elapsed_time(end) >= 0.0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.nvtx.range_push("r")
    torch.cuda.nvtx.range_pop()
    with torch.cuda.nvtx.range("r"):
        pass


# --------------------------------------------------------------------------- megatron on gloo


@pytest.fixture
def megatron_world1(world1):
    from megatron.core import parallel_state

    return parallel_state


@on_cpu_backend
def test_megatron_rng_tracker_gives_reproducible_dropout(megatron_world1):
    from megatron.core import tensor_parallel

    x = torch.ones(4096)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        m1 = F.dropout(x, 0.5)
    assert torch.equal(torch.get_rng_state(), before)  # fork leaves the default stream alone
    with tracker.fork():
        m2 = F.dropout(x, 0.5)
    assert not torch.equal(m1, m2)  # the tracked stream advanced
    outside = F.dropout(x, 0.5)
    assert not torch.equal(outside, m1)  # default and model-parallel streams differ

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        again = F.dropout(x, 0.5)
    assert torch.equal(again, m1)


@on_cpu_backend
@pytest.mark.parametrize("use_cpu_initialization", [True, False])
def test_megatron_parallel_linears_forward_backward(megatron_world1, use_cpu_initialization):
    from megatron.core import tensor_parallel
    from megatron.core.transformer import TransformerConfig

    tensor_parallel.model_parallel_cuda_manual_seed(7)
    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=torch.float32,
    )
    init = lambda w: torch.nn.init.normal_(w, std=0.1)  # noqa: E731
    col = tensor_parallel.ColumnParallelLinear(8, 12, config=config, init_method=init, bias=True, gather_output=False)
    row = tensor_parallel.RowParallelLinear(
        12, 8, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False
    )
    assert col.weight.device.type == "cpu" and row.weight.device.type == "cpu"

    x = torch.randn(5, 2, 8, requires_grad=True)  # [sequence, batch, hidden]
    h, _ = col(x)
    y, _ = row(h)
    y.square().sum().backward()

    xr = x.detach().clone().requires_grad_()
    w1, b1, w2, b2 = (p.detach().clone().requires_grad_() for p in (col.weight, col.bias, row.weight, row.bias))
    yr = F.linear(F.linear(xr, w1, b1), w2, b2)
    yr.square().sum().backward()
    torch.testing.assert_close(y, yr)
    for got, want in ((x.grad, xr.grad), (col.weight.grad, w1.grad), (col.bias.grad, b1.grad),
                      (row.weight.grad, w2.grad), (row.bias.grad, b2.grad)):
        torch.testing.assert_close(got, want)


@on_cpu_backend
def test_megatron_grad_norm_and_clipping(megatron_world1):
    # device='cuda' literals, the local multi-tensor fallbacks, and the
    # `grad.type() == 'torch.cuda.FloatTensor'` assertion of megatron's clipping.
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    flat = lambda: torch.cat([p.grad.flatten() for p in params])  # noqa: E731
    norm = get_grad_norm_fp32([p.grad for p in params], grad_stats_parallel_group=megatron_world1.get_model_parallel_group())
    assert norm == pytest.approx(torch.linalg.vector_norm(flat()).item(), rel=1e-5)
    clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
    assert torch.linalg.vector_norm(flat()).item() == pytest.approx(1.0, rel=1e-4)

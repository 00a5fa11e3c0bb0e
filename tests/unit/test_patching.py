"""The patch registry against real megatron-core targets, and the `npu-dsv3 patches` CLI."""

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

import npu_dsv3
from megatron.core import parallel_state
from megatron.core.tensor_parallel import cross_entropy, layers
from npu_dsv3 import cli, patching
from npu_dsv3.patching import (
    Patch,
    PatchError,
    apply_patches,
    patch,
    patch_status,
    register,
    revert_patches,
    unregister,
)

from support import REPO

FEATURE = "test-patching"
BACKEND = npu_dsv3.backend()
OTHER_BACKEND = next(b for b in patching.ALL_BACKENDS if b != BACKEND)


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    for row in reversed(patch_status()):
        if row["feature"].startswith(FEATURE):
            unregister(row["name"])


def _status(name: str) -> str:
    return next(r["status"] for r in patch_status() if r["name"] == name)


def test_apply_and_revert_restore_the_identical_object():
    original = parallel_state.get_tensor_model_parallel_world_size
    register(Patch("t.ws", FEATURE, "megatron.core.parallel_state.get_tensor_model_parallel_world_size",
                   lambda *a, **k: 7, why="test"))
    assert _status("t.ws") == "pending"
    apply_patches(BACKEND)
    assert parallel_state.get_tensor_model_parallel_world_size() == 7
    assert _status("t.ws") == "applied"
    revert_patches(FEATURE)
    assert parallel_state.get_tensor_model_parallel_world_size is original
    assert _status("t.ws") == "pending"


def test_class_method_target():
    original = vars(layers.ColumnParallelLinear)["forward"]
    register(Patch("t.fwd", FEATURE, "megatron.core.tensor_parallel.layers.ColumnParallelLinear.forward",
                   lambda self, *a, **k: "patched", why="test"))
    apply_patches(BACKEND)
    assert layers.ColumnParallelLinear.forward(None) == "patched"
    revert_patches(FEATURE)
    assert vars(layers.ColumnParallelLinear)["forward"] is original


def test_staticmethod_stays_static_and_is_restored():
    cls = cross_entropy.VocabParallelCrossEntropy
    raw = vars(cls)["calculate_logits_max"]
    assert isinstance(raw, staticmethod)
    register(Patch("t.static", FEATURE,
                   "megatron.core.tensor_parallel.cross_entropy.VocabParallelCrossEntropy.calculate_logits_max",
                   lambda logits: ("patched", logits), why="test"))
    apply_patches(BACKEND)
    assert isinstance(vars(cls)["calculate_logits_max"], staticmethod)
    assert cls().calculate_logits_max(1) == ("patched", 1)  # no `self` slipped in
    revert_patches(FEATURE)
    assert vars(cls)["calculate_logits_max"] is raw


@pytest.mark.parametrize(
    "target, detail",
    [
        ("megatron.core.parallel_state.no_such_function", "no_such_function"),
        ("megatron.core.parallel_state.NoSuchClass.method", "NoSuchClass"),
        ("megatron.core.no_such_module.function", "no_such_module"),
    ],
)
def test_missing_target_names_patch_target_and_version(target, detail):
    register(Patch("t.missing", FEATURE, target, lambda: None, why="test"))
    with pytest.raises(PatchError) as e:
        apply_patches(BACKEND)
    msg = str(e.value)
    assert "t.missing" in msg and target in msg and detail in msg
    assert importlib.metadata.version("megatron-core") in msg
    assert f"megatron-core=={patching.SUPPORTED_MEGATRON_CORE}" in msg
    assert _status("t.missing") == "pending"


def test_failed_apply_is_all_or_nothing():
    original = parallel_state.get_tensor_model_parallel_rank
    register(Patch("t.good", FEATURE, "megatron.core.parallel_state.get_tensor_model_parallel_rank",
                   lambda: 3, why="test"))
    register(Patch("t.bad", FEATURE, "megatron.core.parallel_state.does_not_exist", lambda: 0, why="test"))
    with pytest.raises(PatchError):
        apply_patches(BACKEND)
    assert parallel_state.get_tensor_model_parallel_rank is original
    assert _status("t.good") == _status("t.bad") == "pending"
    unregister("t.bad")
    apply_patches(BACKEND)
    assert parallel_state.get_tensor_model_parallel_rank() == 3


def test_idempotent_and_late_registration():
    calls = []

    def wrapper(original):
        calls.append(original)
        return lambda *a, **k: ("wrapped", original(*a, **k))

    register(Patch("t.wrap", FEATURE, "megatron.core.parallel_state.model_parallel_is_initialized",
                   wrapper, why="test", wrap=True))
    original = parallel_state.model_parallel_is_initialized
    apply_patches(BACKEND)
    installed = parallel_state.model_parallel_is_initialized
    apply_patches(BACKEND)  # no-op
    npu_dsv3.setup()  # no-op too
    assert calls == [original] and parallel_state.model_parallel_is_initialized is installed
    assert installed() == ("wrapped", original())

    # A feature module imported after setup: applied by the next apply call.
    register(Patch("t.late", FEATURE, "megatron.core.parallel_state.get_pipeline_model_parallel_rank",
                   lambda: 5, why="test"))
    assert _status("t.late") == "pending"
    npu_dsv3.setup()
    assert parallel_state.get_pipeline_model_parallel_rank() == 5 and len(calls) == 1


def test_patch_for_another_backend_is_skipped():
    original = parallel_state.get_data_parallel_rank
    register(Patch("t.other", FEATURE, "megatron.core.parallel_state.get_data_parallel_rank",
                   lambda **k: 9, why="test", backends=(OTHER_BACKEND,)))
    apply_patches(BACKEND)
    assert _status("t.other") == "skipped"
    assert parallel_state.get_data_parallel_rank is original
    revert_patches(FEATURE)
    assert _status("t.other") == "pending"


def test_applying_for_a_different_backend_is_refused():
    if not any(r["status"] != "pending" for r in patch_status()):
        pytest.skip("nothing applied")
    with pytest.raises(PatchError, match="already applied"):
        apply_patches(OTHER_BACKEND)
    with pytest.raises(ValueError):
        apply_patches("tpu")


def test_create_adds_then_deletes():
    target = "megatron.core.parallel_state._npu_dsv3_test_attribute"
    register(Patch("t.create", FEATURE, target, 42, why="test"))
    with pytest.raises(PatchError):
        apply_patches(BACKEND)  # absent and create=False
    unregister("t.create")
    register(Patch("t.create", FEATURE, target, 42, why="test", create=True))
    apply_patches(BACKEND)
    assert parallel_state._npu_dsv3_test_attribute == 42
    revert_patches(FEATURE)
    assert not hasattr(parallel_state, "_npu_dsv3_test_attribute")


def test_stacked_patches_revert_in_reverse_order():
    original = parallel_state.get_expert_model_parallel_rank
    target = "megatron.core.parallel_state.get_expert_model_parallel_rank"
    register(Patch("t.first", FEATURE + "-a", target, lambda: 1, why="test"))
    register(Patch("t.second", FEATURE + "-b", target, lambda f: (lambda: f() + 10), why="test", wrap=True))
    apply_patches(BACKEND)
    assert parallel_state.get_expert_model_parallel_rank() == 11
    with pytest.raises(PatchError, match="t.first"):
        revert_patches(FEATURE + "-a")  # would clobber t.second
    revert_patches(FEATURE + "-b")
    revert_patches(FEATURE + "-a")
    assert parallel_state.get_expert_model_parallel_rank is original


def test_decorator_registers_and_returns_the_function():
    @patch(FEATURE, "megatron.core.parallel_state.get_virtual_pipeline_model_parallel_rank", why="one line")
    def fake_vpp_rank():
        return 4

    row = next(r for r in patch_status() if r["feature"] == FEATURE)
    assert row == {
        "name": FEATURE + ".get_virtual_pipeline_model_parallel_rank",
        "feature": FEATURE,
        "target": "megatron.core.parallel_state.get_virtual_pipeline_model_parallel_rank",
        "backends": ["cpu", "cuda", "npu"],
        "status": "pending",
        "why": "one line",
    }
    assert fake_vpp_rank() == 4
    with pytest.raises(ValueError, match="already registered"):
        patch(FEATURE, "megatron.core.parallel_state.get_virtual_pipeline_model_parallel_rank", why="x")(fake_vpp_rank)
    with pytest.raises(ValueError, match="unknown backends"):
        Patch("t.bad-backend", FEATURE, "a.b", None, why="x", backends=("tpu",))


def test_setup_py_pins_the_supported_megatron_core():
    try:
        requires = importlib.metadata.requires("npu_dsv3") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("npu_dsv3 is not pip-installed")
    assert f"megatron-core=={patching.SUPPORTED_MEGATRON_CORE}" in requires
    assert importlib.metadata.version("megatron-core") == patching.SUPPORTED_MEGATRON_CORE


# --------------------------------------------------------------------------- CLI


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NPU_DSV3_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "npu_dsv3", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_patches_table_and_json():
    out = _run_cli("patches")
    assert out.returncode == 0, out.stderr
    assert "backend: cpu" in out.stdout
    assert "megatron-core: " + importlib.metadata.version("megatron-core") in out.stdout
    for text in ("backend-cpu", "torch.cuda.current_device", "applied", "torch_npu: "):
        assert text in out.stdout

    out = _run_cli("patches", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["backend"] == "cpu"
    assert info["versions"]["torch_npu"] == "not installed" or info["versions"]["torch_npu"]
    rows = [p for p in info["patches"] if p["feature"] == "backend-cpu"]
    assert rows and all(p["status"] == "applied" for p in rows)


def test_cli_in_process_and_unknown_subcommand(capsys):
    assert cli.main(["patches", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == BACKEND
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


# --------------------------------------------------------------------------- deferred setup

_AFTER_SETUP = """
import torch
import npu_dsv3.backend
from megatron.core.tensor_parallel import random
# The patches' effects, checked before anything asks the registry (which would complete the setup itself):
assert random._set_cuda_rng_state is npu_dsv3.backend.megatron_set_cuda_rng_state, 'megatron target not patched'
assert torch.cuda.current_device() == torch.device('cpu'), 'torch target not patched'
assert torch.empty(1, device='cuda').device.type == 'cpu', 'the CUDA->CPU device mode is not active'
from npu_dsv3.patching import patch_status
statuses = {row['status'] for row in patch_status()}
assert statuses <= {'applied', 'skipped'} and 'applied' in statuses, statuses
"""


@pytest.mark.parametrize("imports", [
    # import npu_dsv3 leaves megatron alone; importing megatron.core applies every patch
    # (inside a device context, whose exit pops the top torch function mode: it must stay its own)
    "import npu_dsv3, torch\n"
    "assert not [m for m in sys.modules if m.split('.')[0] == 'megatron'], 'megatron imported'\n"
    "with torch.device('meta'):\n    import megatron.core\nassert torch.empty(1).device.type == 'cpu'",
    # an npu_dsv3 module that imports megatron and is itself imported by a feature module (model.patches)
    "import npu_dsv3.config",
    # megatron first: import npu_dsv3 applies at once
    "import megatron.core\nassert 'npu_dsv3' not in sys.modules\nimport npu_dsv3",
    # torch's checkpoint reader, patched by the restricted reader, triggers the setup too (which imports megatron)
    "import npu_dsv3\nimport torch.distributed.checkpoint\nassert 'megatron.core' in sys.modules, 'no setup'",
], ids=["npu_dsv3-then-megatron", "npu_dsv3-module-importing-megatron", "megatron-then-npu_dsv3", "npu_dsv3-then-dcp"])
def test_patches_are_applied_when_a_setup_trigger_is_imported(imports):
    out = subprocess.run([sys.executable, "-c", "import sys\n" + imports + _AFTER_SETUP], cwd=REPO,
                         env={**os.environ, "NPU_DSV3_DEVICE": "cpu"}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_the_cli_parsers_import_no_megatron():
    """`npu-dsv3 --help` and argument errors come as fast as `import torch`: no subcommand module may import
    megatron (or a module that does) at its top level."""
    code = ("import sys\nfrom npu_dsv3.cli import build_parser\nbuild_parser()\n"
            "print([m for m in sys.modules if m.split('.')[0] == 'megatron'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "NPU_DSV3_DEVICE": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

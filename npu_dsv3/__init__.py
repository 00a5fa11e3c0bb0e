"""npu_dsv3: DeepSeek-V3 training with Megatron-Core on Ascend NPU (and CUDA, CPU).

``import npu_dsv3`` selects the device backend (see ``npu_dsv3.backend``) and
defers the rest of ``setup()`` -- registering the patches of every feature module
(``npu_dsv3.features``) and applying them for that backend (see
``npu_dsv3.patching``) -- until megatron.core or torch.distributed.checkpoint (the
restricted checkpoint reader patches torch's DCP reader) is first imported: right
after that package's module has executed, or, when an npu_dsv3 module's import
pulled it in, as soon as that (outermost) npu_dsv3 import finishes. If one of them
is already imported, it happens at once. So a command that never touches megatron
(``npu-dsv3 --help``, a converter's argument error) does not pay for importing it.
``setup()``, ``apply_patches``, ``revert_patches`` and ``patch_status`` complete
the deferred setup first. It happens once: calling ``setup()`` again changes
nothing, except that patches registered since the last call are applied.

``npu_dsv3.backend()`` returns "npu", "cuda" or "cpu"; ``npu_dsv3.backend`` is
also the backend module (``npu_dsv3.backend.device()``, ...).

Import npu_dsv3 before megatron: on Ascend, ``torch_npu.contrib.transfer_to_npu``
must remap ``torch.cuda`` before megatron modules bind names from it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import threading
import warnings
from pathlib import Path

__version__ = "0.1.0"


class _SourceOpsFinder(importlib.abc.MetaPathFinder):
    """In a source checkout the ops live in the top-level ``ops/`` folder beside
    this package; installed, they are ``npu_dsv3/ops`` (setup.py's package_dir).
    This finder gives the checkout the installed name, ``npu_dsv3.ops``; it only
    answers for that one name and only when the installed layout is absent."""

    def __init__(self, ops_dir: Path) -> None:
        self.ops_dir = ops_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != __name__ + ".ops":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.ops_dir / "__init__.py", submodule_search_locations=[str(self.ops_dir)]
        )


_here = Path(__file__).resolve().parent
if not (_here / "ops").is_dir() and (_here.parent / "ops" / "__init__.py").is_file():
    sys.meta_path.append(_SourceOpsFinder(_here.parent / "ops"))

# megatron-core warns at import that TransformerEngine / Apex are missing. That is
# this package's design (Ascend and CPU have neither), so the warnings say nothing.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex is not installed|Transformer Engine and Apex are not installed")
# megatron-core 0.16.1's own default cuda_graph_scope trips its own deprecation check on every config.
warnings.filterwarnings("ignore", message="full scope is deprecated")
# megatron-core 0.16.1's distributed-checkpoint loader still calls torch's deprecated DCP entry point.
warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)


class _SameRngStream(logging.Filter):
    """On the CPU backend the "CUDA" generator megatron forks for dropout is the CPU one, so its
    check that the CPU stream did not move inside a fork fires on every dropout; nothing is wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "CPU RNG state changed within GPU RNG context" or backend() != "cpu"


logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_SameRngStream())


class _OurMoELayer(logging.Filter):
    """megatron-core recognises its MoE layer by exact class, so for our subclass
    (``npu_dsv3.model.moe_layer.DeepSeekV3MoELayer``) it logs "Unknown MLP type" once per layer
    and lets the layer take megatron's default process groups, which are the right ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type: <class 'megatron.core.transformer.spec_utils")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_OurMoELayer())

# The backend module is callable: backend() -> current backend name.
from npu_dsv3 import backend  # noqa: E402
from npu_dsv3 import patching  # noqa: E402


def _setup_now() -> str:
    # A broken feature module fails the setup (the import of megatron.core that triggers it, or
    # setup()) loudly instead of half-applying.
    from npu_dsv3 import features

    name = backend.init_backend()
    features.register_patches()
    patching.apply_patches(name)
    return name


def setup() -> str:
    """Select the backend, register and apply the patches now (importing megatron.core);
    returns the backend. Idempotent."""
    patching.complete_deferred_setup()
    return _setup_now()


# Importing one of these completes the deferred setup: every patch target lives under them or
# under torch.cuda / torch.Tensor, which only megatron-core's code calls on the CPU backend.
_SETUP_TRIGGERS = ("megatron.core", "torch.distributed.checkpoint")
_imports_in_progress = threading.local()  # per thread: wrapped modules executing now


class _RunAfterExec:
    """Wraps a module's loader so that, once the module has executed and no other wrapped
    module is executing in this thread, the deferred setup runs if a setup trigger is loaded.
    Waiting for the outermost wrapped import keeps the feature modules from importing an
    npu_dsv3 module that is still half-executed (the one whose import pulled megatron in)."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _imports_in_progress.depth = getattr(_imports_in_progress, "depth", 0) + 1
        try:
            self._loader.exec_module(module)
        finally:
            _imports_in_progress.depth -= 1
        if _imports_in_progress.depth == 0 and _triggered():
            patching.complete_deferred_setup()


class _SetupTriggerHook(importlib.abc.MetaPathFinder):
    """Finds the setup triggers and npu_dsv3's submodules through the other finders and wraps
    their loaders in ``_RunAfterExec``. Removed once the deferred setup has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _SETUP_TRIGGERS and not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunAfterExec(spec.loader)
                return spec
        return None


_import_hook = _SetupTriggerHook()


def _triggered() -> bool:
    return any(name in sys.modules for name in _SETUP_TRIGGERS)


def _deferred_setup() -> None:
    _setup_now()
    if _import_hook in sys.meta_path:
        sys.meta_path.remove(_import_hook)


# On Ascend this imports torch_npu.contrib.transfer_to_npu, which must remap torch.cuda
# before megatron modules bind names from it: so it runs now, not deferred.
backend.init_backend()
patching.defer_setup(_deferred_setup)
if _triggered():
    patching.complete_deferred_setup()
else:
    sys.meta_path.insert(0, _import_hook)

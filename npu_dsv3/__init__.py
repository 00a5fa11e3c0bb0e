"""npu_dsv3: DeepSeek-V3 training with Megatron-Core on Ascend NPU (and CUDA, CPU).

``import npu_dsv3`` selects the device backend (see ``npu_dsv3.backend``),
imports the feature modules that register patches, and applies the registered
patches for that backend (see ``npu_dsv3.patching``). This happens once:
importing again or calling ``setup()`` again changes nothing, except that
patches registered since the last call (a feature module imported later) are
applied.

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

# Feature modules that register patches when imported. Owners of new features:
# append your module here (e.g. "npu_dsv3.model.patches"). Plain imports: a
# broken feature module fails `import npu_dsv3` loudly instead of half-applying.
_FEATURE_MODULES: tuple[str, ...] = ("npu_dsv3.backend", "npu_dsv3.model.patches", "npu_dsv3.schedules.weight_grad",
                                     "npu_dsv3.schedules.fb_overlap", "npu_dsv3.schedules.dualpipev")

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


def setup() -> str:
    """Select the backend, register and apply the patches; returns the backend.
    Idempotent."""
    from npu_dsv3.patching import apply_patches

    name = backend.init_backend()
    for module in _FEATURE_MODULES:
        importlib.import_module(module)
    apply_patches(name)
    return name


setup()

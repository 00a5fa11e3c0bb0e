"""Features: one module each, holding everything a feature adds to training.

A feature module (any module of this package; adding a feature is adding a file) declares:

- ``NAME``: the feature's one name. Its patches carry it as their ``feature`` label, and
  ``npu-dsv3 patches`` lists them under it.
- ``TESTS``: where its tests are (one line).
- ``FLAGS``: its rows of ``npu_dsv3.arguments.FLAG_TABLE`` (flag -> where the value lands, or
  ``argtypes.Unsupported(reason)``). Every flag is in exactly one module or in the table's own rows.
- ``add_flags(parser)``: declares its training flags (with help), except the layout flags, which
  every tool declares through ``npu_dsv3.layout.add_layout_flags``; for those, ``LAYOUT_HELP``
  gives training's help text by dest.
- ``config_fields(args)`` / ``parallel_fields(args)``: the model-config fields its flags set; the
  parallel ones only on the config that carries the parallel sizes.
- ``check_flags(args)`` / ``check_model(args, config)``: start-up validation, before and after
  the model config exists; a problem is one ``argtypes.ArgsError`` line naming the flags.
- ``patches()``: the ``patching.Patch`` objects it registers, each labelled ``NAME``; the
  replacements themselves live in the domain modules (model/, schedules/, checkpoint/, backend).

Every part is optional. Always-on features (``ALWAYS_ON = True``: the model's patches, the CPU
backend adapter, the checkpoint reader) have patches only. A feature module imports no megatron
at import time (the CLI parsers import these modules; start-up time matters); ``patches()`` and
the checks import what they need.

``import npu_dsv3`` registers every feature's patches (``register_patches``) when megatron.core is
first imported, then applies them for the backend. LoRA, QLoRA and the RL bridge are added as
modules here, like the others.

``FEATURES``, ``Feature``, ``add_feature_args``, ``feature_overrides`` and ``all_features`` are the
kernel switches' names (``npu_dsv3.features.kernels``), kept importable from here.
"""

import argparse
import functools
import importlib
import pkgutil
import threading
from types import ModuleType
from typing import Dict, List, Tuple

from npu_dsv3.features.kernels import FEATURES, Feature, add_feature_args, all_features, feature_overrides

__all__ = ["FEATURES", "Feature", "add_feature_args", "feature_overrides", "all_features", "modules",
           "register_patches", "flag_table", "layout_help", "add_flags", "config_fields", "parallel_fields",
           "check_flags", "check_model"]

_LOCK = threading.Lock()
_registered: List[str] = []


def modules() -> List[ModuleType]:
    """Every feature module: those with ``APPLY_FIRST`` first, then by module name."""
    return list(_modules(tuple(__path__)))


@functools.lru_cache(maxsize=None)
def _modules(path: Tuple[str, ...]) -> Tuple[ModuleType, ...]:
    # Found once per search path: the flag and config hooks below ask for the list many times per parse.
    found = [importlib.import_module(f"{__name__}.{info.name}") for info in pkgutil.iter_modules(list(path))]
    return tuple(sorted(found, key=lambda m: (not getattr(m, "APPLY_FIRST", False), m.__name__)))


def register_patches() -> None:
    """Register the patches of every feature not registered yet (``apply_patches`` applies them)."""
    from npu_dsv3.patching import register

    with _LOCK:
        for module in modules():
            if module.NAME in _registered or not hasattr(module, "patches"):
                continue
            for p in module.patches():
                if p.feature != module.NAME:
                    raise ValueError(f"patch {p.name!r} of {module.__name__} is labelled {p.feature!r}, "
                                     f"not its feature {module.NAME!r}")
                register(p)
            _registered.append(module.NAME)


def _each(hook: str):
    return [getattr(m, hook) for m in modules() if hasattr(m, hook)]


def flag_table() -> Dict[str, object]:
    """The features' rows of ``FLAG_TABLE``; a flag two features claim is an error."""
    rows: Dict[str, object] = {}
    for module in modules():
        for flag, where in getattr(module, "FLAGS", {}).items():
            if flag in rows:
                raise ValueError(f"{flag} is declared by two feature modules (one is {module.__name__})")
            rows[flag] = where
    return rows


def layout_help() -> Dict[str, str]:
    """Training's help of the layout flags the features own, by dest."""
    return {dest: text for m in modules() for dest, text in getattr(m, "LAYOUT_HELP", {}).items()}


def add_flags(parser: argparse.ArgumentParser) -> None:
    for add in _each("add_flags"):
        add(parser)


def config_fields(args: argparse.Namespace) -> dict:
    return {k: v for fields in _each("config_fields") for k, v in fields(args).items()}


def parallel_fields(args: argparse.Namespace) -> dict:
    return {k: v for fields in _each("parallel_fields") for k, v in fields(args).items()}


def check_flags(args: argparse.Namespace) -> None:
    for check in _each("check_flags"):
        check(args)


def check_model(args: argparse.Namespace, config) -> None:
    for check in _each("check_model"):
        check(args, config)

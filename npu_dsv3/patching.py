"""The patch registry: every change npu_dsv3 makes to megatron-core, torch or
torch_npu at runtime goes through here, so it is listed, revertible and fails
loudly when the installed library no longer has what it patches.

A feature module (``npu_dsv3.features``) declares its patches in ``patches()``; nothing is changed
then::

    NAME = "kernels"

    def patches():
        from npu_dsv3.model import patches as model
        from npu_dsv3.patching import Patch

        return [Patch(name="mla.apply_rotary_pos_emb", feature=NAME,
                      target="megatron.core.transformer.multi_latent_attention.apply_rotary_pos_emb",
                      replacement=model.mla_rotary, wrap=True,
                      why="--use-fused-rotary-pos-emb: MLA's RoPE through ops.apply_rotary")]

and ``npu_dsv3.setup()`` (run when megatron.core or torch.distributed.checkpoint
is first imported after ``import npu_dsv3``) registers every feature's patches and calls
``apply_patches(backend)``, which sets every pending patch for that backend. ``register``
and the ``@patch`` decorator add one patch directly (tests use them). Until then the setup is
deferred (``defer_setup``): ``apply_patches``, ``revert_patches``, ``unregister`` and
``patch_status`` complete it first, so they always act on and report the set-up registry.
``revert_patches()`` puts the originals back (tests use it; ``unregister(name)``
drops a patch); ``patch_status()`` and ``npu-dsv3 patches`` list what is
applied on this machine and why.

Targets are dotted paths: ``"pkg.module.attr"`` or ``"pkg.module.Class.attr"``.
The longest importable module prefix is imported and the rest is walked with
``getattr``.

Binding sites -- read this before registering a patch
-----------------------------------------------------
A patch replaces exactly the one name it targets. Megatron modules often do
``from megatron.core.x import f``; module ``y`` then holds its own reference to
``f``, and patching ``megatron.core.x.f`` does NOT change what ``y`` calls.
Find every module that calls the function through its own name (grep for the
import) and register one Patch per binding site (give them distinct ``name``s).
The registry deliberately does not chase references: silently patching some
call sites and not others is how "patched" code ends up half-applied.

Other rules:

* ``wrap=True``: ``replacement`` is ``callable(original) -> new``; it is called
  once, at apply time, with what the target held then.
* ``create=True``: the attribute may be absent; it is then created, and revert
  deletes it. The module/class that holds it must still exist.
* A target that is a ``staticmethod``/``classmethod`` in its class keeps that
  kind: a plain function replacement is wrapped the same way.
* Patches on the same target stack in registration order; revert goes in
  reverse order. Reverting one from under another one raises ``PatchError``.
* A missing target raises ``PatchError`` naming the patch, the target and the
  installed megatron-core version: npu_dsv3 is tested against exactly one
  megatron-core version (``SUPPORTED_MEGATRON_CORE``).
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

__all__ = [
    "ALL_BACKENDS",
    "SUPPORTED_MEGATRON_CORE",
    "Patch",
    "PatchError",
    "register",
    "unregister",
    "patch",
    "apply_patches",
    "revert_patches",
    "patch_status",
    "megatron_core_version",
    "defer_setup",
    "complete_deferred_setup",
]

ALL_BACKENDS: tuple[str, ...] = ("cpu", "cuda", "npu")

# The megatron-core version every patch was written against and tested with.
# Keep equal to the pin in setup.py (tests/unit/test_patching.py checks it).
SUPPORTED_MEGATRON_CORE = "0.16.1"

_MISSING = object()


class PatchError(RuntimeError):
    """A patch could not be applied or reverted."""


@dataclass
class Patch:
    name: str
    feature: str
    target: str
    replacement: Any
    why: str
    backends: tuple[str, ...] = ALL_BACKENDS
    wrap: bool = False
    create: bool = False
    # Runtime state, owned by the registry.
    status: str = field(default="pending", init=False)
    _owner: Any = field(default=None, init=False, repr=False)
    _attr: str = field(default="", init=False, repr=False)
    _saved: Any = field(default=_MISSING, init=False, repr=False)  # own-dict value before apply
    _installed: Any = field(default=_MISSING, init=False, repr=False)  # what we set

    def __post_init__(self) -> None:
        self.backends = tuple(self.backends)
        unknown = [b for b in self.backends if b not in ALL_BACKENDS]
        if unknown:
            raise ValueError(f"patch {self.name!r}: unknown backends {unknown}; valid: {ALL_BACKENDS}")
        if "." not in self.target:
            raise ValueError(f"patch {self.name!r}: target {self.target!r} is not a dotted path")


_REGISTRY: list[Patch] = []
_LOCK = threading.RLock()
_active_backend: str | None = None  # backend of the patches currently applied/skipped
_deferred_setup: Callable[[], Any] | None = None


def defer_setup(setup: Callable[[], Any] | None) -> None:
    """Register the setup ``complete_deferred_setup`` runs (None: nothing is deferred)."""
    global _deferred_setup
    _deferred_setup = setup


def complete_deferred_setup() -> None:
    """Run the deferred setup once. A call made while it runs (its own apply_patches) does
    nothing; if it fails it stays deferred, so the next call retries and fails loudly again."""
    global _deferred_setup
    setup, _deferred_setup = _deferred_setup, None
    if setup is None:
        return
    try:
        setup()
    except BaseException:
        _deferred_setup = setup
        raise


def register(p: Patch) -> Patch:
    """Add a patch (pending until the next ``apply_patches``)."""
    with _LOCK:
        if any(q.name == p.name for q in _REGISTRY):
            raise ValueError(f"a patch named {p.name!r} is already registered; pass a distinct name=")
        _REGISTRY.append(p)
    return p


def unregister(name: str) -> None:
    """Remove a patch by name, reverting it first if it is applied."""
    complete_deferred_setup()
    with _LOCK:
        p = _find(name)
        if p.status == "applied":
            _revert_one(p)
        _REGISTRY.remove(p)


def patch(
    feature: str,
    target: str,
    why: str,
    *,
    backends: Iterable[str] = ALL_BACKENDS,
    wrap: bool = False,
    create: bool = False,
    name: str | None = None,
) -> Callable[[Any], Any]:
    """Decorator: register the decorated function/class as the replacement of
    ``target``. Returns it unchanged, so it stays directly testable."""

    def deco(obj: Any) -> Any:
        register(
            Patch(
                name=name or f"{feature}.{target.rsplit('.', 1)[-1]}",
                feature=feature,
                target=target,
                replacement=obj,
                why=why,
                backends=tuple(backends),
                wrap=wrap,
                create=create,
            )
        )
        return obj

    return deco


def apply_patches(backend: str) -> None:
    """Apply every pending patch registered for ``backend``; mark the others
    "skipped". Already-applied patches are left alone, so calling it again is a
    no-op unless new patches were registered since. All-or-nothing per call: if
    one patch fails, the ones this call applied are reverted before raising."""
    global _active_backend
    complete_deferred_setup()
    if backend not in ALL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {ALL_BACKENDS}")
    with _LOCK:
        if _active_backend is not None and _active_backend != backend:
            raise PatchError(
                f"patches are already applied for backend {_active_backend!r}; "
                f"call revert_patches() before applying them for {backend!r}"
            )
        touched: list[Patch] = []
        try:
            for p in _REGISTRY:
                if p.status != "pending":
                    continue
                if backend in p.backends:
                    _apply_one(p)
                else:
                    p.status = "skipped"
                touched.append(p)
        except BaseException:
            for p in reversed(touched):
                if p.status == "applied":
                    _revert_one(p)
                p.status = "pending"
            raise
        _active_backend = backend if any(p.status != "pending" for p in _REGISTRY) else None


def revert_patches(feature: str | None = None) -> None:
    """Restore the originals of the applied patches (of one feature, or all),
    newest first. Their status (and that of skipped ones) goes back to
    "pending", so a later ``apply_patches`` applies them again."""
    global _active_backend
    complete_deferred_setup()
    with _LOCK:
        for p in reversed(_REGISTRY):
            if feature is not None and p.feature != feature:
                continue
            if p.status == "applied":
                _revert_one(p)
            p.status = "pending"
        if all(p.status == "pending" for p in _REGISTRY):
            _active_backend = None


def patch_status() -> list[dict]:
    """One dict per registered patch, in registration (= application) order."""
    complete_deferred_setup()
    with _LOCK:
        return [
            {
                "name": p.name,
                "feature": p.feature,
                "target": p.target,
                "backends": list(p.backends),
                "status": p.status,
                "why": p.why,
            }
            for p in _REGISTRY
        ]


# --------------------------------------------------------------------------- internals


def _find(name: str) -> Patch:
    for p in _REGISTRY:
        if p.name == name:
            return p
    raise KeyError(f"no patch named {name!r}")


def megatron_core_version() -> str:
    try:
        from megatron.core.package_info import __version__
    except Exception:  # not installed, or broken: the message should still be readable
        return "not installed"
    return __version__


def _missing(p: Patch, detail: str) -> PatchError:
    import torch

    return PatchError(
        f"patch {p.name!r} (feature {p.feature!r}) cannot be applied: target {p.target!r} "
        f"not found ({detail}). Installed: megatron-core {megatron_core_version()}, "
        f"torch {torch.__version__}. npu_dsv3 supports megatron-core=={SUPPORTED_MEGATRON_CORE}: "
        f"install it (pip install megatron-core=={SUPPORTED_MEGATRON_CORE}), or port this patch "
        f"to the installed version."
    )


def _resolve(p: Patch) -> tuple[Any, str]:
    """(object holding the attribute, attribute name)."""
    parts = p.target.split(".")
    obj, used, import_error = None, 0, None
    for i in range(len(parts) - 1, 0, -1):  # longest importable prefix, leaving >= 1 attr
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError as e:  # ModuleNotFoundError, or a module that fails to import
            import_error = import_error or e
            continue
        used = i
        break
    if obj is None:
        raise _missing(p, f"no importable module in it: {import_error}")
    for j in range(used, len(parts) - 1):
        if not hasattr(obj, parts[j]):
            raise _missing(p, f"{'.'.join(parts[:j])!r} has no attribute {parts[j]!r}")
        obj = getattr(obj, parts[j])
    return obj, parts[-1]


def _own(owner: Any, attr: str) -> Any:
    """The raw value in owner's own __dict__ (keeps staticmethod wrappers), else _MISSING."""
    try:
        return vars(owner).get(attr, _MISSING)
    except TypeError:  # no __dict__
        return _MISSING


def _apply_one(p: Patch) -> None:
    owner, attr = _resolve(p)
    saved = _own(owner, attr)
    exists = saved is not _MISSING or hasattr(owner, attr)
    if not exists and not p.create:
        raise _missing(p, f"{type(owner).__name__} {getattr(owner, '__name__', owner)!r} "
                          f"has no attribute {attr!r}")
    current = getattr(owner, attr) if exists else None
    new = p.replacement(current) if p.wrap else p.replacement
    # Keep the descriptor kind of a class's staticmethod/classmethod.
    for kind in (staticmethod, classmethod):
        if isinstance(saved, kind) and not isinstance(new, kind):
            new = kind(new)
    setattr(owner, attr, new)
    p._owner, p._attr, p._saved, p._installed = owner, attr, saved, new
    p.status = "applied"


def _revert_one(p: Patch) -> None:
    owner, attr = p._owner, p._attr
    now = _own(owner, attr)
    if now is _MISSING:
        now = getattr(owner, attr, _MISSING)
    if now is not p._installed:
        raise PatchError(
            f"cannot revert patch {p.name!r}: {p.target!r} was changed after it was applied "
            f"(another patch on the same target? revert that one first)"
        )
    if p._saved is _MISSING:
        # Created by us, or inherited / provided by a module __getattr__ / a property:
        # deleting our value re-exposes the original lookup.
        delattr(owner, attr)
    else:
        setattr(owner, attr, p._saved)
    p._owner, p._saved, p._installed = None, _MISSING, _MISSING

"""The ``npu-dsv3`` command (also ``python -m npu_dsv3``).

Subcommands live in their own modules. To add one, write a module with::

    def add_parser(subparsers) -> argparse.ArgumentParser:
        p = subparsers.add_parser("convert", help="...")
        p.add_argument(...)
        return p

    def run(args: argparse.Namespace) -> int:
        ...
        return 0

and append ``("convert", "npu_dsv3.your_module")`` to ``SUBCOMMANDS``. The
module is imported only when the command line is built, so a subcommand's heavy
imports do not slow the others down more than one import each.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
from typing import Sequence

# (subcommand name, module path). "patches" is implemented in this module.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("patches", "npu_dsv3.cli"),
    ("verify", "npu_dsv3.verify"),
    ("demo", "npu_dsv3.demo"),
    ("schedule", "npu_dsv3.schedules.command"),
    ("convert", "npu_dsv3.convert"),
    ("data", "npu_dsv3.data.preprocess"),
]


# --------------------------------------------------------------------------- patches


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "patches",
        help="show the backend, library versions and every registered patch, by feature",
        description="Show the device backend, library versions, and every patch npu_dsv3 "
        "registered, grouped by the feature that registers it (npu_dsv3.features): its target, "
        "status on this machine, and why it exists.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    import torch

    from npu_dsv3 import __version__
    from npu_dsv3.patching import megatron_core_version

    return {
        "npu_dsv3": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_npu": _version("torch_npu"),
        "megatron-core": megatron_core_version(),
        "transformers": _version("transformers"),
        "mindspeed": _version("mindspeed"),
    }


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def _by_feature(patches: list[dict]) -> list[dict]:
    """The patches grouped under the feature modules that register them (``npu_dsv3.features``), in their
    order; patches another module registered under a label of its own come last, one group per label."""
    from npu_dsv3 import features

    groups = [{"feature": m.NAME, "module": m.__name__, "always_on": getattr(m, "ALWAYS_ON", False),
               "tests": getattr(m, "TESTS", ""), "patches": []} for m in features.modules()]
    index = {g["feature"]: g for g in groups}
    for p in patches:
        if p["feature"] not in index:
            index[p["feature"]] = {"feature": p["feature"], "module": None, "always_on": False, "tests": "",
                                   "patches": []}
            groups.append(index[p["feature"]])
        index[p["feature"]]["patches"].append(p)
    return groups


def run(args: argparse.Namespace) -> int:
    import npu_dsv3
    from npu_dsv3.patching import patch_status

    groups = _by_feature(patch_status())
    info = {"backend": npu_dsv3.backend(), "versions": versions(),
            "patches": [p for g in groups for p in g["patches"]],
            "features": [{k: v for k, v in g.items() if k != "patches"} for g in groups]}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"backend: {info['backend']}")
    for name, ver in info["versions"].items():
        print(f"{name}: {ver}")
    for group in groups:
        where = f"{group['module']}, always on" if group["always_on"] else group["module"] or "not a feature module"
        n = len(group['patches'])
        print(f"\nfeature {group['feature']} ({where}; {n} patch{'' if n == 1 else 'es'})")
        if group["patches"]:
            rows = [[p["target"], p["status"], p["why"]] for p in group["patches"]]
            print(_table(rows, ["target", "status", "why"]))
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npu-dsv3", description="DeepSeek-V3 on Megatron-Core (Ascend NPU, CUDA, CPU)."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, module_path in SUBCOMMANDS:
        module = importlib.import_module(module_path)
        module.add_parser(subparsers).set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from npu_dsv3.backend import BackendUnavailableError
    from npu_dsv3.patching import PatchError

    from npu_dsv3.console import to_console

    to_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args._argv = argv  # a subcommand that re-runs itself elsewhere (verify --device) needs it
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError, BackendUnavailableError, PatchError) as e:
        # Bad input or environment: one line that says what is wrong, no traceback.
        print(f"npu-dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be written: permissions, a file in the way, a full disk
        print(f"npu-dsv3 {args.command}: error: {_os_error_line(e, args)}", file=sys.stderr)
        return 2


# Where each command writes; an OSError that names no file (a full disk) is reported against it.
OUTPUT_DESTS = ("save_dir", "output_bf16_hf_path", "output_prefix")


def _os_error_line(e: OSError, args: argparse.Namespace) -> str:
    from npu_dsv3.argtypes import os_error_line

    return os_error_line(e, next((getattr(args, dest) for dest in OUTPUT_DESTS if getattr(args, dest, None)), None))


if __name__ == "__main__":
    sys.exit(main())

"""The package's import graph, read from the sources with `ast`: no cycles, and the layers point down.

Every `import` and `from ... import` counts, at module level and inside functions alike (a deferred
import still ties the two modules together: it only hides the cycle until the function runs).
Imports under `if TYPE_CHECKING:` never run and are left out. An edge goes to the module named
(`pkg.mod` for `from pkg import mod`, `pkg` for `from pkg import name`), not to the packages above it.
"""

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

from support import REPO

PACKAGE = "npu_dsv3"
OPS = PACKAGE + ".ops"  # the top-level ops/ folder is installed under this name (setup.py's package_dir)

# Run as programs, never imported by library code. data.preprocess is library code with a CLI part
# (its parser and main are called by cli.py), so it is not listed.
ENTRY_POINTS = {
    f"{PACKAGE}.{name}"
    for name in ("__main__", "cli", "convert", "verify", "demo", "pretrain", "finetune", "schedules.command")
}


def _module_files(roots=((REPO / PACKAGE, PACKAGE), (REPO / "ops", OPS))) -> Dict[str, Path]:
    """Dotted module name -> source file, for each (folder, package name): the package and ops/ (under its
    installed name)."""
    files = {}
    for root, name in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([name] + parts)] = path
    return files


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _is_type_checking_block(child))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a `from` import reads from; relative levels count from the module's package."""
    if not node.level:
        return node.module
    base = module.split(".")
    drop = node.level - 1 if is_package else node.level
    base = base[:len(base) - drop] if drop else base
    return ".".join(base + ([node.module] if node.module else []))


def _own(name: str, modules: Set[str]) -> Optional[str]:
    """The deepest module of ours that `name` names (an attribute's module for `pkg.mod.attr`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def import_graph(files: Optional[Dict[str, Path]] = None) -> Dict[str, Set[str]]:
    """Module -> the modules of ours it imports (`from pkg import mod` is an edge to pkg.mod)."""
    files = files or _module_files()
    modules = set(files)
    graph = {}
    for module, path in files.items():
        edges = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                source = _resolve(module, path.name == "__init__.py", node)
                names = [f"{source}.{alias.name}" for alias in node.names]
            edges.update(own for own in (_own(n, modules) for n in names) if own and own != module)
        graph[module] = edges
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle through every module of each strongly connected component (Tarjan's algorithm) that has
    more than one: a module's shortest way back to itself, so each failing line is one import chain."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        covered = set()
        for start in sorted(component):
            if start not in covered:
                cycle = _cycle_through(graph, component, start)
                covered.update(cycle)
                cycles.append(cycle)
    return cycles


def _cycle_through(graph: Dict[str, Set[str]], component: Set[str], start: str) -> List[str]:
    """A shortest path from ``start`` back to itself within its component (breadth first)."""
    parents = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _imports_of(graph: Dict[str, Set[str]], prefix: str) -> Dict[str, Set[str]]:
    return {m: edges for m, edges in graph.items() if _within(m, prefix)}


def test_every_import_form_is_an_edge(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": "from pkg.sub import leaf\n",
        "top.py": "import os\nimport pkg.sub.leaf\nfrom . import other\nfrom .sub import name_in_init\n",
        "other.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import top\n"
                    "def later():\n    from pkg.sub.leaf import f\n",
        "sub/__init__.py": "from ..other import later\n",
        "sub/leaf.py": "def f():\n    from .. import top\n",
    }
    for name, text in sources.items():
        (package / name).write_text(text)
    graph = import_graph(_module_files([(package, "pkg")]))
    assert graph == {"pkg": {"pkg.sub.leaf"}, "pkg.top": {"pkg.sub.leaf", "pkg.other", "pkg.sub"},
                     "pkg.other": {"pkg.sub.leaf"}, "pkg.sub": {"pkg.other"}, "pkg.sub.leaf": {"pkg.top"}}
    # one component; the second cycle is the shortest through the module the first one missed
    assert find_cycles(graph) == [["pkg.other", "pkg.sub.leaf", "pkg.top", "pkg.other"],
                                  ["pkg.sub", "pkg.other", "pkg.sub.leaf", "pkg.top", "pkg.sub"]]


def test_the_graph_is_read_from_every_module():
    graph = import_graph()
    assert f"{PACKAGE}.checkpoint.io" in graph[f"{PACKAGE}.convert"]  # deferred, inside a function
    assert f"{OPS}.gmm" in graph[f"{PACKAGE}.model.experts"]
    assert f"{OPS}._npu" in graph[f"{OPS}.gmm"]
    assert len(graph) == len(list((REPO / PACKAGE).rglob("*.py"))) + len(list((REPO / "ops").rglob("*.py")))


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_find_cycles_reports_each_cycle_as_a_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_ops_import_nothing_of_the_package_outside_ops():
    graph = {m: {e for e in edges if not _within(e, OPS)} for m, edges in import_graph().items()}
    assert not _violations(graph, OPS, PACKAGE)


def _violations(graph: Dict[str, Set[str]], importers: str, imported: str) -> Dict[str, List[str]]:
    """The modules under ``importers`` that import modules under ``imported``, with those modules."""
    found = {m: sorted(e for e in edges if _within(e, imported)) for m, edges in _imports_of(graph, importers).items()}
    return {m: e for m, e in found.items() if e}


def test_checkpoint_does_not_import_the_model():
    # The converters read and write tensors by name and layout; what they share with the model
    # (vocab padding, the MoE layer pattern) lives in config. The one exception: the torch_dist
    # writer asks megatron's own sharded_state_dict of a meta-device model for the file's layout.
    graph = import_graph()
    graph[f"{PACKAGE}.checkpoint.mcore_dist"] = graph[f"{PACKAGE}.checkpoint.mcore_dist"] - {f"{PACKAGE}.model.builder"}
    assert not _violations(graph, f"{PACKAGE}.checkpoint", f"{PACKAGE}.model")


def test_domain_packages_do_not_import_the_flag_layer():
    # Flags become configs in the entry points (arguments.build_configs); below them code takes configs.
    graph = import_graph()
    flags = {f"{PACKAGE}.{name}" for name in ("arguments", "arguments_model")}
    flags |= {m for m in graph if _within(m, f"{PACKAGE}.features")}  # features sit above the code they patch
    domain = ("training", "model", "checkpoint", "data", "schedules", "config", "layout")
    found = {m: sorted(edges & flags) for m, edges in graph.items()
             if any(_within(m, f"{PACKAGE}.{d}") for d in domain)}
    assert not {m: e for m, e in found.items() if e}


def test_library_modules_do_not_import_entry_points():
    graph = import_graph()
    into_entry = {m: sorted(edges & ENTRY_POINTS) for m, edges in graph.items() if m not in ENTRY_POINTS}
    assert not {m: e for m, e in into_entry.items() if e}


def _print_calls(path: Path):
    """(enclosing top-level function or None, line) of every print() call."""
    tree = ast.parse(path.read_text(), str(path))
    for top in tree.body:
        for node in ast.walk(top):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                yield (top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) else None), node.lineno


def test_library_code_does_not_print():
    # Library code logs (npu_dsv3.console routes it on a command line) or returns; entry points print. A
    # subcommand's `run` (its CLI part, e.g. data.preprocess.run) prints its result.
    found = [f"{module}:{line}" for module, path in _module_files().items() if module not in ENTRY_POINTS
             for function, line in _print_calls(path) if function != "run"]
    assert found == []

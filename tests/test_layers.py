"""The layers point down: the library never imports the packages above it, and has no cycle.

Layers, bottom to top: `fewclip/` (the library) < `datasets/` (installed as fewclip_datasets),
`trainers/` (fewclip_trainers) < `tools/`, `run_shell.py` and the tests. The graph is read from
the source with `ast` (imports inside functions count too: they run when the function does).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABOVE_LIBRARY = (
    "datasets",
    "trainers",
    "fewclip_datasets",
    "fewclip_trainers",
    "tools",
    "run_shell",
)


def module_imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved in `package`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import mod`
    return names


def library_graph() -> dict[str, set[str]]:
    """fewclip module -> the fewclip modules it imports."""
    modules = {f"fewclip.{path.stem}": path for path in (ROOT / "fewclip").glob("*.py")}
    modules["fewclip"] = modules.pop("fewclip.__init__")
    return {
        name: {dep for dep in module_imports(path, "fewclip") if dep in modules and dep != name}
        for name, path in modules.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (or a self-loop), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_cycle_finder_finds_loops_and_accepts_a_tree():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_library_import_graph_has_no_cycle():
    graph = library_graph()
    assert len(graph) > 20  # the graph was read
    assert find_cycles(graph) == []


def test_library_never_imports_a_layer_above_it():
    offenders = []
    for path in sorted((ROOT / "fewclip").glob("*.py")):
        for name in module_imports(path, "fewclip"):
            if name.split(".")[0] in ABOVE_LIBRARY:
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


@pytest.mark.parametrize(
    "folder, package, forbidden",
    [
        ("datasets", "fewclip_datasets", ("trainers", "fewclip_trainers", "tools", "run_shell")),
        ("trainers", "fewclip_trainers", ("datasets", "fewclip_datasets", "tools", "run_shell")),
    ],
)
def test_built_ins_import_only_the_library_and_themselves(folder, package, forbidden):
    offenders = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for name in module_imports(path, package):
            top = name.split(".")[0]
            if top in forbidden or top == folder:  # `import datasets` would be the HF package
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_importing_the_library_registers_nothing():
    """A fresh interpreter: `import fewclip.config` loads no dataset or trainer module."""
    import subprocess
    import sys

    code = (
        "import sys, fewclip.config, fewclip.run, fewclip.sweep\n"
        "from fewclip.registry import DATASETS, TRAINERS\n"
        "above = [m for m in sys.modules if m.split('.')[0] in "
        f"{ABOVE_LIBRARY!r}]\n"
        "print(len(DATASETS.names()), len(TRAINERS.names()), above)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True
    )
    assert done.stdout.split(maxsplit=2) == ["0", "0", "[]\n"]

"""The package's import graph has no cycle.

Every module of src/chiarformer is parsed (ast, nothing imported) and each import inside the
package becomes an edge: first the module-level ones (what runs on import), then with the
imports inside functions too; `if TYPE_CHECKING:` blocks never count. Importing `a.b.c` also runs the `__init__` of
each package on the way (`a.b`), so those count as edges too, except the importer's own parent
packages, which are already being imported when it runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/package (a package is its __init__)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], into_functions: bool):
    """Import statements in `body`: those run when the module is imported (module level, also
    inside if/try/with/class bodies), plus those inside functions when into_functions."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not into_functions:
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.orelse, into_functions)  # annotations only: never run
        else:
            for block in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, block, []):
                    yield from _imports(child.body if isinstance(child, ast.ExceptHandler) else [child], into_functions)


def import_graph(root: Path, package: str, into_functions: bool = False) -> dict[str, set[str]]:
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]  # what `from . import` means here
        targets = []
        for node in _imports(ast.parse(path.read_text(encoding="utf-8")).body, into_functions):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
                continue
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                origin = ".".join(anchor + (node.module.split(".") if node.module else []))
            else:
                origin = node.module or ""
            targets.append(origin)
            targets += [f"{origin}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
        own_parents = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in modules and step != name and step not in own_parents:
                    graph[name].add(step)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("into_functions", [False, True], ids=["module-level", "with-function-level"])
def test_chiarformer_has_no_import_cycle(into_functions):
    """No cycle when imported, and none hidden in a function either (a deferred import that closes
    a circle is still a circle: the two modules depend on each other)."""
    graph = import_graph(SRC, "chiarformer", into_functions)
    assert len(graph) > 30 and graph["chiarformer.train.run_config"]  # the walk saw the package and its imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    # a direct circle through relative imports
    ({"pkg/__init__.py": "", "pkg/a.py": "from .b import x\n", "pkg/b.py": "from . import a\nx = 1\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    # a circle through a subpackage's __init__ (absolute import, inside a module-level try)
    ({"pkg/__init__.py": "", "pkg/a.py": "try:\n    import pkg.sub.c\nexcept ImportError:\n    pass\n",
      "pkg/sub/__init__.py": "from ..a import y\n", "pkg/sub/c.py": ""},
     ["pkg.a", "pkg.sub", "pkg.a"]),
])
def test_a_real_cycle_is_found_and_reported(tmp_path, files, expected):
    _write(tmp_path, files)
    assert find_cycle(import_graph(tmp_path, "pkg")) == expected


def test_a_cycle_hidden_in_a_function_is_found_only_with_function_level_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n"
                    "def f():\n    from .b import g\n    return g()\n",
        "pkg/b.py": "from .a import f\ndef g():\n    return 1\n",
        "pkg/c.py": "from .a import f\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.a"} and graph["pkg.a"] == set()
    assert find_cycle(graph) is None
    deep = import_graph(tmp_path, "pkg", into_functions=True)
    assert deep["pkg.a"] == {"pkg.b"}  # TYPE_CHECKING's pkg.c still does not count
    assert find_cycle(deep) == ["pkg.a", "pkg.b", "pkg.a"]


# The model core is usable without the engine or the data code (hf.py and reference.py build on
# it); the data code without the engine. Imports inside functions count.
CORE = ("config", "operators", "ops", "layers", "routing", "sparse", "model", "loss", "sampling", "errors")
BOUNDARIES = [(f"chiarformer.{m}", ("chiarformer.train", "chiarformer.data")) for m in CORE]
BOUNDARIES.append(("chiarformer.data", ("chiarformer.train",)))


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


@pytest.mark.parametrize("module, forbidden", BOUNDARIES, ids=[m for m, _ in BOUNDARIES])
def test_import_boundaries(module, forbidden):
    graph = import_graph(SRC, "chiarformer", into_functions=True)
    starts = [name for name in graph if name == module or name.startswith(module + ".")]
    assert starts, f"{module} is not a module of the package"
    for start in starts:
        bad = sorted(m for m in reachable(graph, start) if m.startswith(forbidden))
        assert not bad, f"{start} reaches {bad[:3]}"


def test_a_boundary_crossing_is_found(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/model.py": "def f():\n    from .train import loop\n",
                      "pkg/train/__init__.py": "", "pkg/train/loop.py": ""})
    assert "pkg.train.loop" in reachable(import_graph(tmp_path, "pkg", into_functions=True), "pkg.model")

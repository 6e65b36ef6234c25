"""The package's modules import each other without circles (module-level imports; a function's
own deferred import is not a circle at import time). Read from the source with `ast`, so the test
does not depend on the order in which anything was imported."""

from __future__ import annotations

import ast
from pathlib import Path

import flowmm_edge

ROOT = Path(flowmm_edge.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = ("flowmm_edge",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:  # module level only
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` and the like are not imports at run time
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a module's own package is not a cycle
                found.add(t)
    return found


def test_no_module_level_import_circle():
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    assert graph["flowmm_edge.evaluation.evaluate"], "the import graph was not read"
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


LAYERS = ["models", "bindings", "methods", "compression", "calibration", "app", "evaluation"]
# each may use those before it in this list, never one after it (docs/ARCHITECTURE.md, "Layers")
CALLS_NO_LLAMA = {"models", "methods"}  # may not call llama.cpp: from bindings, methods take only the plan's type
BINDINGS_TYPES_METHODS_MAY_USE = {"MergePlan"}


def _layer_imports(root: Path, path: Path):
    """(line, layer imported, names) for every import statement of a module, deferred ones included."""
    layer_of_file = path.relative_to(root).parts[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 2:
                target = (node.module or "").split(".")[0]
            elif node.level == 1:
                target = layer_of_file
            else:
                parts = (node.module or "").split(".")
                target = parts[1] if parts[0] == "flowmm_edge" and len(parts) > 1 else None
            yield node.lineno, target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "flowmm_edge" and len(parts) > 1:
                    yield node.lineno, parts[1], []


def _upward_imports(root: Path) -> list[str]:
    offenders = []
    for layer in LAYERS:
        for path in (root / layer).rglob("*.py"):
            for line, target, names in _layer_imports(root, path):
                if target not in LAYERS:
                    continue
                where = f"{layer}/{path.name}:{line} imports {target}"
                if LAYERS.index(target) > LAYERS.index(layer):
                    offenders.append(where)
                elif layer in CALLS_NO_LLAMA and target == "bindings" and (
                        layer == "models" or not set(names) <= BINDINGS_TYPES_METHODS_MAY_USE):
                    offenders.append(f"{where} {names}")
    return offenders


def test_no_import_runs_back_up_the_layers_even_inside_a_function():
    """A layer reaches only down: models/ reads GGUF files and may not import bindings (llama.cpp),
    methods/ plans in numpy and takes from bindings only the plan's type, compression/ runs methods
    and may not import calibration/ or app/; checked on every import statement, deferred ones in
    functions included."""
    assert _upward_imports(ROOT) == []


def test_the_layer_check_finds_deferred_imports_that_break_the_layers(tmp_path):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "compression" / "x.py").write_text("def f():\n    from ..calibration import policy\n")
    (tmp_path / "methods" / "y.py").write_text("from ..bindings.kv_cache import MergePlan\n"
                                               "def g():\n    from ..bindings import runtime\n")
    (tmp_path / "models" / "z.py").write_text("import flowmm_edge.app.engine\n")
    assert sorted(_upward_imports(tmp_path)) == ["compression/x.py:2 imports calibration",
                                                 "methods/y.py:3 imports bindings ['runtime']",
                                                 "models/z.py:1 imports app"]

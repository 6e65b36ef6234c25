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


LAYERS = ["models", "bindings", "methods", "app", "evaluation"]  # each may use those before it (ARCHITECTURE.md)


def test_no_import_runs_back_up_the_layers_even_inside_a_function():
    """models/ reads GGUF files and may not reach up into bindings (llama.cpp), methods or app;
    checked on every import statement, deferred ones in functions included."""
    offenders = []
    for path in (ROOT / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and (node.module or "").split(".")[0] in LAYERS[1:]:
                offenders.append(f"{path.name}:{node.lineno} imports ..{node.module}")
            if isinstance(node, ast.Import) and any(a.name.startswith(tuple(f"flowmm_edge.{x}" for x in LAYERS[1:]))
                                                    for a in node.names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders

"""House rules of the package, read from its source: short functions, imports that run one way."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "axolotl_upft"
GLUE = {"plugin", "dataset", "cli", "workers"}  # workers: runs Axolotl's dataset loading on every rank
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text()) for path in sorted(PACKAGE.glob("*.py"))}


def imports(tree: ast.Module) -> set[str]:
    """The package modules a module imports (relative imports, at any depth of the file)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
    return found


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = [
        f"{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_the_import_graph_has_no_cycle_and_the_core_never_imports_the_glue():
    graph = {name: imports(tree) for name, tree in modules().items()}
    assert {name for name in graph if name != "__init__" and graph[name] & GLUE} <= GLUE
    assert not graph["dataset"] & {"plugin", "cli"} and not graph["plugin"] & {"cli"}

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph.get(path[-1], ())):
            if dep == start:
                return [*path, dep]
            if dep not in path and (found := cycle_from(start, [*path, dep])):
                return found
        return None

    assert [cycle for name in graph if (cycle := cycle_from(name, [name]))] == []

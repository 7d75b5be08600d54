"""The shape of quantization/: no module imports one that imports it back (lazy imports inside
functions included), and the torch-free vocabulary stays torch-free."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quantization"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    graph[name].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_module_of_quantization_imports_one_that_imports_it_back():
    graph = _imports()
    # the package root re-exports lazily, by name: it is the entry, not part of the graph
    graph.pop("quantization", None)
    for deps in graph.values():
        deps.discard("quantization")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_vocabulary_plans_tables_and_costs_import_no_torch():
    for name in ("types", "plan", "table", "cost"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        imported = {
            a.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for a in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "torch" not in imported, name

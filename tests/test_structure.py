"""The package's shape: no import cycles between its modules (lazy imports included)."""

import ast
from pathlib import Path

import sadra

SRC = Path(sadra.__file__).parent


def sadra_imports(path: Path) -> set[str]:
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sadra."):
            deps.add(node.module.split(".")[1])
    return deps - {path.stem}


def test_no_import_cycles():
    graph = {p.stem: sadra_imports(p) for p in SRC.glob("*.py")}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])

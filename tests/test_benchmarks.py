"""The benchmark scripts: the stability-curve arithmetic exactly, and probe_cost.py / gpu_probe.sh
end to end at toy size on the real model and real SST-2 rows."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from stability_curve import cheapest, curve, knee, setting_spearman, sub_pool_scores  # noqa: E402

# Two modules, 4 batches x 2 rounds; round i on batch i // 2.
POOL_A = {"samples": {"m1": [1, 3, 2, 2, 5, 7, 4, 4], "m2": [0, 2, 9, 9, 1, 1, 9, 6]},
          "batch_ids": [0, 0, 1, 1, 2, 2, 3, 3], "num_batches": 4}


def test_a_sub_pool_takes_the_first_rounds_of_the_chosen_batches():
    assert sub_pool_scores(POOL_A["samples"], POOL_A["batch_ids"], [0, 1], 2) == {"m1": 2.0, "m2": 5.0}
    assert sub_pool_scores(POOL_A["samples"], POOL_A["batch_ids"], [2, 3], 1) == {"m1": 4.5, "m2": 5.0}
    assert sub_pool_scores(POOL_A["samples"], POOL_A["batch_ids"], [3], 2) == {"m1": 4.0, "m2": 7.5}
    with pytest.raises(ValueError, match="fewer than 3 rounds"):
        sub_pool_scores(POOL_A["samples"], POOL_A["batch_ids"], [0], 3)


def test_setting_spearman_averages_disjoint_chunk_pairs():
    three = {"samples": {"a": [1, 1, 5, 5], "b": [2, 2, 4, 4], "c": [3, 3, 3, 3]}, "batch_ids": [0, 0, 1, 1],
             "num_batches": 2}
    flipped = {"samples": {"a": [1, 1, 3, 3], "b": [2, 2, 4, 4], "c": [3, 3, 5, 5]}, "batch_ids": [0, 0, 1, 1],
               "num_batches": 2}
    # chunk 0 (batch 0): identical order (+1); chunk 1 (batch 1): a,b,c = 5,4,3 against 3,4,5 (-1)
    assert setting_spearman(three, flipped, 1, 1) == pytest.approx(0.0)
    # both batches: means 3,3,3 vs 2,3,4: constant scores give no correlation (nan)
    assert math.isnan(setting_spearman(three, flipped, 2, 2))


def test_curve_costs_and_the_cheapest_point():
    timing = {"warmup": 1.0, "prepare": 0.5, "round": 2.0}
    points = curve(POOL_A, POOL_A, timing, train_seconds=100.0, rounds_options=[1, 2])
    assert [(p["batches"], p["rounds_per_batch"]) for p in points] == [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)]
    assert points[3]["seconds"] == 1.0 + 2 * 0.5 + 4 * 2.0 and points[3]["over_training"] == pytest.approx(0.1)
    assert points[3]["chunk_pairs"] == 2
    assert all(p["spearman"] == pytest.approx(1.0) for p in points)  # a pool against itself
    assert cheapest(points, 0.95) is points[0]
    assert cheapest([{**p, "spearman": 0.5} for p in points], 0.95) is None
    flat = [{"spearman": 0.9, "seconds": 10}, {"spearman": 0.85, "seconds": 4}, {"spearman": 0.7, "seconds": 1}]
    assert knee(flat, 0.1) is flat[1] and knee(flat, 0.01) is flat[0]


def run_script(args, env_extra=None, timeout=900):
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.slow
def test_probe_cost_reports_the_stability_cost_and_loop_figures(glue_dir, tmp_path):
    out = tmp_path / "probe_cost.json"
    # A part measured earlier (here: the LoRA run the costs are divided by) stays in the JSON.
    out.write_text(json.dumps({"lora_train_seconds": 100.0, "measured": {"training": {"git_commit": "abc"}}}))
    proc = run_script([sys.executable, "benchmarks/probe_cost.py", "--glue-dir", str(glue_dir), "--preset", "smoke",
                       "--only", "hutchinson", "gradient", "loop", "--pools", "per_module:4:2:2,joint:4:2:2",
                       "--loop-rows", "32", "--loop-repeats", "1", "--threads", "1", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    for key in ("hutchinson_spearman", "hutchinson_calibration_over_training", "gradient_calibration_over_training",
                "trainer_over_loop", "gradient_value_spearman"):
        assert isinstance(fig[key], float) and math.isfinite(fig[key]), key
    assert "gradient_spearman" in fig and 0 <= fig["gradient_same_rank_fraction"] <= 1
    assert -1 <= fig["hutchinson_spearman"] <= 1 and fig["trainer_over_loop"] > 0
    # 2 modes x (1, 2 batches) x (1, 2 rounds); the chosen setting is one of them
    assert len(fig["hutchinson_curve"]) == 8 and fig["hutchinson_setting"] in fig["hutchinson_curve"]
    assert {p["mode"] for p in fig["hutchinson_curve"]} == {"per_module", "joint"}
    assert all(p["seconds"] > 0 for p in fig["hutchinson_curve"])
    assert set(fig["measured"]) == {"training", "hutchinson", "gradient", "loop"} and fig["lora_train_seconds"] == 100.0
    point = fig["hutchinson_setting"]
    assert fig["hutchinson_calibration_over_training"] == pytest.approx(point["seconds"] / 100.0, abs=1e-4)
    assert fig["gradient_calibration_over_training"] == pytest.approx(fig["gradient_calibration_seconds"] / 100.0)
    assert "hutchinson" in proc.stdout


@pytest.mark.slow
def test_gpu_probe_runs_on_cpu_at_toy_size(glue_dir, tmp_path):
    proc = run_script(["bash", "benchmarks/gpu_probe.sh", "--device", "cpu", "--glue-dir", str(glue_dir)],
                      {"SADRA_GPU_PROBE_SIZE": "toy", "SADRA_GPU_OUT": str(tmp_path)}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads((tmp_path / "probe_cost.json").read_text())
    assert fig["size"] == "toy" and set(fig["models"]) == {"minilm", "smollm2"}
    for name, m in fig["models"].items():
        for key in ("hvp_over_grad_math", "fisher_over_grad", "calibration_over_training", "grad_seconds"):
            assert isinstance(m[key], float) and m[key] > 0, (name, key)
        assert isinstance(m["forward_over_reverse_over_grad"], (float, str))
        assert m["calibration_probes"] == 2 and m["lora_run_seconds_extrapolated"] > m["lora_step_seconds"]


@pytest.mark.slow
def test_gpu_grid_runs_on_cpu_at_smoke_size_and_resumes(glue_dir, tmp_path):
    grid, out = tmp_path / "grid", tmp_path / "out"  # out does not exist yet: the script makes it
    env = {"SADRA_GPU_GRID_SIZE": "smoke", "SADRA_GPU_GRID": str(grid), "SADRA_GLUE_DIR": str(glue_dir), "OUT": str(out),
           "SADRA_GPU_WHEELS": "",  # the wheels a lent machine needs are for its Python, not this one's
           "SADRA_GPU_SHARE": "1",
           "SADRA_GPU_SHARE_ARGS": "--device cpu --procs 2 --steps 2 --warmup 1 --batch-size 4 --max-length 16"}
    proc = run_script(["bash", "benchmarks/gpu_call.sh"], env, timeout=600)  # the device call, through gpu_grid.sh
    assert "gpu_call: " in proc.stdout and " peft " in proc.stdout, proc.stdout[-2000:]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (grid / "results.jsonl").read_text().splitlines()]
    seeds = {(r["method"], r["seed"]) for r in records}
    assert seeds == {("sadra", 0), ("sadra", 1), ("eva", 0)}  # method_seeds.eva=0
    assert all(r["preset"] == "gpu" and r["threads"] == 1 and r["train_samples"] == 32 for r in records)
    assert "gpu_grid: 3 of 3 cells have results" in proc.stdout
    names = {p.name for p in out.iterdir()}  # at most the 8 files a device call brings back
    assert {"results.jsonl", "results.md", "report.md", "benchmark_config.json", "runs.tar.gz"} <= names
    assert names <= {"results.jsonl", "failures.jsonl", "results.md", "report.md", "benchmark_config.json",
                     "probe_cost.json", "share.json", "runs.tar.gz"}
    share = json.loads((out / "share.json").read_text())  # the sharing benchmark ran first, with no MPS on CPU
    assert share["procs"] == 2 and share["alone"] > 0 and share["together"] > 0 and share["mps"] is None
    assert share["mps_note"] == "device cpu" and share["together_over_alone"] == round(share["together"] / share["alone"], 3)
    import tarfile

    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
    assert "mrpc/sadra/seed0/metrics.json" in names and "mrpc/sadra/seed0/allocation.json" in names
    assert not any(n.endswith(".safetensors") or "/checkpoints" in n for n in names)
    again = run_script(["bash", "benchmarks/gpu_grid.sh"], env, timeout=300)  # resumes: nothing left to run
    assert again.returncode == 0 and "started" not in again.stderr, again.stderr[-2000:]
    assert (grid / "results.jsonl").read_text().count("\n") == 3

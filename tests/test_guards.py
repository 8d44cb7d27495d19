"""Nothing hangs and nothing is silently wrong: cell time limits, settings guards, bad tokenizers,
malformed rows, reports on odd records, output paths checked before work."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_one_line_error, run_cli

TINY = ["max_train_samples=32", "max_eval_samples=16", "max_length=24", "train.epochs=1", "train.batch_size=8",
        "train.threads=2", "probe.max_probes=2", "probe.batch_size=4", "probe.num_batches=2",
        "probe.head_warmup_steps=1"]


def bench(out, glue_dir, *extra, methods=("lora", "random")):
    return run_cli("benchmark", "--preset", "smoke", "--tasks", "mrpc", "--methods", *methods, "--out", out, "--quiet",
                   *TINY, *extra, env={"SADRA_GLUE_DIR": str(glue_dir)}, timeout=900)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(1200)
def test_a_cell_past_its_time_limit_is_killed_recorded_and_retried_once(tmp_path, glue_dir):
    out = tmp_path / "b"
    # lora trains 200 epochs of 4 steps, far past 5 s on any machine, so each attempt is killed even
    # when it resumes from the last attempt's checkpoint; random keeps the tiny size and finishes.
    slow = ("per_method.lora.train.epochs=200", "per_method.lora.cell_timeout=5")
    first = bench(out, glue_dir, *slow)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "1 cell(s) failed: mrpc/lora/seed0" in first.stderr
    failures, results = lines(out / "failures.jsonl"), lines(out / "results.jsonl")
    assert [(f["method"], f["cell_timeout"]) for f in failures] == [("lora", 5)]
    assert "cell_timeout" in failures[0]["reason"]
    assert [r["method"] for r in results] == ["random"]  # the grid went on past the killed cell
    text = (out / "results.md").read_text()
    assert "## Failed cells" in text and "mrpc/lora/seed0: killed after its 5 s limit" in text
    # --no-retry-failed leaves it; a plain rerun retries it once; after two failures it is left alone.
    assert bench(out, glue_dir, *slow, "--no-retry-failed").returncode == 1
    assert len(lines(out / "failures.jsonl")) == 1
    assert bench(out, glue_dir, *slow).returncode == 1
    assert len(lines(out / "failures.jsonl")) == 2
    assert bench(out, glue_dir, *slow).returncode == 1
    assert len(lines(out / "failures.jsonl")) == 2
    keys = lambda rows: {(r["task"], r["method"], r["seed"]) for r in rows}  # noqa: E731
    assert not keys(lines(out / "failures.jsonl")) & keys(lines(out / "results.jsonl"))


def _children(pid):
    proc = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(x) for x in proc.stdout.split()]


@pytest.mark.timeout(1200)
def test_workers_run_cells_at_once_each_recorded_once_and_a_killed_cell_runs_again(tmp_path, glue_dir):
    out = tmp_path / "w"
    methods = ("lora", "random", "sadra", "lora-ga")
    args = ["benchmark", "--preset", "smoke", "--tasks", "mrpc", "--methods", *methods, "--out", str(out), "--quiet",
            "--workers", "2", *[t.replace("threads=2", "threads=1") for t in TINY]]
    cmd = [sys.executable, "-m", "sadra", *args]
    env = dict(os.environ, SADRA_GLUE_DIR=str(glue_dir))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    most, killed, deadline = 0, None, time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            kids = _children(proc.pid)
            most = max(most, len(kids))
            if killed is None and len(kids) == 2:
                time.sleep(2)  # inside the cell's work
                kids = _children(proc.pid)
                if kids:
                    killed = kids[0]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.communicate()[1]
    assert most == 2 and killed is not None, stderr[-2000:]
    assert proc.returncode == 1, stderr[-2000:]  # one cell failed (the killed one), the others finished
    failed = lines(out / "failures.jsonl")
    assert len(failed) == 1 and len(lines(out / "results.jsonl")) == 3
    rerun = run_cli(*args, env={"SADRA_GLUE_DIR": str(glue_dir)}, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    keys = [(r["task"], r["method"], r["seed"]) for r in lines(out / "results.jsonl")]
    assert sorted(keys) == sorted(("mrpc", m, 0) for m in methods)  # each cell exactly once
    assert (failed[0]["method"], failed[0]["seed"]) in {(m, s) for _, m, s in keys}
    assert lines(out / "failures.jsonl") == []  # the retried cell's failure is forgotten


def _alive(pid):
    try:  # a zombie has finished; in a container nothing may reap it
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
@pytest.mark.timeout(600)
def test_a_second_benchmark_on_the_folder_is_refused_and_a_cell_ends_with_its_benchmark(tmp_path, glue_dir):
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "sadra", "benchmark", "--preset", "smoke", "--tasks", "mrpc", "--methods", "lora",
           "--out", str(out), "--quiet", *TINY, "train.epochs=200",  # far longer than the test waits
           "train.logging_steps=100000", "train.evals_per_epoch=0"]  # silent: no write to a closed pipe ends it
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, SADRA_GLUE_DIR=str(glue_dir)))
    try:
        deadline = time.time() + 300
        while not (kids := _children(proc.pid)) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert kids, "the benchmark started no cell process"
        config = (out / "benchmark_config.json").read_text()
        second = run_cli(*cmd[3:], env={"SADRA_GLUE_DIR": str(glue_dir)}, timeout=300)
        assert_one_line_error(second, "another sadra benchmark", f"pid {proc.pid}", "--out")
        assert (out / "benchmark_config.json").read_text() == config
        time.sleep(3)  # the cell is past its start-up
        os.kill(proc.pid, signal.SIGKILL)  # the benchmark alone, not its process group
        proc.wait()
        deadline = time.time() + 30
        while _alive(kids[0]) and time.time() < deadline:
            time.sleep(0.2)
        assert not _alive(kids[0]), "the cell kept training after its benchmark died"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_rerun_with_other_settings_refuses_unless_a_new_series(tmp_path, glue_dir):
    out = tmp_path / "b"
    assert bench(out, glue_dir, methods=("lora",)).returncode == 0
    config_before = (out / "benchmark_config.json").read_text()
    results_before = (out / "results.jsonl").read_text()
    proc = bench(out, glue_dir, "train.epochs=2", methods=("lora",))
    assert_one_line_error(proc, "mrpc/lora/seed0", "other settings", "train.epochs was 1.0, now 2.0", "--series")
    assert (out / "benchmark_config.json").read_text() == config_before
    assert (out / "results.jsonl").read_text() == results_before
    # The same settings plus a new seed is the same series: allowed. A new series goes in its own folder.
    series = bench(out, glue_dir, "train.epochs=2", "--series", "two-epochs", methods=("lora",))
    assert series.returncode == 0, series.stderr[-3000:]
    assert lines(out / "two-epochs" / "results.jsonl")[0]["epochs"] == 2.0
    assert lines(out / "results.jsonl")[0]["settings_hash"] != lines(out / "two-epochs" / "results.jsonl")[0]["settings_hash"]


def test_model_folder_without_tokenizer_files_is_refused(tmp_path, minilm):
    from sadra.errors import ModelError
    from sadra.models import load_model

    model, _ = minilm
    folder = tmp_path / "weights-only"
    model.save_pretrained(folder)
    with pytest.raises(ModelError, match="tokenizer"):
        load_model(str(folder), 2)


def test_mrpc_row_with_an_extra_tab_names_the_file_and_line(tmp_path, glue_dir):
    from sadra.data import load_glue
    from sadra.errors import DataError

    folder = tmp_path / "MRPC"
    folder.mkdir()
    rows = (glue_dir / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()
    q, id1, id2, s1, s2 = rows[3].split("\t")
    rows[3] = "\t".join([q, id1, id2, s1[:20], s1[20:], s2])  # a tab inside sentence 1
    (folder / "train.tsv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"train\.tsv line 4 has 6 fields, expected 5"):
        load_glue("mrpc", "train", tmp_path)


def record(**changes):
    base = {"task": "mrpc", "method": "lora", "seed": 0, "metrics": {"f1": 0.8, "accuracy": 0.7, "loss": 0.6}}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_report_on_records_without_costs_or_params_and_a_lora_only_paired_table(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "results.jsonl").write_text(json.dumps(record()) + "\n" + json.dumps(record(seed=1)) + "\n")
    proc = run_cli("report", folder)
    assert proc.returncode == 0, proc.stderr
    text = (folder / "report.md").read_text()
    assert "| mrpc | —" in text  # no adapter_params: a dash, not a KeyError
    for table in text.split("\n\n"):
        rows = [r for r in table.splitlines() if r.startswith("|")]
        if rows:
            assert len({r.count("|") for r in rows}) == 1, table  # header, separator and rows agree


def test_report_on_a_record_without_metrics_fails_before_writing_anything(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "results.jsonl").write_text(json.dumps(record(metrics=None)) + "\n")
    assert_one_line_error(run_cli("report", folder), "record 1", "metrics")
    assert not list(folder.glob("*.png")) and not (folder / "report.md").exists()


def test_probe_checks_its_output_path_before_any_work(tmp_path, glue_dir):
    started = time.time()
    proc = run_cli("probe", "--task", "sst2", "--estimator", "hutchinson", "--max-probes", "64", "--out", tmp_path,
                   env={"SADRA_GLUE_DIR": str(glue_dir)})
    assert_one_line_error(proc, "is a folder")
    assert time.time() - started < 30  # no model was loaded, nothing probed
    proc = run_cli("allocate", tmp_path / "missing.json", "--out", tmp_path)
    assert_one_line_error(proc, "is a folder")


def test_head_warm_up_leaves_torch_global_generator_alone(minilm, sst2_rows):
    from sadra.data import calibration_batches
    from sadra.probe import restore_head, warm_up_head

    model, tokenizer = minilm
    batches = calibration_batches(sst2_rows, tokenizer, num_batches=1, batch_size=4, max_length=16, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    saved = warm_up_head(model, batches, 2, seed=7)
    restore_head(model, saved)
    assert torch.equal(torch.rand(3), expected)


def test_peak_memory_is_the_process_own_not_its_parents(tmp_path):
    import subprocess
    import sys

    code = ("import numpy as np, subprocess, sys; big = np.ones(400 * 2**20 // 8); "
            "print(subprocess.run([sys.executable, '-c', 'from sadra.memory import peak_memory_mb, reset_peak_memory;"
            "reset_peak_memory(); print(peak_memory_mb())'], capture_output=True, text=True).stdout)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    child_peak = float(out.stdout.strip())
    assert 0 < child_peak < 300, out  # the parent's 400 MB array is not the child's peak


@pytest.mark.timeout(1200)
def test_an_allocation_that_builds_uniform_lora_takes_the_lora_cells_results(tmp_path, glue_dir):
    flat = ["per_method.sadra.allocate.min_rank=8", "per_method.sadra.allocate.max_rank=8"]  # every module at r=8
    out = tmp_path / "b"
    proc = bench(out, glue_dir, *flat, methods=("lora", "sadra"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {r["method"]: r for r in lines(out / "results.jsonl")}
    sadra, lora = records["sadra"], records["lora"]
    assert sadra["same_training_as"] == "mrpc/lora/seed0" and sadra["uniform_allocation"] is True
    assert sadra["metrics"] == lora["metrics"] and sadra["calibration_seconds"] > 0
    assert sadra["settings_hash"] != lora["settings_hash"]
    assert (out / "mrpc/sadra/seed0/adapter/adapter_model.safetensors").is_file()
    assert (out / "mrpc/sadra/seed0/train_log.jsonl").read_text() == (out / "mrpc/lora/seed0/train_log.jsonl").read_text()
    # The premise, checked: trained for real, the same allocation gives the very same results.
    alone = bench(tmp_path / "c", glue_dir, *flat, methods=("sadra",))
    assert alone.returncode == 0, alone.stderr[-3000:]
    trained = lines(tmp_path / "c" / "results.jsonl")[0]
    assert "same_training_as" not in trained and trained["metrics"] == lora["metrics"]
    # A twin that trained with other settings is refused, not copied.
    other = run_cli("train", "--task", "mrpc", "--method", "sadra", "--preset", "smoke", "--out", tmp_path / "d",
                    "--quiet", *TINY, *[f.replace("per_method.sadra.", "") for f in flat], "train.epochs=2",
                    f"uniform_twin={out / 'mrpc/lora/seed0'}", env={"SADRA_GLUE_DIR": str(glue_dir)}, timeout=900)
    assert_one_line_error(other, "uniform_twin", "with this run's settings")


def test_a_cell_recorded_before_a_setting_existed_names_its_real_difference(tmp_path):
    import yaml

    from sadra.benchmark import _Cell, _check_same_settings
    from sadra.config import load_benchmark_config
    from sadra.errors import ConfigError

    cfg = load_benchmark_config("smoke")
    cell = _Cell(cfg, tmp_path, "mrpc", "lora", 0)
    old = {k: v for k, v in cell.settings.items() if k not in ("eval_split", "min_train_words")}  # keys it predates
    cell.folder.mkdir(parents=True)
    (cell.folder / "run.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "results.jsonl").write_text(json.dumps({"task": "mrpc", "method": "lora", "seed": 0}) + "\n")
    assert _check_same_settings([cell], tmp_path) == {("mrpc", "lora", 0)}  # defaults fill what it predates
    old["train"] = dict(old["train"], threads=old["train"]["threads"] + 1)
    (cell.folder / "run.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"\(train\.threads was \d+, now \d+\)"):
        _check_same_settings([cell], tmp_path)

"""Crash safety, resume, determinism and non-finite values, on the real model and GLUE rows."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import assert_one_line_error, run_cli

TINY = ["max_train_samples=48", "max_eval_samples=32", "max_length=24", "train.epochs=1", "train.batch_size=8",
        "train.logging_steps=1", "train.threads=2", "probe.max_probes=2", "probe.batch_size=4", "probe.num_batches=2",
        "probe.head_warmup_steps=2"]


def popen_cli(args, log, env):
    return subprocess.Popen([sys.executable, "-m", "sadra", *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def test_benchmark_survives_repeated_sigkill(tmp_path, glue_dir):
    out = tmp_path / "bench"
    env = dict(os.environ, SADRA_GLUE_DIR=str(glue_dir))
    args = ["benchmark", "--preset", "smoke", "--tasks", "sst2", "mrpc", "--methods", "lora", "sadra-fisher", "random",
            "--out", out, "--quiet", "max_train_samples=32", "train.save_steps=1"]
    rng = random.Random(7)
    kills = 0
    for attempt in range(40):
        with open(tmp_path / f"log{attempt}", "w") as log:
            proc = popen_cli(args, log, env)
            try:
                proc.wait(timeout=rng.uniform(2.0, 14.0) if attempt < 8 else 900)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        assert proc.returncode == 0, (tmp_path / f"log{attempt}").read_text()[-3000:]
        break
    else:
        pytest.fail("the benchmark never completed")
    assert kills >= 3
    lines = (out / "results.jsonl").read_text().splitlines()
    keys = [(r["task"], r["method"], r["seed"]) for r in map(json.loads, lines)]
    assert sorted(keys) == sorted({(t, m, 0) for t in ("sst2", "mrpc") for m in ("lora", "sadra-fisher", "random")})
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    print(f"survived {kills} kills")


def test_train_killed_mid_training_resumes_and_matches_uninterrupted(tmp_path, glue_dir):
    env = dict(os.environ, SADRA_GLUE_DIR=str(glue_dir))
    common = ["train", "--task", "mrpc", "--method", "lora", "--seed", "3", "--quiet", *TINY, "train.save_steps=2"]
    whole = run_cli(*common, "--out", tmp_path / "whole", env=env)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "killed"
    with open(tmp_path / "log", "w") as log:
        proc = popen_cli([*common, "--out", run], log, env)
        deadline = time.time() + 600
        while not list((run / "checkpoints").glob("checkpoint-4")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (run / "metrics.json").exists(), "the run finished before it could be killed"
    assert list((run / "checkpoints").glob("checkpoint-*"))
    resumed = run_cli(*common, "--out", run, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    assert b["resumed_from"] and b["resumed_from"].startswith("checkpoint-")
    assert a["metrics"] == b["metrics"]
    assert a["optimizer_steps"] == b["optimizer_steps"] == 6


def test_same_seed_same_probe_allocation_and_metrics(tmp_path, glue_dir):
    from sadra.train import run_glue

    def settings_for():
        from sadra.config import RUN_DEFAULTS, merge_run, nest, parse_override

        s = merge_run(RUN_DEFAULTS, {"glue_dir": str(glue_dir)})
        for text in TINY:
            keys, value = parse_override(text)
            s = merge_run(s, nest(keys, value))
        return s

    runs = {name: run_glue("sst2", "sadra", seed, tmp_path / name, settings_for(), progress=False)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    probe = {n: json.loads((tmp_path / n / "probe.json").read_text()) for n in runs}
    alloc = {n: json.loads((tmp_path / n / "allocation.json").read_text()) for n in runs}
    assert probe["a"]["samples"] == probe["b"]["samples"] and probe["a"]["scores"] == probe["b"]["scores"]
    assert alloc["a"]["ranks"] == alloc["b"]["ranks"]
    assert runs["a"]["metrics"] == runs["b"]["metrics"]
    assert probe["a"]["samples"] != probe["c"]["samples"]


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    from sadra.models import load_model

    model, tokenizer = load_model("minilm", 2, seed=0)
    with torch.no_grad():
        model.bert.encoder.layer[3].output.dense.weight[0, 0] = float("nan")
    folder = tmp_path_factory.mktemp("nan-model")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_non_finite_training_loss_stops_the_run_and_records_nothing(tmp_path, glue_dir, nan_model):
    env = dict(os.environ, SADRA_GLUE_DIR=str(glue_dir))
    proc = run_cli("train", "--task", "sst2", "--method", "lora", "--model", nan_model, "--out", tmp_path / "run",
                   "--quiet", *TINY, env=env)
    assert_one_line_error(proc, "non-finite training loss", "step 1")
    assert not (tmp_path / "run" / "metrics.json").exists()

    bench = tmp_path / "bench"
    proc = run_cli("benchmark", "--preset", "smoke", "--tasks", "sst2", "--methods", "lora", "--out", bench, "--quiet",
                   f"model={nan_model}", env=env)
    # In a grid the failed cell is recorded, not appended, and the benchmark ends with status 1.
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "non-finite training loss" in proc.stderr
    assert not (bench / "results.jsonl").exists() or (bench / "results.jsonl").read_text() == ""
    failures = [json.loads(line) for line in (bench / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and "non-finite training loss" in failures[0]["reason"]


@pytest.mark.parametrize("estimator, what", [("fisher", "non-finite logits"), ("hutchinson", "non-finite loss")])
def test_non_finite_loss_while_probing_names_the_batch(tmp_path, glue_dir, nan_model, estimator, what):
    proc = run_cli("probe", "--task", "sst2", "--glue-dir", glue_dir, "--model", nan_model, "--max-probes", "1",
                   "--estimator", estimator, "--batch-size", "4", "--num-batches", "1", "--head-warmup-steps", "0",
                   "--out", tmp_path / "p.json")
    assert_one_line_error(proc, what, "batch 0")
    assert not (tmp_path / "p.json").exists()


def test_resume_skips_a_half_written_checkpoint(tmp_path):
    from sadra.train import last_complete_checkpoint

    for step, complete in ((2, True), (4, True), (6, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "adapter_model.safetensors").write_bytes(b"x")
        if complete:
            (ckpt / "trainer_state.json").write_text('{"global_step": %d}' % step)
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # torn while writing
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert not (tmp_path / "checkpoint-6").exists() and not (tmp_path / "checkpoint-4").exists()

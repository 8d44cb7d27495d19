"""Two processes on CPU (torchrun, gloo): pooled probe == one process; identical allocations; DDP training."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def torchrun(*args, env=None, timeout=900):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def test_pooled_probe_over_two_processes_equals_one_process(tmp_path, glue_dir):
    sys.path.insert(0, str(HERE))
    from ddp_probe_script import reports

    proc = torchrun(HERE / "ddp_probe_script.py", glue_dir, tmp_path / "pooled.json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    single = reports(glue_dir)
    # Each process computes in float32 with its own thread count, so second-order products agree to
    # float32 rounding of their summed terms (about 1e-6 of the module's largest sample), not bit for
    # bit; a pooling bug moves them by far more.
    for est in ("fisher", "hutchinson"):
        assert pooled[est]["probes"] == single[est]["probes"] == 4
        for name, values in single[est]["samples"].items():
            scale = 1e-5 * max(map(abs, values))
            assert pooled[est]["samples"][name] == pytest.approx(values, rel=1e-5, abs=scale)
            assert pooled[est]["scores"][name] == pytest.approx(single[est]["scores"][name], rel=1e-5, abs=scale)


def test_sadra_train_under_torchrun_agrees_on_the_allocation(tmp_path, glue_dir):
    out = tmp_path / "run"
    proc = torchrun("-m", "sadra", "train", "--task", "mrpc", "--method", "sadra", "--seed", "0", "--out", out, "--quiet",
                    f"glue_dir={glue_dir}", "max_train_samples=32", "max_eval_samples=16", "max_length=32",
                    "train.epochs=1", "train.batch_size=4", "train.threads=1", "probe.max_probes=2", "probe.batch_size=4",
                    "probe.num_batches=2", "probe.head_warmup_steps=2", "probe.estimator=fisher",
                    "allocate.rule=proportional")  # uneven ranks, so agreeing on them means something
    assert proc.returncode == 0, proc.stderr[-4000:]
    hashes = dict(re.findall(r"sadra: rank (\d) rank allocations sha256 ([0-9a-f]{64})", proc.stderr))
    assert set(hashes) == {"0", "1"} and hashes["0"] == hashes["1"]
    record = json.loads((out / "metrics.json").read_text())
    assert record["processes"] == 2
    # 32 rows over 2 processes x batch 4 = 4 optimizer steps per epoch.
    assert record["optimizer_steps"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_benchmark_under_torchrun_records_each_cell_once(tmp_path, glue_dir):
    out = tmp_path / "bench"
    proc = torchrun("-m", "sadra", "benchmark", "--preset", "smoke", "--tasks", "mrpc", "--methods", "lora", "sadra-fisher",
                    "--out", out, "--quiet", f"glue_dir={glue_dir}", "max_train_samples=32", "train.threads=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["lora", "sadra-fisher"]
    assert all(r["processes"] == 2 for r in records)


def test_sadra_train_under_accelerate_launch(tmp_path, glue_dir):
    # On CPU, accelerate's launcher runs one process (its multi-CPU mode needs MPI); with GPUs,
    # `accelerate launch --multi_gpu` starts torchrun-style workers, the path tested above.
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m", "sadra", "train",
                           "--task", "mrpc", "--method", "sadra-fisher", "--out", str(out), "--quiet", f"glue_dir={glue_dir}",
                           "max_train_samples=32", "max_eval_samples=16", "max_length=32", "train.epochs=1",
                           "train.batch_size=4", "train.threads=1", "probe.max_probes=2", "probe.batch_size=4",
                           "probe.num_batches=2", "probe.head_warmup_steps=2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads((out / "metrics.json").read_text())
    assert record["optimizer_steps"] == 8 and (out / "allocation.json").is_file()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["raise", "hang"])
def test_one_process_failing_ends_the_others_with_the_error(how):
    """Nothing waits in a collective for ever: a failing peer ends the job, a hanging one times out."""
    import time

    started = time.time()
    proc = torchrun(HERE / "ddp_fail_script.py", how, env={"SADRA_DIST_TIMEOUT": "20"}, timeout=240)
    assert proc.returncode != 0
    assert "collective finished" not in proc.stdout
    if how == "raise":
        assert "rank 1 cannot read its calibration rows" in proc.stderr
    assert time.time() - started < 200

"""Shared fixtures: the real default model, the real GLUE folder (through SADRA_GLUE_DIR)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def pytest_configure(config):
    # A suite stopped by `timeout` (SIGTERM) unwinds like Ctrl-C, so the fixtures' finally blocks kill
    # the process groups the tests started instead of leaving a benchmark running on its own.
    signal.signal(signal.SIGTERM, _interrupt)


def glue_dir_setting() -> Path:
    value = os.environ.get("SADRA_GLUE_DIR")
    if not value:
        pytest.fail("set SADRA_GLUE_DIR to the GLUE folder (e.g. SADRA_GLUE_DIR=../shared/glue), as the README's test command does")
    path = Path(value).resolve()
    if not (path / "SST-2" / "train.tsv").is_file():
        pytest.fail(f"SADRA_GLUE_DIR={value} does not hold SST-2/train.tsv")
    return path


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    return glue_dir_setting()


@pytest.fixture(scope="session")
def minilm():
    from sadra.models import load_model

    model, tokenizer = load_model("minilm", 2, seed=0)
    return model, tokenizer


@pytest.fixture(scope="session")
def sst2_rows(glue_dir):
    from sadra.data import load_glue

    return load_glue("sst2", "train", glue_dir)


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run ``python -m sadra ARGS``; returns the CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sadra", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


def assert_one_line_error(proc, *needles):
    """Exit 2, one line on stderr starting 'sadra: error:', no traceback, naming each needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("sadra: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    return errors[0]


# The smoke preset on its two cheapest tasks (QNLI takes the same pair-input path as MRPC): 2 x 8 cells.
SMOKE_TASKS = ("sst2", "mrpc")
SMOKE_CELLS = 16


def start_benchmark(out, glue_dir, log):
    """The smoke benchmark in its own process group, output to ``log`` (a pipe could fill and block it)."""
    env = dict(os.environ, SADRA_GLUE_DIR=str(glue_dir))
    return subprocess.Popen([sys.executable, "-m", "sadra", "benchmark", "--preset", "smoke", "--tasks", *SMOKE_TASKS,
                             "--out", str(out), "--quiet"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def count_lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="session")
def smoke_out(tmp_path_factory, glue_dir):
    out = tmp_path_factory.mktemp("smoke")
    results = out / "results.jsonl"
    first_log = out.parent / "smoke-first.log"
    with open(first_log, "w") as log:
        proc = start_benchmark(out, glue_dir, log)
    deadline = time.time() + 900
    try:
        while count_lines(results) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, first_log.read_text()[-3000:]
        time.sleep(3)  # land the kill inside the next cell's training
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = count_lines(results)
    assert 3 <= killed_at < SMOKE_CELLS
    second_log = out.parent / "smoke-second.log"
    with open(second_log, "w") as log:
        rerun = start_benchmark(out, glue_dir, log)
        try:
            rerun.wait(timeout=1800)
        finally:  # a timeout (or pytest-timeout) must not leave the benchmark running on its own
            if rerun.poll() is None:
                os.killpg(rerun.pid, signal.SIGKILL)
                rerun.wait()
    output = second_log.read_text()
    assert rerun.returncode == 0, output[-4000:]
    return out, killed_at, output



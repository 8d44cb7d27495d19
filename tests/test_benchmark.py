"""The smoke benchmark end to end on the real model and GLUE rows, killed mid-grid and resumed."""

import json

import pytest

from conftest import SMOKE_TASKS
from sadra.config import load_benchmark_config

METHODS = load_benchmark_config("smoke").methods
CELLS = {(t, m) for t in SMOKE_TASKS for m in METHODS}


def test_every_cell_exactly_once_after_kill_and_rerun(smoke_out):
    out, killed_at, output = smoke_out
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    keys = [(r["task"], r["method"], r["seed"]) for r in records]
    assert len(keys) == len(set(keys)) == len(CELLS)
    assert {(t, m) for t, m, _ in keys} == CELLS
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*.tmp"))
    assert "| task | metric |" in output  # the table is printed at the end


def test_records_carry_metrics_costs_and_provenance(smoke_out):
    out, _, _ = smoke_out
    records = {(r["task"], r["method"]): r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    needed = {"task", "method", "seed", "metrics", "adapter_params", "head_params", "trainable_params", "trainable_percent",
              "calibration_seconds", "train_seconds", "examples_per_second", "peak_memory_mb", "train_samples",
              "eval_samples", "preset", "sadra_version", "git_commit", "settings_hash", "eval_split",
              "torch_version", "transformers_version", "peft_version"}
    for key, r in records.items():
        assert needed <= set(r), (key, needed - set(r))
        assert r["preset"] == "smoke" and r["train_samples"] == 64
        assert r["git_commit"] and r["eval_split"] == "validation"
        assert r["head_params"] == 384 * 2 + 2
    assert set(records[("mrpc", "lora")]["metrics"]) == {"f1", "accuracy", "loss"}
    assert set(records[("sst2", "lora")]["metrics"]) == {"accuracy", "loss"}
    for task in SMOKE_TASKS:
        lora = records[(task, "lora")]["adapter_params"]
        assert lora == 331_776
        assert records[(task, "lora-ga")]["adapter_params"] == lora
        for m in ("sadra", "sadra-seed", "random"):
            # Exactly LoRA's budget, less a leftover smaller than the cheapest rank step (768).
            assert lora - 768 < records[(task, m)]["adapter_params"] <= lora
        assert records[(task, "full")]["trainable_percent"] == pytest.approx(100.0)
        assert records[(task, "sadra")]["calibration_seconds"] > 0


def test_run_folders_hold_config_probe_allocation_log_and_safetensors(smoke_out):
    out, _, _ = smoke_out
    allocations = {}
    for method in ("sadra", "sadra-seed"):
        folder = out / "mrpc" / method / "seed0"
        for name in ("config.yaml", "probe.json", "allocation.json", "train_log.jsonl", "metrics.json"):
            assert (folder / name).is_file(), (method, name)
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        allocations[method] = json.loads((folder / "allocation.json").read_text())
        assert len(allocations[method]["ranks"]) == 36
        assert allocations[method]["params"] <= allocations[method]["budget"] == 331_776
    # The default reads the gradient spectrum (uniform ranks on MiniLM); the seed's rule spreads rank by trace.
    assert (allocations["sadra"]["estimator"], allocations["sadra"]["rule"]) == ("gradient", "spectral")
    assert len(set(allocations["sadra-seed"]["ranks"].values())) > 1
    log = [json.loads(line) for line in (out / "sst2" / "lora" / "seed0" / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in e for e in log) and any("eval_accuracy" in e for e in log)
    assert (out / "sst2" / "full" / "seed0" / "model" / "model.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))


def test_eva_and_adalora_ranks_differ_from_uniform(smoke_out):
    out, _, _ = smoke_out
    for task in SMOKE_TASKS:
        eva = json.loads((out / task / "eva" / "seed0" / "allocation.json").read_text())["ranks"]
        assert len(eva) == 36 and set(eva.values()) != {8} and max(eva.values()) <= 16
        record = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()
                  if json.loads(line)["task"] == task and json.loads(line)["method"] == "eva"][0]
        assert 0 < record["eva_passes"] <= 20 and record["eva_layers_capped"] >= 0  # bounded: the cap is 20 passes
        ada = json.loads((out / task / "adalora" / "seed0" / "allocation.json").read_text())["ranks"]
        assert len(ada) == 36 and set(ada.values()) != {12}


def test_results_md_has_table_params_and_paired_differences(smoke_out):
    out, _, _ = smoke_out
    text = (out / "results.md").read_text()
    for method in METHODS:
        assert method in text
    assert "| mrpc | f1 (validation) |" in text and "Trainable parameters" in text and "minus `lora`" in text

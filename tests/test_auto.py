"""`sadra.auto_lora_config` on each kind of data a user's script has, and the stock-Trainer example."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from sadra import auto_lora_config
from sadra.adapt import lora_ranks
from sadra.errors import ConfigError, DataError
from sadra.models import load_model

FAST = dict(num_batches=2, batch_size=8, probe={"max_probes": 2, "head_warmup_steps": 5})
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenised(sst2_rows):
    _, tokenizer = load_model("minilm", 2, seed=0)
    ds = Dataset.from_dict({"sentence": [r.text_a for r in sst2_rows[:64]], "label": [r.label for r in sst2_rows[:64]]})
    return ds.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True,
                  remove_columns=["sentence"]), tokenizer


def built_ranks(model, config):
    return lora_ranks(get_peft_model(model, config))


def test_dataset_dataloader_batches_and_pairs_give_the_same_allocation(tokenised, sst2_rows):
    ds, tokenizer = tokenised
    model, _ = load_model("minilm", 2, seed=0)
    config = auto_lora_config(model, ds, tokenizer=tokenizer, task_type="SEQ_CLS", lora_dropout=0.1, **FAST)
    alloc = config.sadra_allocation
    assert alloc.params <= alloc.budget == 331_776 and config.modules_to_save == ["classifier"]
    assert config.lora_dropout == 0.1 and config.sadra_report.estimator == "gradient"
    assert built_ranks(model, config) == {n: r for n, r in alloc.ranks.items() if r > 0}

    # The same 16 rows as batches, through a DataLoader, and as (text, label) pairs: the same probe input.
    picked = [ds[i] for i in range(16)]
    collate = DataCollatorWithPadding(tokenizer)
    batches = [dict(collate(picked[:8])), dict(collate(picked[8:]))]
    reports = [auto_lora_config(load_model("minilm", 2, seed=0)[0], data, task_type="SEQ_CLS", **FAST).sadra_report
               for data in (batches, DataLoader(picked, batch_size=8, collate_fn=collate))]
    assert set(reports[0].sample_batches) == {0, 1}
    assert reports[0].scores == pytest.approx(reports[1].scores, rel=1e-6)
    pairs = [(r.text_a, r.label) for r in sst2_rows[:16]]
    paired = auto_lora_config(load_model("minilm", 2, seed=0)[0], pairs, tokenizer=tokenizer, rule="spectral",
                              signal="gradient", budget=100_000, task_type="SEQ_CLS", **FAST)
    assert paired.sadra_allocation.rule == "spectral" and paired.sadra_allocation.params <= 100_000


def test_bad_data_and_budgets_name_the_fix(tokenised, sst2_rows):
    _, tokenizer = tokenised
    model, _ = load_model("minilm", 2, seed=0)
    with pytest.raises(DataError, match="classifier is probed with labels"):
        auto_lora_config(model, [r.text_a for r in sst2_rows[:16]], tokenizer=tokenizer, **FAST)
    with pytest.raises(ConfigError, match="tokenizer="):
        auto_lora_config(model, [(r.text_a, r.label) for r in sst2_rows[:16]], **FAST)
    with pytest.raises(ConfigError, match="lora-r<k>"):
        auto_lora_config(model, [], budget="r8")
    with pytest.raises(DataError, match="not understood"):
        auto_lora_config(model, 42)
    with pytest.raises(DataError, match="no input_ids"):
        auto_lora_config(model, Dataset.from_dict({"text": ["a"]}), tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="probe.estimator=gradient"):  # refused before the probe runs
        auto_lora_config(model, 42, signal="fisher", rule="spectral")


@pytest.mark.slow
def test_the_trainer_example_trains_and_saves_a_stock_adapter(glue_dir, tmp_path):
    env = dict(os.environ, SADRA_GLUE_DIR=str(glue_dir))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "trainer_sst2.py"), "--out", str(tmp_path),
                           "--train-rows", "128", "--eval-rows", "64", "--epochs", "1", "--calibration-batches", "2"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 <= result["accuracy"] <= 1 and result["loss"] > 0
    ranks = json.loads((tmp_path / "allocation.json").read_text())["ranks"]
    model = PeftModel.from_pretrained(load_model("minilm", 2, seed=0)[0], str(tmp_path / "adapter"))
    assert lora_ranks(model) == {n: r for n, r in ranks.items() if r > 0}
    assert torch.is_tensor(next(model.parameters()))

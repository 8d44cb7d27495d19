"""SADRA's allocation as a PEFT model: exact budget, exact ranks, stock PEFT reload."""

import json
import subprocess
import sys
import textwrap

import numpy as np
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
    code = code.replace("num_batches=4, batch_size=16", "num_batches=1, batch_size=4").replace("head_warmup_steps=50", "head_warmup_steps=2")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    alloc, peft_model = namespace["alloc"], namespace["peft_model"]
    assert lora_parameter_count(peft_model) == alloc.params <= alloc.budget == 331_776

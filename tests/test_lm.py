"""Decoder LMs (GPT-2's Conv1D, Llama) from configs: targets, probes, exact budget, stock PEFT reload, CLI."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import run_cli
from sadra.adapt import lora_parameter_count, lora_ranks
from sadra.allocate import allocate_ranks, uniform_budget
from sadra.lm import load_text_batches
from sadra.models import find_targets, load_model, target_shapes
from sadra.probe import estimate_sensitivity


def tiny_config(kind, vocab):
    from transformers import GPT2Config, LlamaConfig

    if kind == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=2, n_positions=64)
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_lm(request, tmp_path_factory, sst2_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sadra.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param, tokenizer.vocab_size))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    text = folder / "docs.txt"
    text.write_text("\n".join(r.text_a for r in sst2_rows[:200]) + "\n")
    return request.param, folder, text


def test_targets_shapes_probe_budget_and_stock_reload(tiny_lm, tmp_path):
    from peft import get_peft_model

    kind, folder, text = tiny_lm
    model, tokenizer = load_model(str(folder), task="causal-lm", attn_implementation="eager")
    targets = find_targets(model)
    shapes = target_shapes(model, targets)
    if kind == "gpt2":
        assert len(targets) == 8 and shapes["transformer.h.0.attn.c_attn"] == (192, 64)  # Conv1D: (d_in, d_out) stored
        assert shapes["transformer.h.0.mlp.c_fc"] == (256, 64) and shapes["transformer.h.1.mlp.c_proj"] == (64, 256)
    else:
        assert len(targets) == 14 and shapes["model.layers.0.self_attn.k_proj"] == (32, 64)
        assert shapes["model.layers.1.mlp.down_proj"] == (64, 112)
    assert not any("lm_head" in t or "wte" in t or "embed" in t for t in targets)

    batches = load_text_batches(text, tokenizer, num_batches=2, batch_size=4, max_length=24, seed=0)
    assert (batches[0]["labels"] == -100).any()  # padding is masked out of the loss
    hutch = estimate_sensitivity(model, batches, estimator="hutchinson", max_probes=3, rtol=0)
    fisher = estimate_sensitivity(model, batches, estimator="fisher", max_probes=3, rtol=0)
    assert set(hutch.scores) == set(fisher.scores) == set(targets)
    assert all(v > 0 for v in fisher.scores.values())

    alloc = allocate_ranks(fisher, budget="lora-r4", base_rank=4, min_rank=1, max_rank=16)
    assert alloc.budget == uniform_budget(shapes, 4)
    peft_model = get_peft_model(model, alloc.to_lora_config(task_type="CAUSAL_LM", init_lora_weights=False))
    assert lora_parameter_count(peft_model) == alloc.params
    assert lora_ranks(peft_model) == alloc.ranks
    peft_model.eval()
    ids = batches[0]["input_ids"][:2]
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained({str(folder)!r}, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            print(json.dumps(model(input_ids=torch.tensor({ids.tolist()})).logits.tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    torch.testing.assert_close(torch.tensor(json.loads(out.stdout.strip().splitlines()[-1])), logits, rtol=1e-4, atol=1e-5)


def test_probe_and_train_causal_lm_from_the_cli(tiny_lm, tmp_path):
    kind, folder, text = tiny_lm
    probe = run_cli("probe", "--model", folder, "--text-file", text, "--estimator", "fisher", "--max-probes", "2",
                    "--batch-size", "4", "--num-batches", "1", "--max-length", "24", "--out", tmp_path / "probe.json")
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert len(json.loads((tmp_path / "probe.json").read_text())["scores"]) == (8 if kind == "gpt2" else 14)
    train = run_cli("train", "--task", "causal-lm", "--text-file", text, "--method", "sadra", "--model", folder,
                    "--out", tmp_path / "run", "--quiet", "max_train_samples=48", "max_eval_samples=16", "max_length=24",
                    "train.epochs=1", "train.batch_size=8", "lora.r=4", "allocate.min_rank=1", "allocate.max_rank=16",
                    "probe.max_probes=2", "probe.batch_size=4", "probe.num_batches=2", "train.threads=2")
    assert train.returncode == 0, train.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["main_metric"] == "perplexity" and 1 < record["metrics"]["perplexity"] < 1e6
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert record["adapter_params"] <= record["lora_budget"]

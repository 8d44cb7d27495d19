"""`sadra allocate --format json|peft|axolotl`: each export loads back into real PEFT on the real
model, and every module's built rank is the allocated one."""

import json

import pytest
import yaml
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import assert_one_line_error, run_cli
from sadra.adapt import check_built_ranks, lora_ranks, random_allocation
from sadra.allocate import RankAllocation
from sadra.errors import ModelError
from sadra.models import find_targets, load_model, target_shapes


@pytest.fixture(scope="module")
def allocation():
    model, _ = load_model("minilm", 2, seed=0)
    shapes = target_shapes(model, find_targets(model))
    alloc = random_allocation(shapes, seed=3, budget="lora-r8", base_rank=8, min_rank=1, max_rank=32, prune=True,
                              normalize="none", power=1.0)
    first = next(iter(alloc.ranks))
    alloc.params -= alloc.ranks[first] * sum(shapes[first])
    alloc.ranks[first] = 0  # a pruned module: no adapter at all
    assert len(set(alloc.ranks.values())) > 3
    return alloc


def fresh_model():
    return load_model("minilm", 2, seed=0)[0]


def expected(alloc):
    return {n: r for n, r in alloc.ranks.items() if r > 0}


def test_json_export_round_trips(allocation, tmp_path):
    path = allocation.export(tmp_path / "alloc.json", "json")
    assert RankAllocation.load(path).ranks == allocation.ranks


def test_peft_export_builds_exactly_the_allocated_ranks(allocation, tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    allocation.export(folder / "adapter_config.json", "peft", task_type="SEQ_CLS")
    config = LoraConfig.from_pretrained(str(folder))
    model = get_peft_model(fresh_model(), config)
    assert lora_ranks(model) == expected(allocation)
    check_built_ranks(model, allocation.ranks)
    # The adapter it trains is a stock one: saved and reloaded, the ranks survive.
    model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(fresh_model(), str(tmp_path / "adapter"))
    assert lora_ranks(reloaded) == expected(allocation)


def test_axolotl_export_keys_feed_peft_as_axolotl_forwards_them(allocation, tmp_path):
    path = allocation.export(tmp_path / "lora.yaml", "axolotl")
    keys = yaml.safe_load(path.read_text())
    assert keys["adapter"] == "lora" and keys["lora_r"] == 8 and keys["lora_alpha"] == 16
    assert all(isinstance(a, int) for a in keys["lora_alpha_pattern"].values())
    config = LoraConfig(r=keys["lora_r"], lora_alpha=keys["lora_alpha"], target_modules=keys["lora_target_modules"],
                        rank_pattern=keys["lora_rank_pattern"], alpha_pattern=keys["lora_alpha_pattern"],
                        task_type="SEQ_CLS")
    model = get_peft_model(fresh_model(), config)
    assert lora_ranks(model) == expected(allocation)
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.r:
            assert module.scaling["default"] == pytest.approx(2.0), name  # alpha / r kept at LoRA's 16 / 8


def test_a_pattern_that_matches_nothing_is_caught(allocation):
    config = allocation.to_lora_config(task_type="SEQ_CLS")
    name = next(n for n, r in allocation.ranks.items() if r > 0 and r != 8)
    key = next(k for k in config.rank_pattern if name.replace(".", "\\.") in k)
    config.rank_pattern["^renamed\\." + key[1:]] = config.rank_pattern.pop(key)  # PEFT applies nothing, silently
    model = get_peft_model(fresh_model(), config)
    with pytest.raises(ModelError, match=name.replace(".", r"\.") + " has rank 8"):
        check_built_ranks(model, allocation.ranks)


def test_cli_probe_then_export_each_format(glue_dir, tmp_path):
    probe = tmp_path / "probe.json"
    # A Fisher probe: `allocate` then defaults to the proportional rule, whose ranks are uneven.
    proc = run_cli("probe", "--glue-dir", glue_dir, "--estimator", "fisher", "--num-batches", 1, "--batch-size", 8,
                   "--max-probes", 2, "--head-warmup-steps", 5, "--out", probe, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr and "Loading weights" not in proc.stderr  # a clean terminal
    outs = {}
    for fmt in ("json", "peft", "axolotl"):
        outs[fmt] = tmp_path / f"alloc.{fmt}"
        proc = run_cli("allocate", probe, "--format", fmt, "--out", outs[fmt], "--task-type", "SEQ_CLS", timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = RankAllocation.load(outs["json"]).ranks
    peft_cfg = json.loads(outs["peft"].read_text())
    axolotl = yaml.safe_load(outs["axolotl"].read_text())
    assert peft_cfg["task_type"] == "SEQ_CLS" and peft_cfg["peft_type"] == "LORA"
    assert sorted(peft_cfg["rank_pattern"].values()) == sorted(r for r in ranks.values() if r > 0)
    assert axolotl["lora_rank_pattern"] == peft_cfg["rank_pattern"]
    proc = run_cli("allocate", probe, "--format", "peft", timeout=120)
    assert_one_line_error(proc, "--out")

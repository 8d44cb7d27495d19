"""What the probe costs on one GPU, next to a gradient and a LoRA training step, for MiniLM and SmolLM2.

    bash benchmarks/gpu_probe.sh                       # one H200-class GPU, under 5 minutes
    python benchmarks/gpu_probe.py --size toy --device cpu --json probe.json   # the CPU check

Per model, on SST-2 batches of the ``paper`` preset's size (batch 32, max length 128; SmolLM2 on the
``sst2-lm`` prompts), with times synchronised on the device:

* hvp_over_grad_math                one joint Hutchinson probe as the library runs it (math attention
                                    kernel, the probe's rounds sharing one first-order graph) over one
                                    plain gradient with the default kernel
* forward_over_reverse_over_grad    the same probe as forward-over-reverse (``torch.func.jvp`` of the
                                    gradient) with the default (efficient) attention kernel; the error
                                    text instead if the kernel has no forward-mode derivative
* fisher_over_grad                  one Fisher round (forward, sampled labels, backward) over one gradient
* calibration_over_training         the default calibration at the paper preset's probe settings over
                                    one LoRA run of the paper preset on SST-2 (67,349 rows x 3 epochs),
                                    the run's time extrapolated from timed LoRA steps on the same batches
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from measure import forward_over_reverse_hvps, git_commit, median_seconds

SIZES = {  # max length, timed repeats, LoRA steps timed, probe settings over the paper preset's
    "full": {"max_length": 128, "repeats": 5, "lora_steps": 30, "probe": None},
    "toy": {"max_length": 16, "repeats": 1, "lora_steps": 2,
            "probe": {"num_batches": 2, "batch_size": 4, "max_probes": 2, "min_probes": 1, "head_warmup_steps": 2}},
}
SST2_TRAIN_ROWS, PAPER_EPOCHS = 67_349, 3


def model_and_batches(name: str, glue_dir: str, max_length: int, num_batches: int, batch_size: int,
                      device: torch.device):
    from sadra.data import calibration_batches, get_task, load_glue
    from sadra.models import load_model
    from sadra.probe import to_device

    rows = load_glue("sst2", "train", glue_dir)
    if name == "smollm2":
        from sadra.lm import prompt_batches

        model, tok = load_model("smollm2", task="causal-lm")
        batches = prompt_batches(rows, get_task("sst2-lm").prompt, tok, num_batches=num_batches,
                                 batch_size=batch_size, max_length=max_length, seed=0)
    else:
        # On a lent GPU machine the model package is absent: benchmarks/gpu_inputs.py packs a copy.
        packed = Path(__file__).resolve().parents[1] / ".gpu" / "minilm"
        model, tok = load_model(str(packed) if packed.is_dir() else "minilm", 2, seed=0)
        batches = calibration_batches(rows, tok, num_batches=num_batches, batch_size=batch_size,
                                      max_length=max_length, seed=0)
    return model.to(device), [to_device(b, device) for b in batches]


def unit_ratios(model, batch, device: torch.device, repeats: int) -> dict:
    from sadra.models import find_targets
    from sadra.probe import Calls, hf_logits, hf_loss, make_signal, probe_state

    names = find_targets(model)
    params = [model.get_submodule(n).weight for n in names]
    calls, gen = Calls(hf_loss, hf_logits), torch.Generator().manual_seed(0)
    joint, fisher = make_signal("hutchinson", mode="joint"), make_signal("fisher")
    k = joint.rounds_per_batch
    out: dict = {"modules": len(names), "tokens": int(batch["input_ids"].shape[1])}
    with probe_state(model, params):
        def hvp_round():
            g = joint.prepare(model, batch, params, calls, 0, first_visit=True)
            for i in range(k):
                joint.sample(g, batch, params, gen, retain=i + 1 < k)

        def fisher_round():
            fisher.sample(fisher.prepare(model, batch, params, calls, 0, first_visit=True), batch, params, gen, retain=False)

        hvp = median_seconds(hvp_round, repeats, device) / k
        fisher_seconds = median_seconds(fisher_round, repeats, device)
    for p in params:  # the same parameters, outside the probe's math-kernel context
        p.requires_grad_(True)
    grad_seconds = median_seconds(lambda: torch.autograd.grad(hf_loss(model, batch), params), repeats, device)
    vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.device, p.dtype).mul_(2).sub_(1) for p in params]
    try:
        fwd_rev = median_seconds(lambda: forward_over_reverse_hvps(model, names, params, batch, vs), repeats,
                                 device) / grad_seconds
    except Exception as err:  # a kernel without a forward-mode derivative: record why
        fwd_rev = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    out.update(grad_seconds=grad_seconds, hvp_over_grad_math=hvp / grad_seconds,
               forward_over_reverse_over_grad=fwd_rev, fisher_over_grad=fisher_seconds / grad_seconds)
    return out


def lora_model(model):
    """``model`` with LoRA r=8 on the matrices the grid adapts, in training mode."""
    from peft import LoraConfig, get_peft_model

    from sadra.models import find_targets

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=find_targets(model)))
    model.train()
    return model


def lora_step_seconds(model, batches, device: torch.device, steps: int) -> float:
    model = lora_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    state = {"i": 0}

    def step():
        model(**batches[state["i"] % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["i"] += 1

    return median_seconds(lambda: [step() for _ in range(steps)], 1, device) / steps


def measure_model(name: str, glue_dir: str, size: dict, device: torch.device) -> dict:
    from sadra.config import RUN_DEFAULTS, load_benchmark_config
    from sadra.probe import estimate_sensitivity

    probe = {**RUN_DEFAULTS["probe"], **load_benchmark_config("paper").resolve("sst2", "sadra")["probe"], **(size["probe"] or {})}
    model, batches = model_and_batches(name, glue_dir, size["max_length"], probe["num_batches"], probe["batch_size"], device)
    out = unit_ratios(model, batches[0], device, size["repeats"])
    start = time.perf_counter()
    report = estimate_sensitivity(model, batches, estimator=probe["estimator"], max_probes=probe["max_probes"],
                                  min_probes=probe["min_probes"], rtol=probe["rtol"],
                                  head_warmup_steps=probe["head_warmup_steps"] if name == "minilm" else 0,
                                  head_warmup_lr=probe["head_warmup_lr"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    calibration = time.perf_counter() - start
    step = lora_step_seconds(model, batches, device, size["lora_steps"])
    run = step * math.ceil(SST2_TRAIN_ROWS / probe["batch_size"]) * PAPER_EPOCHS
    out.update(calibration_seconds=calibration, calibration_probes=report.probes, lora_step_seconds=step,
               lora_run_seconds_extrapolated=run, calibration_over_training=calibration / run,
               probe_settings={k: probe[k] for k in ("estimator", "num_batches", "batch_size", "max_probes")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", default=os.environ.get("SADRA_GLUE_DIR", "../shared/glue"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--models", nargs="+", choices=("minilm", "smollm2"), default=["minilm", "smollm2"])
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    figures = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
               "size": args.size, "torch": torch.__version__, "machine": platform.machine(),
               "date": time.strftime("%Y-%m-%d"), "git_commit": git_commit(), "models": {}}
    for name in args.models:
        figures["models"][name] = measure_model(name, args.glue_dir, SIZES[args.size], device)
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")  # what is measured survives a timeout
    for name, fig in figures["models"].items():
        print(f"{name:8s} hvp/grad {fig['hvp_over_grad_math']:.2f}  fisher/grad {fig['fisher_over_grad']:.2f}  "
              f"fwd-over-rev/grad {fig['forward_over_reverse_over_grad']}  "
              f"calibration/training {fig['calibration_over_training']:.4f}")


if __name__ == "__main__":
    main()

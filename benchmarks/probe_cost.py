"""What a curvature probe costs, next to a plain gradient and a LoRA training run, all in one run.

    python benchmarks/probe_cost.py --glue-dir ../shared/glue --json probe_cost.json

Figures (ratios of times or memory measured in this run, on the same batch):

* hvp_over_grad              one Hutchinson probe (joint mode: one HvP giving every module a sample) as
                             the library runs it by default (the joint signal's rounds_per_batch probes share a
                             batch's first-order graph, its cost split among them) over one plain
                             gradient of the same loss w.r.t. the target weights
* hvp_over_grad_unshared     the same with one probe per graph (graph + one HvP)
* alternatives_not_adopted   the same probe as k vectors in one vmapped backward (is_grads_batched),
                             and as forward-over-reverse (torch.func.jvp of the gradient)
* per_module_round_over_grad one per-module round (graph + one HvP per module) over one gradient
* fisher_over_grad           one Fisher probe (forward, sampled labels, one backward) over one gradient
* fisher_over_grad_shared    the same per probe when --probes-per-batch probes share one forward
* calibration_over_training  the default calibration (sadra.config.RUN_DEFAULTS["probe"]: head warm-up
                             + probe with the default estimator) over one `lora` training run of the
                             cpu preset on the same task
* probe_peak_over_train_peak peak memory of that calibration over peak memory of that training, both
                             measured as the growth of resident memory over the loaded model
                             (hutchinson_probe_peak_over_train_peak: the same calibration with Hutchinson)
* head_warmup_replay_speedup the default head warm-up run every step over the same with the frozen
                             encoder's output replayed per batch (the library's default)
* stability                  per estimator/mode: Spearman correlation of module scores between two
                             independent calibrations (other seed, other batches) with the default
                             calibration settings, and the fraction of modules that get the same rank;
                             spearman_same_batches: the same with only the random draws differing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from measure import child_env, forward_over_reverse_hvps, git_commit, median_seconds
from trainer_vs_loop import trainer_vs_loop


def unit_costs(glue_dir: str, task: str, batch_size: int, max_length: int, repeats: int, probes_per_batch: int) -> dict:
    from sadra.data import calibration_batches, load_glue
    from sadra.models import find_targets, load_model
    from sadra.probe import Calls, hf_logits, hf_loss, make_signal, probe_state

    model, tokenizer = load_model("minilm", 2, seed=0)
    rows = load_glue(task, "train", glue_dir)
    batch = calibration_batches(rows, tokenizer, num_batches=1, batch_size=batch_size, max_length=max_length, seed=0)[0]
    names = find_targets(model)
    params = [model.get_submodule(n).weight for n in names]
    gen = torch.Generator().manual_seed(0)
    calls = Calls(hf_loss, hf_logits)
    joint_signal, per_module_signal = make_signal("hutchinson", mode="joint"), make_signal("hutchinson")
    fisher_signal = make_signal("fisher")
    shared_hvp = joint_signal.rounds_per_batch
    out = {"batch_size": batch_size, "tokens": int(batch["input_ids"].shape[1]), "modules": len(names),
           "hutchinson_probes_per_graph": shared_hvp, "fisher_probes_per_forward": probes_per_batch}
    with probe_state(model, params):
        def grad():
            torch.autograd.grad(hf_loss(model, batch), params)

        def joint(k):
            g = joint_signal.prepare(model, batch, params, calls, 0, first_visit=True)
            for i in range(k):
                joint_signal.sample(g, batch, params, gen, retain=i + 1 < k)

        def joint_vmap(k):  # alternative: k probes batched into one vmapped backward
            g = joint_signal.prepare(model, batch, params, calls, 0, first_visit=True)
            vs = [torch.randint(0, 2, (k, *p.shape), generator=gen).to(p.dtype).mul_(2).sub_(1) for p in params]
            hvs = torch.autograd.grad(g, params, grad_outputs=vs, is_grads_batched=True)
            return [(v * hv).sum() for v, hv in zip(vs, hvs)]

        def forward_over_reverse():  # alternative: jvp of the gradient function (no create_graph)
            vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype).mul_(2).sub_(1) for p in params]
            hvs = forward_over_reverse_hvps(model, names, params, batch, vs)
            return [torch.dot(v.reshape(-1), hv.reshape(-1)) for v, hv in zip(vs, hvs)]

        def per_module():
            g = per_module_signal.prepare(model, batch, params, calls, 0, first_visit=True)
            per_module_signal.sample(g, batch, params, gen, retain=False)

        def fisher(k):
            logits = fisher_signal.prepare(model, batch, params, calls, 0, first_visit=True)
            for i in range(k):
                fisher_signal.sample(logits, batch, params, gen, retain=i + 1 < k)

        t_grad = median_seconds(grad, repeats)
        out["grad_seconds"] = t_grad
        out["hvp_over_grad"] = median_seconds(lambda: joint(shared_hvp), repeats) / shared_hvp / t_grad
        out["hvp_over_grad_unshared"] = median_seconds(lambda: joint(1), repeats) / t_grad
        out["alternatives_not_adopted"] = {
            "hvp_over_grad_vmap": median_seconds(lambda: joint_vmap(shared_hvp), repeats) / shared_hvp / t_grad,
            "hvp_over_grad_forward_over_reverse": median_seconds(forward_over_reverse, repeats) / t_grad,
        }
        out["per_module_round_over_grad"] = median_seconds(per_module, max(1, repeats // 2)) / t_grad
        out["fisher_over_grad"] = median_seconds(lambda: fisher(1), repeats) / t_grad
        out["fisher_over_grad_shared"] = median_seconds(lambda: fisher(probes_per_batch), repeats) / probes_per_batch / t_grad
    return out


def warmup_replay(glue_dir: str, task: str, probe: dict, max_length: int) -> dict:
    """Seconds of the default head warm-up with the encoder replayed (the default) and run every step."""
    from sadra.data import calibration_batches, load_glue
    from sadra.models import load_model
    from sadra.probe import restore_head, warm_up_head

    model, tokenizer = load_model("minilm", 2, seed=0)
    batches = calibration_batches(load_glue(task, "train", glue_dir), tokenizer, num_batches=probe["num_batches"],
                                  batch_size=probe["batch_size"], max_length=max_length, seed=0)
    seconds = {}
    for label, cache_bytes in (("replayed", 1 << 29), ("every_step", 0)):
        start = time.perf_counter()
        saved = warm_up_head(model, batches, probe["head_warmup_steps"], lr=probe["head_warmup_lr"], cache_bytes=cache_bytes)
        seconds[label] = time.perf_counter() - start
        restore_head(model, saved)
    return {"head_warmup_seconds": seconds, "head_warmup_replay_speedup": seconds["every_step"] / seconds["replayed"]}


def calibrate(rows, probe: dict, max_length: int, *, batch_seed: int, seed: int, **options):
    """One calibration of a fresh MiniLM (the same head init every time) on ``probe``'s batches drawn
    with ``batch_seed``; ``options`` override ``probe``'s settings (``num_batches``, ``estimator``, ...)."""
    from sadra.data import calibration_batches
    from sadra.models import load_model
    from sadra.probe import estimate_sensitivity

    pr = {**probe, **options}
    model, tokenizer = load_model("minilm", 2, seed=0)
    batches = calibration_batches(rows, tokenizer, num_batches=pr["num_batches"], batch_size=pr["batch_size"],
                                  max_length=max_length, seed=batch_seed)
    return estimate_sensitivity(
        model, batches, estimator=pr["estimator"], mode=pr["mode"], max_probes=pr["max_probes"],
        min_probes=pr["min_probes"], rtol=pr["rtol"], probes_per_batch=pr["probes_per_batch"], seed=seed,
        head_warmup_steps=pr["head_warmup_steps"], head_warmup_lr=pr["head_warmup_lr"])


def stability(glue_dir: str, task: str, probe: dict, max_length: int) -> dict:
    from sadra.allocate import allocate_ranks
    from sadra.data import load_glue
    from stability_curve import spearman

    rows = load_glue(task, "train", glue_dir)

    result = {}
    for label, estimator, mode in (("fisher", "fisher", "per_module"), ("hutchinson_per_module", "hutchinson", "per_module"),
                                   ("hutchinson_joint", "hutchinson", "joint")):
        first = calibrate(rows, probe, max_length, batch_seed=100, seed=0, estimator=estimator, mode=mode)
        # the independent calibration, and one where only the random draws differ
        other = calibrate(rows, probe, max_length, batch_seed=101, seed=1, estimator=estimator, mode=mode)
        same_batches = calibrate(rows, probe, max_length, batch_seed=100, seed=1, estimator=estimator, mode=mode)
        reports = [first, other]
        allocs = [allocate_ranks(r, min_rank=2, max_rank=32) for r in reports]
        same = sum(allocs[0].ranks[n] == allocs[1].ranks[n] for n in first.scores) / len(first.scores)
        rel = sorted(r for rep in reports for r in rep.relative_stderr.values())
        result[label] = {"spearman": spearman(first.scores, other.scores), "same_rank_fraction": same,
                         "spearman_same_batches": spearman(first.scores, same_batches.scores),
                         "probes": [r.probes for r in reports],
                         "seconds_per_calibration": statistics.mean(r.seconds for r in reports),
                         "median_relative_stderr": rel[len(rel) // 2]}
    return result


def _timed_signal(base_name: str):
    """The registered signal ``base_name`` with its shared work and its rounds timed (``<name>-timed``)."""
    from sadra.signals import SIGNALS, register_signal

    base = SIGNALS[base_name]

    class Timed(base):
        name = f"{base_name}-timed"
        clock = {"prepare": 0.0, "round": 0.0, "prepares": 0, "rounds": 0}

        def _clocked(self, piece: str, call, *args, **kwargs):
            start = time.perf_counter()
            out = call(*args, **kwargs)
            self.clock[piece] += time.perf_counter() - start
            self.clock[piece + "s"] += 1
            return out

        def prepare(self, *args, **kwargs):
            return self._clocked("prepare", super().prepare, *args, **kwargs)

        def sample(self, *args, **kwargs):
            return self._clocked("round", super().sample, *args, **kwargs)

    register_signal(Timed)
    return Timed


def hutchinson_pool(rows, mode: str, batch_size: int, num_batches: int, rounds: int, probe: dict, max_length: int,
                    index: int) -> dict:
    """One calibration of ``num_batches`` x ``rounds`` Hutchinson rounds, every sample kept, its pieces timed."""
    timed = _timed_signal("hutchinson")
    timed.clock.update(prepare=0.0, round=0.0, prepares=0, rounds=0)
    report = calibrate(rows, probe, max_length, batch_seed=100 + index, seed=index, estimator=timed.name, mode=mode,
                       num_batches=num_batches, batch_size=batch_size, max_probes=num_batches * rounds, min_probes=1,
                       rtol=0, probes_per_batch=rounds)
    clock = dict(timed.clock)
    timing = {"prepare": clock["prepare"] / clock["prepares"], "round": clock["round"] / clock["rounds"],
              "warmup": report.seconds - clock["prepare"] - clock["round"]}
    return {"samples": report.samples, "batch_ids": report.sample_batches, "num_batches": num_batches, "timing": timing}


def hutchinson_stability(glue_dir: str, task: str, probe: dict, max_length: int, pools: list[tuple],
                         train_seconds: float | None, target: float) -> dict:
    """The stability curve of both modes (batches x rounds per batch, two batch sizes) and its cheapest
    setting that reaches ``target``; costs as a fraction of one LoRA training run when it is known."""
    from sadra.data import load_glue
    from stability_curve import cheapest, curve, knee

    rows = load_glue(task, "train", glue_dir)
    points = []
    for mode, batch_size, num_batches, rounds in pools:
        a, b = (hutchinson_pool(rows, mode, batch_size, num_batches, rounds, probe, max_length, i) for i in (0, 1))
        timing = {k: statistics.fmean((a["timing"][k], b["timing"][k])) for k in a["timing"]}
        options = [r for r in (1, 2, 4, 8, 16) if r <= rounds]
        points += [{"mode": mode, "batch_size": batch_size, **p} for p in curve(a, b, timing, train_seconds, options)]
    reached = cheapest(points, target)
    chosen = reached or knee(points, KNEE_SLACK)
    return {"hutchinson_curve": points, "hutchinson_setting": chosen, "hutchinson_target": target,
            "hutchinson_target_reached": reached is not None,
            "hutchinson_best": max(points, key=lambda p: p["spearman"]), "hutchinson_knee_slack": KNEE_SLACK,
            "hutchinson_spearman": chosen["spearman"], "hutchinson_calibration_over_training": chosen["over_training"]}


def gradient_stability(glue_dir: str, task: str, probe: dict, max_length: int, train_seconds: float | None) -> dict:
    """Two independent calibrations of the gradient signal at the default settings: cost, and how
    alike the ``spectral`` rule's allocations are (at the budgets of uniform r=8 and r=2)."""
    from sadra.allocate import allocate_ranks, uniform_budget
    from sadra.data import load_glue
    from stability_curve import spearman

    rows = load_glue(task, "train", glue_dir)
    reports = [calibrate(rows, probe, max_length, batch_seed=100 + i, seed=i, estimator="gradient") for i in (0, 1)]
    out: dict = {}
    for r, min_rank, prune in ((8, 2, False), (2, 1, True)):
        allocs = [allocate_ranks(rep, rule="spectral", budget=uniform_budget(rep.shapes, r), min_rank=min_rank,
                                 max_rank=32, prune=prune) for rep in reports]
        ranks = [{n: float(a.ranks[n]) for n in reports[0].scores} for a in allocs]
        same = sum(ranks[0][n] == ranks[1][n] for n in ranks[0]) / len(ranks[0])
        rho = spearman(*ranks) if len(set(ranks[0].values())) > 1 and len(set(ranks[1].values())) > 1 else None
        out[f"r{r}"] = {"spearman": rho, "same_rank_fraction": same, "ranks": [sorted(set(x.values())) for x in ranks]}
    seconds = statistics.fmean(rep.seconds for rep in reports)
    value = [{n: sum(rep.spectra[n]) for n in rep.scores} for rep in reports]
    # How many directions per module clear the noise floor: the ranks the spectral rule can value.
    above = [sorted(sum(v > 0 for v in rep.spectra[n]) for n in rep.scores) for rep in reports]
    return {"gradient_directions_above_floor": above,
            "gradient_spearman": out["r8"]["spearman"], "gradient_same_rank_fraction": out["r8"]["same_rank_fraction"],
            "gradient_r2": out["r2"], "gradient_r8": out["r8"], "gradient_value_spearman": spearman(*value),
            "gradient_calibration_seconds": seconds, "gradient_probes": [rep.probes for rep in reports],
            "gradient_calibration_over_training": seconds / train_seconds if train_seconds else None}


CHILD = r"""
import json, sys, time
mode, glue_dir, task, preset_name, out = sys.argv[1:6]
from measure import mem_mb, reset_peak
from sadra.config import load_benchmark_config
cfg = load_benchmark_config(preset_name, overrides=[f"glue_dir={glue_dir}"])
settings = cfg.resolve(task, "lora")
settings["train"]["threads"] = None  # torch's own thread count, as in the calibration children
if mode.startswith("calibrate"):
    from sadra.config import RUN_DEFAULTS
    from sadra.data import calibration_batches, load_glue, subsample
    from sadra.models import load_model
    from sadra.probe import estimate_sensitivity
    rows = subsample(load_glue(task, "train", glue_dir), settings["max_train_samples"], settings["data_seed"])
    model, tok = load_model(settings["model"], 2, seed=0)
    pr = dict(RUN_DEFAULTS["probe"])  # the default calibration, on the preset's rows and max length
    if mode == "calibrate-hutchinson":  # the same with Hutchinson's estimator, for its memory
        pr.update(estimator="hutchinson", max_probes=2, min_probes=2)
    batches = calibration_batches(rows, tok, num_batches=pr["num_batches"], batch_size=pr["batch_size"],
                                  max_length=settings["max_length"], seed=0)
    reset_peak()
    base = mem_mb("VmRSS")
    start = time.perf_counter()
    estimate_sensitivity(model, batches, estimator=pr["estimator"], mode=pr["mode"], max_probes=pr["max_probes"],
                         min_probes=pr["min_probes"], rtol=pr["rtol"], probes_per_batch=pr["probes_per_batch"], seed=0,
                         head_warmup_steps=pr["head_warmup_steps"], head_warmup_lr=pr["head_warmup_lr"])
    seconds = time.perf_counter() - start
else:
    import tempfile
    from sadra.models import load_model
    load_model(settings["model"], 2, seed=0)
    reset_peak()
    base = mem_mb("VmRSS")
    from sadra.train import run_glue
    start = time.perf_counter()
    rec = run_glue(task, "lora", 0, tempfile.mkdtemp(), settings, progress=False)
    seconds = rec["train_seconds"]
peak = mem_mb("VmHWM")
json.dump({"seconds": seconds, "growth_mb": peak - base, "peak_mb": peak, "base_mb": base}, open(out, "w"))
"""


def calibration_vs_training(glue_dir: str, task: str, preset: str, tmp: Path) -> dict:
    results = {}
    for mode in ("calibrate", "train", "calibrate-hutchinson"):
        out = tmp / f"{mode}.json"
        subprocess.run([sys.executable, "-c", CHILD, mode, glue_dir, task, preset, str(out)], check=True,
                       stdout=subprocess.DEVNULL, env=child_env())
        results[mode] = json.loads(out.read_text())
    train_growth = max(results["train"]["growth_mb"], 1e-9)
    return {
        "calibration_seconds": results["calibrate"]["seconds"],
        "lora_train_seconds": results["train"]["seconds"],
        "calibration_over_training": results["calibrate"]["seconds"] / results["train"]["seconds"],
        "calibration_memory_growth_mb": results["calibrate"]["growth_mb"],
        "train_memory_growth_mb": results["train"]["growth_mb"],
        "probe_peak_over_train_peak": results["calibrate"]["growth_mb"] / train_growth,
        "hutchinson_probe_peak_over_train_peak": results["calibrate-hutchinson"]["growth_mb"] / train_growth,
    }


PARTS = ("training", "units", "stability", "hutchinson", "gradient", "loop")
# (mode, batch size, batches, rounds per batch) of each Hutchinson pool: both modes, batches of 16
# and of 4, each pool costing about one LoRA training run of the cpu preset.
# When no setting reaches the target: the cheapest within this much Spearman of the best one.
KNEE_SLACK = 0.1
DEFAULT_POOLS = "per_module:16:32:2,per_module:4:64:1,joint:16:32:8,joint:4:64:8"


def parse_pools(text: str) -> list[tuple]:
    pools = []
    for item in text.split(","):
        mode, batch_size, batches, rounds = item.split(":")
        pools.append((mode, int(batch_size), int(batches), int(rounds)))
    return pools


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", required=True)
    parser.add_argument("--task", default="sst2", help="task for the unit costs, stability and calibration vs training")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probes-per-batch", type=int, default=4, help="Fisher probes sharing one forward (unit costs)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=None,
                        help="measure these parts only (the JSON keeps the other parts' figures)")
    parser.add_argument("--pools", default=DEFAULT_POOLS, help="Hutchinson pools mode:batch_size:batches:rounds,...")
    parser.add_argument("--target", type=float, default=0.95, help="the Spearman a Hutchinson setting must reach")
    parser.add_argument("--loop-rows", type=int, default=1000, help="training rows of the Trainer-vs-loop runs")
    parser.add_argument("--loop-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import inspect
    import tempfile

    from sadra.config import RUN_DEFAULTS, load_benchmark_config
    from sadra.probe import estimate_sensitivity

    probe = RUN_DEFAULTS["probe"]
    api_default = inspect.signature(estimate_sensitivity).parameters["estimator"].default
    if api_default != probe["estimator"]:
        sys.exit(f"error: the API's default estimator ({api_default}) differs from the config's ({probe['estimator']})")
    max_length = load_benchmark_config(args.preset).resolve(args.task, "lora")["max_length"]
    figures = {"machine": f"{os.cpu_count()} cores {platform.machine()}, {torch.get_num_threads()} torch threads, {sys.platform}",
               "torch": torch.__version__,
               "task": args.task, "default_estimator": probe["estimator"],
               "default_calibration": {**probe, "max_length": max_length}}
    if args.only and Path(args.json).exists():  # measuring some parts: keep the other parts' figures
        figures = {**json.loads(Path(args.json).read_text()), **figures}
    parts = list(args.only or PARTS)
    figures["measured"] = {**figures.get("measured", {}),
                           **{part: {"date": time.strftime("%Y-%m-%d"), "git_commit": git_commit()} for part in parts}}
    tmp = Path(tempfile.mkdtemp())
    measures = {
        "training": lambda: calibration_vs_training(args.glue_dir, args.task, args.preset, tmp),
        "units": lambda: {**unit_costs(args.glue_dir, args.task, args.batch_size, args.max_length, args.repeats,
                                       args.probes_per_batch), **warmup_replay(args.glue_dir, args.task, probe, max_length)},
        "stability": lambda: {"stability": stability(args.glue_dir, args.task, probe, max_length)},
        "hutchinson": lambda: hutchinson_stability(args.glue_dir, args.task, probe, max_length, parse_pools(args.pools),
                                                   figures.get("lora_train_seconds"), args.target),
        "gradient": lambda: gradient_stability(args.glue_dir, args.task, probe, max_length,
                                               figures.get("lora_train_seconds")),
        "loop": lambda: trainer_vs_loop(args.glue_dir, args.task, args.preset, args.loop_rows, args.loop_repeats, tmp),
    }
    for part in PARTS:  # training first: the later parts divide by its LoRA run
        if part in parts:
            figures.update(measures[part]())
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")  # each part survives a later failure
    print_summary(figures)


def print_summary(figures: dict) -> None:
    print(f"{'figure':38s} value")
    for key, value in figures.items():
        if isinstance(value, float):
            print(f"{key:38s} {value:.4f}")
    for label, st in figures.get("stability", {}).items():
        print(f"stability {label:22s} spearman {st['spearman']:.3f} (same batches {st['spearman_same_batches']:.3f})  "
              f"same-rank {st['same_rank_fraction']:.2f}  "
              f"median rel. s.e. {st['median_relative_stderr']:.3f}  {st['seconds_per_calibration']:.1f} s")
    for p in figures.get("hutchinson_curve", []):
        print(f"hutchinson {p['mode']:10s} batch {p['batch_size']:2d} x {p['batches']:3d} batches x {p['rounds_per_batch']} rounds: "
              f"spearman {p['spearman']:.3f}  {p['seconds']:.1f} s  ({p['over_training']} of a training run)")


if __name__ == "__main__":
    main()

"""Apply the selection study's written decision rule (docs/selection.md) to its results.

Reads ``results/selection/results.jsonl`` and each cell's ``allocation.json``; writes
``results/selection/choice.json`` and prints the ranking. The rule, fixed before phases 2-4 ran:

1. Rank the arms by their paired difference to ``lora`` on each task's main metric (x100, paired by
   seed), averaged over the tasks. The two best rules whose allocation is not uniform go to phase 2.
2. Phase 2 (seed 0): ``lora`` and those rules keep the learning rate (0.5x, 1x, 2x) with the best main
   metric averaged over the tasks.
3. The default is the rule with the best average difference; arms that score the same are named as a
   tie. If its interval on either task contains 0, it ties with ``lora``.

  python studies/choose_default.py [--folder results/selection]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sadra.io import read_jsonl, write_json
from sadra.results import REFERENCE, format_paired, paired_stats

TASKS = ("sst2", "mrpc")
# Rules that may become sadra's default, and arms that are only compared.
CANDIDATES = ("prop-fisher", "prop-hutchinson", "spectral", "spectral-newton", "spectral-gradinit")
CONTROLS = ("lora-ga", "random")
LR_SUFFIXES = {"0.5x": "-lr0.5x", "1x": "", "2x": "-lr2x"}
# Two arms whose averages differ by less than this (x100) are a tie.
TIE = 1e-9


def _values(records: list[dict], task: str, method: str) -> dict[int, float]:
    return {int(r["seed"]): 100.0 * r["metrics"][r["main_metric"]] for r in records
            if r["task"] == task and r["method"] == method}


def _uniform(folder: Path, task: str, method: str) -> bool | None:
    """Whether every seed's allocation gave every module the same rank (None: no allocation file)."""
    files = sorted((folder / task / method).glob("seed*/allocation.json"))
    if not files:
        return None
    return all(len(set(json.loads(f.read_text())["ranks"].values())) == 1 for f in files)


def _arm(records: list[dict], folder: Path, arm: str) -> dict | None:
    per_task = {}
    for task in TASKS:
        stat = paired_stats(_values(records, task, arm), _values(records, task, REFERENCE))
        if stat is None:
            return None
        per_task[task] = {k: stat[k] for k in ("n", "mean", "ci_low", "ci_high")}
    uniform = [_uniform(folder, task, arm) for task in TASKS]
    init = next(r.get("init", "default") for r in records if r["method"] == arm)
    return {"arm": arm, "candidate": arm in CANDIDATES, "per_task": per_task, "init": init,
            "average": sum(t["mean"] for t in per_task.values()) / len(TASKS),
            "uniform": None if None in uniform else all(uniform)}


def rank_arms(records: list[dict], folder: Path) -> list[dict]:
    """Every arm with results on every task, best average difference to ``lora`` first."""
    arms = [a for a in (_arm(records, folder, name) for name in CANDIDATES + CONTROLS) if a]
    return sorted(arms, key=lambda a: -a["average"])


def learning_rates(records: list[dict], families: list[str]) -> dict[str, dict]:
    """Per family: seed 0's main metric averaged over the tasks at each learning rate, and the best."""
    out = {}
    for family in families:
        scores = {}
        for factor, suffix in LR_SUFFIXES.items():
            seed0 = [_values(records, task, family + suffix).get(0) for task in TASKS]
            if None not in seed0:
                scores[factor] = sum(seed0) / len(TASKS)
        complete = len(scores) == len(LR_SUFFIXES)
        # On a tie the learning rate already in use (1x) stays.
        best = max(sorted(scores, key=lambda f: f != "1x"), key=scores.get) if complete else None
        out[family] = {"scores": scores, "complete": complete, "best": best}
    return out


def _default(ranking: list[dict], lrs: dict[str, dict]) -> dict | None:
    rules = [a for a in ranking if a["candidate"]]
    if not rules:
        return None
    best = rules[0]
    tied = [a["arm"] for a in rules if best["average"] - a["average"] <= TIE]
    # An arm that allocates uniform ranks with PEFT's init is lora itself, so it takes lora's rate.
    family = REFERENCE if best["uniform"] and best["init"] == "default" else best["arm"]
    lr = lrs.get(family, {}).get("best")
    ties_lora = any(t["ci_low"] <= 0 <= t["ci_high"] or t["n"] < 2 for t in best["per_task"].values())
    return {"arm": best["arm"], "tied_with": tied[1:], "learning_rate_factor": lr,
            "learning_rate_from": family, "ties_lora": ties_lora, "average": best["average"]}


def choose(folder: Path) -> dict:
    records = read_jsonl(folder / "results.jsonl")
    ranking = rank_arms(records, folder)
    phase2 = [a["arm"] for a in ranking if a["candidate"] and a["uniform"] is False][:2]
    lrs = learning_rates(records, [REFERENCE] + phase2)
    return {"ranking": ranking, "phase2": phase2, "learning_rates": lrs, "default": _default(ranking, lrs)}


def ranking_table(choice: dict) -> str:
    """Markdown: each arm's paired difference to ``lora`` per task, the average, and whether it is uniform."""
    rows = ["| arm | " + " | ".join(f"{t} (x100, 95% CI, n)" for t in TASKS) + " | average | uniform ranks |",
            "|" + "---|" * (len(TASKS) + 3)]
    for a in choice["ranking"]:
        cells = [format_paired(s, scale=1.0) for s in a["per_task"].values()]
        uniform = {True: "yes", False: "no", None: "— (no allocation)"}[a["uniform"]]
        rows.append(f"| `{a['arm']}` | " + " | ".join(cells) + f" | {a['average']:+.2f} | {uniform} |")
    return "\n".join(rows)


def lr_table(choice: dict) -> str:
    """Markdown: seed 0's main metric averaged over the tasks at each learning rate, per family."""
    rows = ["| arm | " + " | ".join(LR_SUFFIXES) + " | kept |", "|" + "---|" * (len(LR_SUFFIXES) + 2)]
    for family, lr in choice["learning_rates"].items():
        cells = [f"{lr['scores'][f]:.2f}" if f in lr["scores"] else "—" for f in LR_SUFFIXES]
        rows.append(f"| `{family}` | " + " | ".join(cells) + f" | {lr['best'] or 'not run yet'} |")
    return "\n".join(rows)


def default_sentence(choice: dict) -> str:
    """One sentence: what the rule picks from the results so far."""
    d = choice["default"]
    if d is None:
        return "No candidate rule has results on every task yet."
    tie = f" (tied with {', '.join(f'`{t}`' for t in d['tied_with'])})" if d["tied_with"] else ""
    lr = d["learning_rate_factor"] or "not checked yet"
    versus = "ties with `lora` (an interval contains 0)" if d["ties_lora"] else "beats `lora` on every task"
    return (f"`{d['arm']}`{tie}, average difference {d['average']:+.2f}; learning rate {lr} "
            f"(from `{d['learning_rate_from']}`'s check); it {versus}.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="results/selection", help="the study's results folder")
    args = ap.parse_args()
    folder = Path(args.folder)
    if not (folder / "results.jsonl").exists():
        print(f"error: {folder}/results.jsonl not found; run studies/run_selection.sh first", file=sys.stderr)
        return 2
    choice = choose(folder)
    write_json(folder / "choice.json", choice)
    print(ranking_table(choice), lr_table(choice), "default: " + default_sentence(choice), sep="\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

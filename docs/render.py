"""Write each ``docs/NAME.md`` from ``docs/NAME.md.in``, and the README's results block from
``docs/readme-results.md.in``: every figure in them comes from a file.

A template is prose with placeholders ``{{name arg ...}}``; each is replaced by what the committed
result files say, so the text cannot drift from them (``tests/test_docs.py`` renders every page and
compares). Paths are relative to the repository root. Rerun it whenever a result file changes.

  {{table FOLDER}}                      the results table of a benchmark folder (as in its results.md)
  {{mean FOLDER TASK METHOD METRIC}}    mean ± s.d. over seeds (x100; cross-entropy ``loss`` as is)
  {{diff FOLDER TASK METHOD METRIC [REF]}}  METHOD minus REF (default lora), paired by seed: mean [95% CI] (n)
  {{bound FOLDER TASK METHOD METRIC high|low [REF]}}  one end of that paired 95% interval: the largest
                                        gain (high) or loss (low) the seeds leave possible
  {{verdict FOLDER METHOD [REF]}}      METHOD against REF on every task, in words: better, worse, a tie or
                                        identical, by the paired 95% interval of the main metric
  {{seeds FOLDER TASK METHOD}}          how many seeds that cell has
  {{cells FOLDER}}                      how many cells have a result
  {{hours FOLDER}}                      the cells' wall-clock times added up, in hours (cells run side by
                                        side overlap, so the elapsed time is shorter)
  {{uniform FOLDER METHOD...}}          "K of N": the finished cells of those methods that allocated
                                        exactly uniform LoRA's ranks
  {{figure PATH ALT...}}                an image link from the page to PATH, or a note while PATH is not drawn
  {{json FILE KEY[.KEY...] [FORMAT]}}   one value of a JSON file (FORMAT: a format spec, e.g. .2f)
  {{choice FOLDER ranking|lr|default}}  the selection study's decision rule applied to FOLDER
                                        (studies/choose_default.py): its ranking, learning-rate table
                                        or the default it picks

  python docs/render.py           rewrite every page
  python docs/render.py --check   exit 1, naming the first line that differs, if a page is out of date
"""

from __future__ import annotations

import argparse
import json
import posixpath
import re
import sys
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

from sadra.data import get_task
from sadra.io import read_jsonl
from sadra.results import (REFERENCE, format_mean_sd, format_paired, grid_methods, paired_stats, paired_to_reference,
                           results_table)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import choose_default  # noqa: E402  (the selection study's decision rule)
DOCS = ROOT / "docs"
PLACEHOLDER = re.compile(r"\{\{(.+?)\}\}")
# Templates that fill a marked block of a page instead of a whole page (template name -> page).
BLOCKS = {"readme-results.md.in": ROOT / "README.md"}
BLOCK_BEGIN = "<!-- rendered from {template} by python docs/render.py: edit the template, not this block -->"
BLOCK_END = "<!-- end of the rendered block -->"


@lru_cache(maxsize=None)
def _records(root: Path, folder: str) -> tuple[dict, ...]:
    return tuple(read_jsonl(root / folder / "results.jsonl"))


def _values(root: Path, folder: str, task: str, method: str, metric: str) -> dict[int, float]:
    return {int(r["seed"]): r["metrics"][metric] for r in _records(root, folder)
            if r["task"] == task and r["method"] == method and metric in r["metrics"]}


def _scale(metric: str) -> tuple[float, int]:
    return (1.0, 3) if metric == "loss" else (100.0, 2)


def table(root: Path, folder: str) -> str:
    config_path = root / folder / "benchmark_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    methods = grid_methods(config) or None
    return results_table(list(_records(root, folder)), methods, read_jsonl(root / folder / "failures.jsonl")).rstrip()


def mean(root: Path, folder: str, task: str, method: str, metric: str) -> str:
    scale, digits = _scale(metric)
    return format_mean_sd(list(_values(root, folder, task, method, metric).values()), scale, digits)


def diff(root: Path, folder: str, task: str, method: str, metric: str, reference: str = REFERENCE) -> str:
    scale, digits = _scale(metric)
    values, ref = _values(root, folder, task, method, metric), _values(root, folder, task, reference, metric)
    if not values or not ref:
        return "—"
    stat = paired_stats(values, ref)
    if stat is None:
        return "— (no seed in common)"
    return format_paired(stat, scale, digits)


def bound(root: Path, folder: str, task: str, method: str, metric: str, end: str, reference: str = REFERENCE) -> str:
    if end not in ("high", "low"):
        raise ValueError(f"bound takes high or low, got {end!r}")
    scale, digits = _scale(metric)
    stat, _ = _paired(_records(root, folder), root, folder, task, method, metric, reference)
    if stat is None or stat["n"] < 2:
        return "—"
    return f"{stat['ci_' + end] * scale:+.{digits}f}"


def verdict(root: Path, folder: str, method: str, reference: str = REFERENCE) -> str:
    """METHOD against REF on each task of FOLDER in words, by the paired 95% interval of the main metric:
    better (above 0), worse (below 0), a tie (it spans 0), identical (every seed equal); with fewer
    than three pairs, only how many there are. Against `lora` the p-value is Holm-corrected across the
    folder's methods, as in its results.md, and an interval that excludes 0 is called better or worse
    only if that p is below 0.05 too."""
    records = _records(root, folder)
    config_path = root / folder / "benchmark_config.json"
    listed = json.loads(config_path.read_text()).get("tasks", []) if config_path.exists() else []
    parts = []
    for task in dict.fromkeys([*listed, *(r["task"] for r in records)]):
        metric = get_task(task).main_metric
        stat, p = _paired(records, root, folder, task, method, metric, reference)
        name = f"{get_task(task).folder} {'F1' if metric == 'f1' else metric}"
        if stat is None:
            parts.append(f"{name}: not run yet")
            continue
        parts.append(f"{name}: {_verdict_word(stat, p)}, {format_paired(stat, p=p)}")
    return "; ".join(parts) or "not run yet"


def _paired(records, root: Path, folder: str, task: str, method: str, metric: str, reference: str):
    """(paired statistics or None, Holm-corrected p against `lora`, else None)."""
    if reference == REFERENCE:
        return paired_to_reference(records, task, metric).get(method, (None, None))
    values, ref = _values(root, folder, task, method, metric), _values(root, folder, task, reference, metric)
    return (paired_stats(values, ref) if values and ref else None), None


def _verdict_word(stat: dict, p: float | None) -> str:
    # Two seeds can differ by the same count of dev examples, which gives a zero-width interval:
    # no word of better or worse before three pairs.
    if stat["n"] < 2:
        return "one seed so far"
    if stat["sd"] == 0 and stat["mean"] == 0:
        return "identical"
    if stat["n"] < 3:
        return "two seeds, too few to call"
    if stat["ci_low"] <= 0 <= stat["ci_high"]:
        return "a tie"
    if p is not None and p >= 0.05:  # NaN (every pair differs alike) keeps the interval's word
        return "a tie after Holm's correction"
    return "better" if stat["ci_low"] > 0 else "worse"


def seeds(root: Path, folder: str, task: str, method: str) -> str:
    return str(len({r["seed"] for r in _records(root, folder) if r["task"] == task and r["method"] == method}))


def cells(root: Path, folder: str) -> str:
    return str(len({(r["task"], r["method"], r["seed"]) for r in _records(root, folder)}))


def hours(root: Path, folder: str) -> str:
    return f"{sum(r.get('wall_seconds') or 0.0 for r in _records(root, folder)) / 3600:.1f}"


def uniform(root: Path, folder: str, *methods: str) -> str:
    """How many finished cells of METHODS allocated exactly uniform LoRA's ranks: "K of N"."""
    def flag(r: dict) -> bool | None:  # records older than the flag: the same ranks everywhere, LoRA's budget
        if "uniform_allocation" in r or r.get("ranks_min") is None:
            return r.get("uniform_allocation")
        return r["ranks_min"] == r["ranks_max"] and r.get("adapter_params") == r.get("lora_budget")

    flags = [f for r in _records(root, folder) if r["method"] in methods and (f := flag(r)) is not None]
    return f"{sum(map(bool, flags))} of {len(flags)}" if flags else "none finished yet"


def figure(root: Path, path: str, *alt: str, page_dir: str = "docs") -> str:
    if not (root / path).exists():
        return f"*({' '.join(alt)}: not drawn yet, `{path}` appears when its runs have finished)*"
    return f"![{' '.join(alt)}]({posixpath.relpath(path, page_dir)})"


def json_value(root: Path, file: str, key: str, spec: str = "") -> str:
    value = json.loads((root / file).read_text())
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return "null" if value is None else format(value, spec)


@lru_cache(maxsize=None)
def _choice(root: Path, folder: str) -> dict:
    return choose_default.choose(root / folder)


def choice(root: Path, folder: str, part: str) -> str:
    parts = {"ranking": choose_default.ranking_table, "lr": choose_default.lr_table,
             "default": choose_default.default_sentence}
    if part not in parts:
        raise ValueError(f"unknown choice part {part!r}; known: {', '.join(parts)}")
    return parts[part](_choice(root, folder))


FUNCTIONS = {"choice": choice, "table": table, "mean": mean, "diff": diff, "bound": bound, "verdict": verdict, "seeds": seeds,
             "cells": cells, "hours": hours, "json": json_value, "figure": figure, "uniform": uniform}


def render(template: str, root: Path = ROOT, page_dir: str = "docs") -> str:
    """``template`` with every placeholder replaced; links are relative to ``page_dir`` (from the root)."""
    _records.cache_clear()
    _choice.cache_clear()
    functions = dict(FUNCTIONS, figure=partial(figure, page_dir=page_dir))

    def replace(match: re.Match) -> str:
        name, *args = match.group(1).split()
        if name not in functions:
            raise ValueError(f"unknown placeholder {name!r} in {match.group(0)!r}; known: {', '.join(functions)}")
        return functions[name](root, *args)

    return PLACEHOLDER.sub(replace, template)


@dataclass(frozen=True)
class Output:
    """A template and the page it writes: the whole page, or only its marked block (``block``)."""

    template: Path
    page: Path
    block: bool


def outputs() -> list[Output]:
    """Every ``docs/*.md.in`` with the page it writes."""
    return [Output(t, BLOCKS[t.name], True) if t.name in BLOCKS else Output(t, t.with_suffix(""), False)
            for t in sorted(DOCS.glob("*.md.in"))]


def page_text(out: Output, root: Path = ROOT) -> str:
    """What ``out.page`` should hold: the rendering, or the page with its block replaced by it."""
    text = render(out.template.read_text(), root, out.page.parent.relative_to(root).as_posix())
    if not out.block:
        return text
    page = out.page.read_text()
    begin = BLOCK_BEGIN.format(template=out.template.relative_to(root).as_posix())
    if begin not in page or BLOCK_END not in page:
        raise ValueError(f"{out.page.name} has no block for {out.template.name}: add the lines {begin!r} and {BLOCK_END!r}")
    start, end = page.index(begin) + len(begin), page.index(BLOCK_END)
    return page[:start] + "\n" + text.rstrip("\n") + "\n" + page[end:]


def main() -> int:
    import itertools

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args()
    for out in outputs():
        page, text = out.page, page_text(out)
        if not args.check:
            page.write_text(text)
            print(f"wrote {page.relative_to(ROOT)}")
            continue
        old = page.read_text().splitlines() if page.exists() else []
        for i, (a, b) in enumerate(itertools.zip_longest(old, text.splitlines(), fillvalue=""), 1):
            if a != b:
                print(f"{page.relative_to(ROOT)} line {i} is out of date; run: python docs/render.py\n  now:  {a}\n  want: {b}")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docs/results.md, docs/selection.md and the README's results block say what the committed result files say
(they are rendered from them)."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import render  # noqa: E402


OUTPUTS = render.outputs()


def test_the_pages_are_rendered():
    assert {out.page.name for out in OUTPUTS} >= {"results.md", "selection.md", "README.md"}


@pytest.mark.parametrize("out", OUTPUTS, ids=[out.template.name for out in OUTPUTS])
def test_each_page_matches_the_result_files(out):
    assert out.page.read_text() == render.page_text(out), f"{out.page.name} is out of date: run python docs/render.py"


@pytest.mark.parametrize("template", [out.template for out in OUTPUTS], ids=[out.template.name for out in OUTPUTS])
def test_every_measured_figure_in_a_template_is_a_placeholder(template):
    prose = render.PLACEHOLDER.sub("", template.read_text())
    decimals = re.findall(r"(?<![\w.])[+-]?\d+\.\d+(?![\w.])", prose)
    assert decimals == [], f"numbers typed into {template.name} instead of read from results: {decimals}"


def test_a_changed_result_changes_the_page(tmp_path):
    for folder in ("results/selection", "benchmarks/results"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.png", "sst2", "mrpc"))
    template = "{{diff results/selection sst2 prop-fisher accuracy}} / {{json benchmarks/results/probe_cost.json hutchinson_spearman .2f}}"
    before = render.render(template, tmp_path)
    path = tmp_path / "results/selection/results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        if r["task"] == "sst2" and r["method"] == "lora":
            r["metrics"]["accuracy"] -= 0.01  # lora one point worse on every seed: prop-fisher's lead grows by 1
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    after = render.render(template, tmp_path)
    lead = [float(re.match(r"([+-]\d+\.\d+)", text).group(1)) for text in (before, after)]
    assert lead[1] - lead[0] == pytest.approx(1.0, abs=0.006)
    spearman = json.loads((tmp_path / "benchmarks/results/probe_cost.json").read_text())["hutchinson_spearman"]
    assert before.split(" / ")[1] == after.split(" / ")[1] == f"{spearman:.2f}"
    with pytest.raises(ValueError, match="unknown placeholder"):
        render.render("{{median results/selection}}", tmp_path)


def test_figure_and_reference_placeholders(tmp_path):
    shutil.copytree(ROOT / "results/selection", tmp_path / "results/selection", ignore=shutil.ignore_patterns("sst2", "mrpc"))
    assert render.render("{{figure results/selection/forest.png a b}}", tmp_path) == \
        "![a b](../results/selection/forest.png)"
    assert "not drawn yet" in render.render("{{figure results/evidence/forest.png a}}", tmp_path)
    # prop-fisher minus itself is zero on every seed; minus a method with no records is a dash.
    assert render.render("{{diff results/selection sst2 prop-fisher accuracy prop-fisher}}", tmp_path).startswith(
        "+0.00 [+0.00, +0.00]")
    assert render.render("{{diff results/selection sst2 prop-fisher accuracy never-run}}", tmp_path) == "—"


def test_a_block_template_rewrites_only_its_block(tmp_path):
    shutil.copytree(ROOT / "results/selection", tmp_path / "results/selection", ignore=shutil.ignore_patterns("sst2", "mrpc"))
    template = tmp_path / "docs" / "block.md.in"
    template.parent.mkdir()
    template.write_text("{{cells results/selection}} cells\n{{figure results/selection/forest.png f}}\n")
    out = render.Output(template, tmp_path / "PAGE.md", True)
    out.page.write_text("# Title\nno block here\n")
    with pytest.raises(ValueError, match="PAGE.md has no block for block.md.in"):
        render.page_text(out, tmp_path)
    begin = render.BLOCK_BEGIN.format(template="docs/block.md.in")
    out.page.write_text(f"# Title\n{begin}\nstale text\n{render.BLOCK_END}\nafter\n")
    want = f"# Title\n{begin}\n{render.cells(tmp_path, 'results/selection')} cells\n![f](results/selection/forest.png)\n{render.BLOCK_END}\nafter\n"
    assert render.page_text(out, tmp_path) == want  # the link is relative to the page's folder, not docs/
    out.page.write_text(want)
    assert render.page_text(out, tmp_path) == want


def test_hours_adds_up_the_cells_wall_clock_times(tmp_path):
    folder = tmp_path / "results/grid"
    folder.mkdir(parents=True)
    lines = [{"task": "sst2", "method": "lora", "seed": 0, "wall_seconds": 5400.0},
             {"task": "sst2", "method": "sadra", "seed": 0, "wall_seconds": 1800.0},
             {"task": "mrpc", "method": "lora", "seed": 0}]  # a record without the field adds nothing
    (folder / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert render.render("{{hours results/grid}}", tmp_path) == "2.0"


def test_uniform_counts_the_cells_whose_allocation_was_uniform(tmp_path):
    folder = tmp_path / "results/grid"
    folder.mkdir(parents=True)
    rows = [("sadra", 0, True), ("sadra", 1, True), ("sadra-r2", 0, False), ("sadra-seed", 0, False), ("lora", 0, None)]
    lines = [{"task": "mrpc", "method": m, "seed": k, **({} if u is None else {"uniform_allocation": u})}
             for m, k, u in rows]
    # Records older than the flag: uniform when every rank is equal and the adapter has LoRA's budget.
    lines += [{"task": "sst2", "method": "sadra-seed", "seed": 0, "ranks_min": 8, "ranks_max": 8,
               "adapter_params": 331_776, "lora_budget": 331_776},
              {"task": "sst2", "method": "sadra-seed", "seed": 1, "ranks_min": 2, "ranks_max": 30,
               "adapter_params": 331_776, "lora_budget": 331_776}]
    (folder / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert render.render("{{uniform results/grid sadra sadra-r2}}", tmp_path) == "2 of 3"
    assert render.render("{{uniform results/grid sadra-seed}}", tmp_path) == "1 of 3"
    assert render.render("{{uniform results/grid lora}}", tmp_path) == "none finished yet"


def test_verdict_needs_holms_p_as_well_as_the_interval(tmp_path):
    # b - lora: +1.0, +2.0, +1.5 points; t = 1.5 / (0.5 / sqrt(3)) = 5.196 with 2 degrees of freedom,
    # two-sided p = 0.0351, interval 1.5 +- 4.303 x 0.2887 = [+0.26, +2.74]. Beside c (p = 1), Holm
    # doubles b's p to 0.0702: the interval excludes 0, the corrected test does not.
    folder = tmp_path / "results/holm"
    folder.mkdir(parents=True)

    def write(rows):
        (folder / "results.jsonl").write_text("".join(
            json.dumps({"task": "mrpc", "method": m, "seed": k, "metrics": {"f1": v}}) + "\n"
            for m, values in rows for k, v in enumerate(values)))

    lora, b, c = ("lora", [0.80, 0.80, 0.80]), ("b", [0.81, 0.82, 0.815]), ("c", [0.80, 0.81, 0.79])
    write([lora, b, c])
    assert render.render("{{verdict results/holm b}}", tmp_path) == \
        "MRPC F1: a tie after Holm's correction, +1.50 [+0.26, +2.74] p=0.07 (n=3)"
    assert render.render("{{verdict results/holm c}}", tmp_path) == "MRPC F1: a tie, +0.00 [-2.48, +2.48] p=1 (n=3)"
    assert render.render("{{bound results/holm mrpc b f1 high}} / {{bound results/holm mrpc b f1 low}}", tmp_path) \
        == "+2.74 / +0.26"
    write([lora, b])  # compared alone, b's p is its own
    assert render.render("{{verdict results/holm b}}", tmp_path) == "MRPC F1: better, +1.50 [+0.26, +2.74] p=0.035 (n=3)"


def test_verdict_words_follow_the_paired_interval(tmp_path):
    shutil.copytree(ROOT / "results/selection", tmp_path / "results/selection", ignore=shutil.ignore_patterns("sst2", "mrpc"))
    said = render.render("{{verdict results/selection prop-hutchinson-r2 lora-r2}}", tmp_path)
    sst2 = render.diff(tmp_path, "results/selection", "sst2", "prop-hutchinson-r2", "accuracy", "lora-r2")
    assert said.startswith(f"SST-2 accuracy: worse, {sst2}; MRPC F1: worse, ")  # both intervals below 0
    assert render.render("{{verdict results/selection random-r2 lora-r2}}", tmp_path).count(": a tie, ") == 2
    assert render.render("{{verdict results/selection spectral}}", tmp_path).count(": identical, ") == 2
    assert "MRPC F1: a tie" in render.render("{{verdict results/selection prop-hutchinson}}", tmp_path)
    # Two pairs that differ by the same count of examples: a zero-width interval, yet no verdict.
    two = [json.loads(line) for line in (tmp_path / "results/selection/results.jsonl").read_text().splitlines()
           if json.loads(line)["task"] == "mrpc" and json.loads(line)["method"] == "lora"][:2]
    folder = tmp_path / "results/two"
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(
        json.dumps(r) + "\n" for rec in two
        for r in (rec, {**rec, "method": "other", "metrics": {**rec["metrics"], "f1": rec["metrics"]["f1"] + 0.01}})))
    assert render.render("{{verdict results/two other}}", tmp_path).startswith("MRPC F1: two seeds, too few to call, +1.00")
    assert render.render("{{verdict results/selection never-run}}", tmp_path) == \
        "SST-2 accuracy: not run yet; MRPC F1: not run yet"

"""`sadra report` on a smoke benchmark's output, complete and with missing or partial runs."""

import json
import math
import re
import shutil


from conftest import SMOKE_TASKS, assert_one_line_error, run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5_000, path
    image = mpimg.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0.01  # not a blank canvas


def test_benchmark_writes_every_figure_and_a_report_that_embeds_them(smoke_out):
    out, _, _ = smoke_out
    expected = ["metrics.png", "forest.png"] + [f"{kind}_{task}.png" for task in SMOKE_TASKS
                                  for kind in ("loss", "ranks", "sensitivity")]
    for name in expected:
        assert_valid_png(out / name)
    report = (out / "report.md").read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report))
    assert set(expected) <= linked
    assert "None: every cell of the grid has a result." in report
    assert "| mrpc | f1 (validation) |" in report


def test_report_on_partial_output_says_what_is_missing(smoke_out, tmp_path):
    out, _, _ = smoke_out
    partial = tmp_path / "partial"
    shutil.copytree(out, partial, ignore=shutil.ignore_patterns("*.safetensors"))
    for png in partial.glob("*.png"):
        png.unlink()
    lines = (partial / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["task"] != "mrpc" and json.loads(line)["method"] != "eva"]
    (partial / "results.jsonl").write_text("\n".join(kept) + "\n" + lines[-1][:40])  # and a torn last line
    shutil.rmtree(partial / "mrpc" / "lora")
    (partial / "mrpc" / "sadra" / "seed0" / "metrics.json").unlink()
    proc = run_cli("report", partial)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (partial / "report.md").read_text()
    assert "| sst2 | accuracy (validation) |" in (partial / "results.md").read_text()  # rewritten from the records kept
    assert "| mrpc |" not in (partial / "results.md").read_text()
    assert "- mrpc / lora / seed 0: not started" in report
    assert "- mrpc / sadra / seed 0: started, unfinished" in report
    assert "- sst2 / eva / seed 0: finished but not recorded" in report
    assert_valid_png(partial / "loss_sst2.png")
    assert not (partial / "loss_mrpc.png").exists()  # no finished mrpc run: no mrpc figure, and no crash


def test_allocate_plot_writes_a_heatmap(smoke_out, tmp_path):
    out, _, _ = smoke_out
    plot = tmp_path / "alloc.png"
    proc = run_cli("allocate", out / "mrpc" / "sadra" / "seed0" / "probe.json", "--plot", plot)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_valid_png(plot)


def test_report_on_a_folder_that_is_not_a_benchmark(tmp_path):
    assert_one_line_error(run_cli("report", tmp_path / "nope"), "does not exist")
    assert_one_line_error(run_cli("report", tmp_path), "results.jsonl")


def test_report_header_lists_every_part_of_a_folder_filled_in_parts(tmp_path):
    """Real evidence-grid records; the folder's config is the last part's (two tasks, seed 0)."""
    from pathlib import Path

    from sadra.report import write_report

    source = Path(__file__).resolve().parents[1] / "results" / "evidence"
    shutil.copy(source / "results.jsonl", tmp_path / "results.jsonl")
    config = json.loads((source / "benchmark_config.json").read_text())
    (tmp_path / "benchmark_config.json").write_text(json.dumps({**config, "tasks": ["sst2", "mrpc"], "seeds": [0]}))
    header = write_report(tmp_path).read_text().splitlines()[2]
    assert "tasks sst2, mrpc, qnli;" in header and "seeds 0, 1, 2, 3, 4;" in header


def test_budget_figure_draws_each_arm_run_at_several_budgets(tmp_path):
    """Real selection-study records; an arm named NAME-r2 is NAME at uniform r=2's budget."""
    from pathlib import Path

    from sadra.report import _budget_labels, _budget_plot, _budget_points, budget_family

    assert [budget_family(m) for m in ("sadra-r2", "lora-r16", "prop-hutchinson-r2", "lora", "lora-ga")] == \
        ["sadra", "lora", "prop-hutchinson", "lora", "lora-ga"]
    source = Path(__file__).resolve().parents[1] / "results" / "selection" / "results.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    at_r8 = [r for r in records if budget_family(r["method"]) == r["method"]]
    assert _budget_plot(at_r8, tmp_path / "none.png") is None  # one budget per arm: nothing to draw
    at_r2 = [r for r in records if r["method"].endswith("-r2")]  # phase 4: lora, prop-hutchinson, random
    assert {r["lora_budget"] for r in at_r2} == {min(r["lora_budget"] for r in at_r8) // 4}
    assert_valid_png(_budget_plot(at_r8 + at_r2, tmp_path / "budget.png"))
    # A budget run on more seeds than another is drawn over the seeds both have.
    lora8 = {r["seed"]: 100 * r["metrics"]["f1"] for r in at_r8 if (r["task"], r["method"]) == ("mrpc", "lora")}
    lora2 = [r for r in at_r2 if (r["task"], r["method"], r["seed"]) == ("mrpc", "lora-r2", 1)]
    points, n = _budget_points([r for r in at_r8 if r["method"] == "lora"] + lora2)[("mrpc", "lora")]
    assert n == 1 and points[float(lora2[0]["lora_budget"] * 4)] == [lora8[1]] and len(lora8) == 3
    # An arm whose points all equal lora's (an allocation that came out uniform) says so.
    twin = [{**r, "method": r["method"].replace("lora", "spectral")} for r in at_r8 + at_r2
            if r["method"] in ("lora", "lora-r2")]
    labels = _budget_labels(_budget_points(at_r8 + at_r2 + twin))
    assert labels[("mrpc", "spectral")] == "spectral (n=3, same as lora)"
    assert labels[("mrpc", "lora")] == "lora (n=3)" and labels[("mrpc", "random")] == "random (n=3)"


def test_arms_outside_the_palette_get_distinct_line_colours():
    from sadra.report import EXTRA_COLORS, PALETTE, line_colors

    colors = line_colors(["lora", "prop-hutchinson", "random", "prop-fisher", "prop-hutchinson"])
    assert colors == {"lora": PALETTE["lora"], "prop-hutchinson": EXTRA_COLORS[0], "random": PALETTE["random"],
                      "prop-fisher": EXTRA_COLORS[1]}
    assert not set(EXTRA_COLORS) & set(PALETTE.values())


def test_rank_heatmap_title_names_the_uniform_rank_the_allocations_replace():
    from sadra.report import _uniform_caption

    r2 = {"base_rank": 2, "budget": 610_560}
    assert _uniform_caption([r2, dict(r2)]) == "uniform LoRA = rank 2 everywhere, budget 610,560 parameters"
    # EVA's and AdaLoRA's files name no base rank: they take the others'.
    assert _uniform_caption([r2, {"budget": 610_560}, {}]) == _uniform_caption([r2])
    mixed = [{"base_rank": 8, "budget": 331_776}, r2, {"base_rank": 16, "budget": 663_552}]
    assert _uniform_caption(mixed) == "each panel at the budget of its own uniform LoRA (r=2, 8, 16)"


def test_cost_table_leaves_resumed_runs_out_of_the_times():
    """Real selection-study records: a run resumed from a checkpoint times only its last steps."""
    from pathlib import Path

    from sadra.results import results_table

    source = Path(__file__).resolve().parents[1] / "results" / "selection" / "results.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    ga = [r for r in records if r["task"] == "sst2" and r["method"] == "lora-ga"]
    resumed = [r for r in ga if r.get("resumed_from")]
    fresh = [r for r in ga if not r.get("resumed_from")]
    assert resumed and fresh  # seed 1 resumed from its last checkpoint and timed almost nothing

    def cost_row(rows):
        table = results_table(rows, ["lora-ga"])
        return next(line for line in table.splitlines() if line.startswith("| sst2 | lora-ga |"))

    expected = sum(r["train_seconds"] for r in fresh) / len(fresh)
    assert cost_row(ga).split(" | ")[3] == f"{expected:.1f}"
    assert cost_row(resumed).split(" | ")[2:6] == ["—", "—", "—", "—"]


def test_paired_stats_when_every_pair_differs_alike():
    from sadra.results import format_paired, paired_stats

    # Two seeds 2 of 872 dev examples apart each time: float rounding aside, no spread to test against.
    lora, other = {0: 746 / 872, 1: 747 / 872}, {0: 748 / 872, 1: 749 / 872}
    stat = paired_stats(other, lora)
    assert stat["sd"] == 0.0 and math.isnan(stat["p"]) and stat["ci_low"] == stat["ci_high"] == stat["mean"]
    assert format_paired(stat, p=stat["p"]) == "+0.23 [+0.23, +0.23] p=— (n=2)"
    assert paired_stats(lora, dict(lora))["p"] == 1.0  # identical runs
    assert 0 < paired_stats({0: 0.80, 1: 0.83, 2: 0.81}, {0: 0.79, 1: 0.80, 2: 0.80})["p"] < 1

"""studies/choose_default.py applies the selection study's written rule to a results folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))

import choose_default  # noqa: E402

METRIC = {"sst2": "accuracy", "mrpc": "f1"}
# Main metric (x100) per seed. prop-a leads on SST-2 and trails on MRPC; spectral equals lora.
SCORES = {
    "lora": {"sst2": [85.0, 86.0, 87.0], "mrpc": [84.0, 85.0, 86.0]},
    "spectral": {"sst2": [85.0, 86.0, 87.0], "mrpc": [84.0, 85.0, 86.0]},
    "spectral-newton": {"sst2": [85.0, 86.0, 87.0], "mrpc": [84.0, 85.0, 86.0]},
    "prop-fisher": {"sst2": [86.0, 86.0, 87.5], "mrpc": [83.0, 84.5, 85.0]},
    "prop-hutchinson": {"sst2": [85.5, 86.0, 87.5], "mrpc": [81.0, 82.0, 83.0]},
    "random": {"sst2": [84.0, 85.5, 86.0], "mrpc": [83.0, 84.0, 85.5]},
}
SEED0 = {"lora-lr0.5x": (84.0, 83.0), "lora-lr2x": (86.0, 86.0), "prop-fisher-lr0.5x": (85.0, 84.0),
         "prop-fisher-lr2x": (86.0, 82.0), "prop-hutchinson-lr0.5x": (86.0, 82.0),
         "prop-hutchinson-lr2x": (84.0, 80.0)}


def _write(folder: Path, records: list[dict], uneven: set[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for r in records:
        cell = folder / r["task"] / r["method"] / f"seed{r['seed']}"
        cell.mkdir(parents=True, exist_ok=True)
        ranks = {"m0": 4, "m1": 12} if r["method"] in uneven else {"m0": 8, "m1": 8}
        (cell / "allocation.json").write_text(json.dumps({"ranks": ranks}))


def _record(task: str, method: str, seed: int, value: float) -> dict:
    metric = METRIC[task]
    return {"task": task, "method": method, "seed": seed, "main_metric": metric,
            "metrics": {metric: value / 100.0, "loss": 0.3}}


@pytest.fixture
def study(tmp_path):
    records = [_record(task, method, seed, value) for method, per_task in SCORES.items()
               for task, values in per_task.items() for seed, value in enumerate(values)]
    records += [_record(task, arm, 0, value) for arm, values in SEED0.items() for task, value in zip(METRIC, values)]
    _write(tmp_path, records, uneven={"prop-fisher", "prop-hutchinson", "random"})
    return tmp_path


def test_ranking_phase2_learning_rates_and_default(study):
    choice = choose_default.choose(study)
    order = [a["arm"] for a in choice["ranking"]]
    # averages: spectral 0, spectral-newton 0, prop-fisher (+0.5 - 0.83)/2, random (-0.83 - 0.83)/2,
    # prop-hutchinson (+0.33 - 3)/2
    assert order == ["spectral", "spectral-newton", "prop-fisher", "random", "prop-hutchinson"]
    fisher = next(a for a in choice["ranking"] if a["arm"] == "prop-fisher")
    assert fisher["average"] == pytest.approx((1.5 / 3 + -2.5 / 3) / 2)
    assert fisher["uniform"] is False and fisher["per_task"]["sst2"]["n"] == 3
    # Phase 2 takes the two best rules that do not allocate uniform ranks; random is not a candidate.
    assert choice["phase2"] == ["prop-fisher", "prop-hutchinson"]
    lrs = choice["learning_rates"]
    assert lrs["lora"]["best"] == "2x" and lrs["lora"]["scores"]["1x"] == pytest.approx(84.5)
    # prop-fisher scores 84.5 at 0.5x and at 1x: a tie keeps 1x.
    assert lrs["prop-fisher"]["best"] == "1x" and lrs["prop-hutchinson"]["best"] == "0.5x"
    default = choice["default"]
    # spectral allocates uniform ranks with PEFT's init: it is lora, so it takes lora's learning rate.
    assert default == {"arm": "spectral", "tied_with": ["spectral-newton"], "learning_rate_factor": "2x",
                       "learning_rate_from": "lora", "ties_lora": True, "average": 0.0}


def test_a_rule_that_beats_lora_on_both_tasks_is_not_a_tie(study):
    path = study / "results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        if r["method"] == "prop-fisher":
            r["metrics"][r["main_metric"]] += 0.02 + 0.001 * r["seed"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    default = choose_default.choose(study)["default"]
    assert default["arm"] == "prop-fisher" and default["tied_with"] == [] and default["ties_lora"] is False
    assert default["learning_rate_from"] == "prop-fisher" and default["learning_rate_factor"] == "1x"


def test_the_command_writes_choice_json_and_refuses_a_missing_folder(study, tmp_path):
    script = ROOT / "studies" / "choose_default.py"
    done = subprocess.run([sys.executable, str(script), "--folder", str(study)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((study / "choice.json").read_text())["default"]["arm"] == "spectral"
    assert "default:" in done.stdout
    missing = subprocess.run([sys.executable, str(script), "--folder", str(tmp_path / "none")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "run studies/run_selection.sh" in missing.stderr
    assert "Traceback" not in missing.stderr

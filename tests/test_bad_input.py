"""Bad input, table-driven: one line naming the problem and the fix, exit 2, no traceback,
and nothing already written lost. Plus property tests that only ever see the documented errors."""

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sadra
from sadra.cli import main
from sadra.errors import BudgetError, ConfigError, DataError, ModelError, OutputError, SadraError


def run_main(args, capsys):
    """Run the CLI in-process; argparse's own errors arrive as SystemExit."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory, glue_dir):
    root = tmp_path_factory.mktemp("bad")
    # GLUE folders with one thing wrong each (SST-2 is all a run needs).
    def glue_copy(name, mutate):
        folder = root / name / "SST-2"
        folder.mkdir(parents=True)
        shutil.copy(glue_dir / "SST-2" / "dev.tsv", folder / "dev.tsv")
        (folder / "train.tsv").write_bytes((glue_dir / "SST-2" / "dev.tsv").read_bytes())
        mutate(folder)
        return root / name

    paths = {
        "no_dev": glue_copy("no_dev", lambda f: (f / "dev.tsv").unlink()),
        "empty": glue_copy("empty", lambda f: (f / "train.tsv").write_text("")),
        "header_only": glue_copy("header_only", lambda f: (f / "train.tsv").write_text("sentence\tlabel\n")),
        "truncated": glue_copy("truncated", lambda f: (f / "train.tsv").write_text("sentence\tlabel\na fine film\t1\nhalf a ro")),
        "wrong_header": glue_copy("wrong_header", lambda f: (f / "train.tsv").write_text("text\tgold\nok\t1\n")),
        "bad_label": glue_copy("bad_label", lambda f: (f / "train.tsv").write_text("sentence\tlabel\nok\tpositive\n")),
        "binary": glue_copy("binary", lambda f: (f / "train.tsv").write_bytes(b"sentence\tlabel\n\xff\xfe\x00\x01\t1\n")),
    }
    (root / "garbage.json").write_text("{ not json")
    (root / "truncated_probe.json").write_text('{"scores": {"a": 1.0}, "stderr": {"a"')
    (root / "list.json").write_text("[1, 2]")
    (root / "not_yaml.yaml").write_text("train: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "typo.yaml").write_text("train:\n  learnig_rate: 0.001\n")
    (root / "a_file").write_text("I am a file")
    shapes = {f"bert.encoder.layer.{i}.attention.self.query": [768, 768] for i in range(6)}
    other_model_probe = {"scores": {k: 1.0 for k in shapes}, "stderr": {k: 0.1 for k in shapes},
                         "num_params": {k: 768 * 768 for k in shapes}, "shapes": shapes, "probes": 4,
                         "estimator": "fisher", "seconds": 1.0}
    (root / "other_probe.json").write_text(json.dumps(other_model_probe))
    ghost_alloc = {"ranks": {"encoder.block.0.q": 8}, "shapes": {"encoder.block.0.q": [384, 384]},
                   "budget": 6144, "params": 6144}
    (root / "ghost_alloc.json").write_text(json.dumps(ghost_alloc))
    results = root / "bench"
    results.mkdir()
    (results / "results.jsonl").write_text('{"task": "sst2", "method": "lora", "seed": 0, "metrics": {"accuracy": 0.9}}\n')
    paths.update(root=root, results=results)
    return paths


TINY = ["max_train_samples=16", "max_eval_samples=8", "max_length=16", "train.epochs=1", "train.batch_size=8"]

# (args, words the one-line error must contain). "{x}" names come from the files fixture;
# {glue} is the real GLUE folder.
CASES = [
    # command line and overrides
    (["train", "--task", "sst3", "--method", "lora", "--out", "{root}/o1"], ["unknown GLUE task", "sst2"]),
    (["train", "--task", "sst2", "--method", "sadr", "--out", "{root}/o2"], ["unknown method", "did you mean 'sadra'"]),
    (["benchmark", "--preset", "fast", "--out", "{root}/o3"], ["unknown preset", "smoke"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "train.epoch=2"], ["unknown key", "epochs"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "train.batch_size=big"], ["train.batch_size must be int"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "max_train_samples=-5"], ["must be positive"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "train.batch_size=0"], ["must be positive"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "epochs2"], ["not key=value"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "methods=lora,dora"], ["unknown method", "dora"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "probe.estimator=kfac"], ["probe.estimator", "fisher"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "name=../../escape"], ["name", "folder"]),
    (["train", "--task", "sst2", "--method", "sadra", "--out", "{root}/o11", "allocate.rule=spectral", "probe.estimator=fisher"],
     ["allocate.rule=spectral", "probe.estimator=gradient", "allocate.rule=proportional"]),
    (["benchmark", "--preset", "smoke", "--out", "{results}", "per_method.lora.train.lr=1"], ["unknown key", "learning_rate"]),
    (["benchmark", "--preset", "smoke", "--config", "{root}/typo.yaml", "--out", "{results}"], ["--preset or --config"]),
    (["benchmark", "--config", "{root}/not_yaml.yaml", "--out", "{results}"], ["not valid YAML"]),
    (["benchmark", "--config", "{root}/list.yaml", "--out", "{results}"], ["mapping"]),
    (["benchmark", "--config", "{root}/typo.yaml", "--out", "{results}"], ["unknown key", "learning_rate"]),
    (["benchmark", "--config", "{root}/missing.yaml", "--out", "{results}"], ["does not exist"]),
    (["train", "--task", "sst2", "--method", "lora", "--seed", "-1", "--out", "{root}/o4"], ["must not be negative"]),
    (["probe", "--task", "sst2", "--glue-dir", "{glue}", "--batch-size", "100000", "--out", "{root}/p.json"],
     ["calibration needs", "lower"]),
    # GLUE folders
    (["benchmark", "--preset", "smoke", "--tasks", "sst2", "--glue-dir", "{root}/nowhere", "--out", "{results}"],
     ["GLUE folder", "does not exist"]),
    (["benchmark", "--preset", "smoke", "--tasks", "sst2", "--glue-dir", "{no_dev}", "--out", "{results}"], ["dev.tsv", "missing"]),
    (["benchmark", "--preset", "smoke", "--tasks", "sst2", "--glue-dir", "{empty}", "--out", "{results}"], ["no data rows"]),
    (["benchmark", "--preset", "smoke", "--tasks", "sst2", "--glue-dir", "{header_only}", "--out", "{results}"], ["no data rows"]),
    (["benchmark", "--preset", "smoke", "--tasks", "sst2", "--glue-dir", "{wrong_header}", "--out", "{results}"],
     ["wrong header", "sentence"]),
    (["train", "--task", "sst2", "--method", "lora", "--glue-dir", "{truncated}", "--out", "{root}/o5", *TINY],
     ["line 3", "truncated"]),
    (["train", "--task", "sst2", "--method", "lora", "--glue-dir", "{bad_label}", "--out", "{root}/o6", *TINY],
     ["label 'positive'"]),
    (["train", "--task", "sst2", "--method", "lora", "--glue-dir", "{binary}", "--out", "{root}/o7", *TINY], ["not UTF-8"]),
    # probe / allocation JSON
    (["allocate", "{root}/garbage.json"], ["does not parse"]),
    (["allocate", "{root}/truncated_probe.json"], ["does not parse"]),
    (["allocate", "{root}/list.json"], ["not an object"]),
    (["allocate", "{root}/other_probe.json", "--min-rank", "40", "--max-rank", "50"], ["below"]),
    (["train", "--task", "sst2", "--method", "sadra", "--glue-dir", "{glue}", "--probe-file", "{root}/other_probe.json",
      "--out", "{root}/o8", *TINY], ["another model"]),
    (["train", "--task", "sst2", "--method", "sadra", "--glue-dir", "{glue}", "--allocation-file", "{root}/ghost_alloc.json",
      "--out", "{root}/o9", *TINY], ["has no module", "encoder.block.0.q"]),
    # models and outputs
    (["train", "--task", "sst2", "--method", "lora", "--glue-dir", "{glue}", "--model", "{root}/no-model", "--out", "{root}/o10", *TINY],
     ["does not exist"]),
    (["train", "--task", "sst2", "--method", "lora", "--glue-dir", "{glue}", "--out", "{root}/a_file", *TINY], ["is a file"]),
    (["train", "--task", "sst2", "--method", "lora", "--glue-dir", "{glue}", "--out", "/proc/sadra-out/run", *TINY],
     ["cannot create", "writable"]),
    (["benchmark", "--preset", "smoke", "--tasks", "sst2", "--glue-dir", "{glue}", "--out", "{root}/a_file"], ["is a file"]),
    (["report", "{root}/a_file"], ["does not exist"]),
]


@pytest.mark.parametrize("args, needles", CASES, ids=[f"case{i:02d}" for i in range(len(CASES))])
def test_bad_input_is_one_line_exit_2_and_loses_nothing(args, needles, files, glue_dir, capsys):
    before = (files["results"] / "results.jsonl").read_bytes()
    values = {k: str(v) for k, v in files.items()} | {"glue": str(glue_dir)}
    code, err = run_main([a.format(**values) for a in args], capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Loading weights", "Writing"))]
    errors = [line for line in lines if line.startswith("sadra: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    assert (files["results"] / "results.jsonl").read_bytes() == before


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_crlf_and_bom_files_parse_like_the_originals(glue_dir):
    from sadra.data import get_task, parse_glue_tsv

    raw = (glue_dir / "MRPC" / "dev.tsv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the original MRPC files carry a BOM
    plain = parse_glue_tsv(raw, get_task("mrpc"))
    crlf = parse_glue_tsv(raw.replace(b"\n", b"\r\n"), get_task("mrpc"))
    no_bom = parse_glue_tsv(raw[3:], get_task("mrpc"))
    assert plain == crlf == no_bom and len(plain) == 408


def test_api_raises_the_specific_classes(minilm):
    model, _ = minilm
    with pytest.raises(DataError, match="no calibration batches"):
        sadra.estimate_sensitivity(model, [])
    with pytest.raises(ModelError, match="num_labels"):
        sadra.load_model("minilm", num_labels=0)
    with pytest.raises(BudgetError):
        sadra.allocate_ranks({"a": 1.0}, shapes={"a": (8, 8)}, min_rank=5, max_rank=3)
    with pytest.raises(DataError, match="unknown GLUE task"):
        sadra.load_glue("imdb")
    with pytest.raises(OutputError):
        from sadra.io import ensure_dir

        ensure_dir(Path(__file__))
    assert all(issubclass(c, SadraError) for c in (ConfigError, DataError, ModelError, BudgetError, OutputError))


# --- property tests: arbitrary input only ever raises the documented error class ----------------

@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_override_parsing_never_crashes(text):
    from sadra.config import BenchmarkConfig

    cfg = BenchmarkConfig({})
    try:
        cfg.apply([text])
    except ConfigError:
        pass
    except DataError:  # an unknown task name in tasks=...
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["train", "lora", "probe", "max_length", "model", "seeds", "tasks", "methods",
                                        "per_task", "per_method", "name", "epochs", "allocate", "method_seeds"]),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                                    max_leaves=6), max_size=4))
def test_config_mappings_never_crash(data):
    from sadra.config import BenchmarkConfig

    try:
        BenchmarkConfig(data)
    except (ConfigError, DataError):
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["sst2", "mrpc", "qnli", "cola", "stsb", "mnli"]))
def test_tsv_parsing_of_arbitrary_bytes_never_crashes(data, task):
    from sadra.data import get_task, parse_glue_tsv

    try:
        rows = parse_glue_tsv(data, get_task(task))
    except DataError:
        return
    assert rows and all(isinstance(r.text_a, str) for r in rows)

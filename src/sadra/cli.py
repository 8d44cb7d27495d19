"""The ``sadra`` command line: a thin layer over the Python API.

Bad input prints one line, ``sadra: error: <problem>; <fix>``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import SadraError


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"sadra: error: {message}; see '{self.prog} --help'\n")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--glue-dir", default=None, help="local GLUE folder (original TSV layout); default: $SADRA_GLUE_DIR, else the hub")


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} must be positive" if low == 1 else f"{text} must not be negative")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import METHODS, PRESETS

    parser = _Parser(prog="sadra", description="Curvature-aware LoRA rank allocation: probe, allocate, train, benchmark.")
    parser.add_argument("--version", action="version", version=f"sadra {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    from .settings import RULES, default_of, help_of

    p = sub.add_parser("probe", help="measure each module's signal (curvature, gradient spectrum) on calibration batches")
    p.add_argument("--model", default=default_of("model"), help=help_of("model"))
    p.add_argument("--task", default=None, help="GLUE task whose train split gives the calibration batches (default sst2)")
    p.add_argument("--text-file", default=None, help="causal LM: a text file, one document per line")
    _add_data_args(p)
    p.add_argument("--estimator", default=default_of("probe.estimator"), help=help_of("probe.estimator"))
    p.add_argument("--mode", default=default_of("probe.mode"), help=help_of("probe.mode"))
    p.add_argument("--max-probes", type=_positive_int, default=default_of("probe.max_probes"), help=help_of("probe.max_probes"))
    p.add_argument("--rtol", type=_non_negative_float, default=default_of("probe.rtol"), help=help_of("probe.rtol"))
    p.add_argument("--probes-per-batch", type=_positive_int, default=None, help=help_of("probe.probes_per_batch"))
    p.add_argument("--batch-size", type=_positive_int, default=default_of("probe.batch_size"), help=help_of("probe.batch_size"))
    p.add_argument("--num-batches", type=_positive_int, default=default_of("probe.num_batches"), help=help_of("probe.num_batches"))
    p.add_argument("--max-length", type=_positive_int, default=default_of("max_length"), help=help_of("max_length"))
    p.add_argument("--head-warmup-steps", type=_non_negative_int, default=default_of("probe.head_warmup_steps"),
                   help=help_of("probe.head_warmup_steps"))
    p.add_argument("--max-rank", type=_positive_int, default=default_of("allocate.max_rank"),
                   help="gradient signal: keep max_rank + 1 singular values per module")
    p.add_argument("--targets", nargs="+", default=None, help="module names or regexes (default: every linear map in the blocks)")
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help=help_of("trust_remote_code"))
    p.add_argument("--out", required=True, help="where to write the probe report (JSON)")

    a = sub.add_parser("allocate", help="allocate ranks from a probe report under a parameter budget")
    a.add_argument("probe", help="probe report written by 'sadra probe'")
    a.add_argument("--rule", default=None, choices=RULES,
                   help=f"{help_of('allocate.rule')}. Default: {default_of('allocate.rule')} for a report with the "
                        "gradient spectrum (--estimator gradient), else proportional")
    a.add_argument("--budget", default=None,
                   help="'lora-r<k>' (uniform rank k on the same modules) or a parameter count. "
                        "Default: lora-r<base rank>, the budget of the uniform LoRA it replaces")
    a.add_argument("--base-rank", type=_positive_int, default=default_of("lora.r"), help="rank of the uniform LoRA it replaces")
    a.add_argument("--min-rank", type=_non_negative_int, default=default_of("allocate.min_rank"), help=help_of("allocate.min_rank"))
    a.add_argument("--max-rank", type=_positive_int, default=default_of("allocate.max_rank"), help=help_of("allocate.max_rank"))
    a.add_argument("--prune", action="store_true", help=help_of("allocate.prune"))
    a.add_argument("--normalize", default=default_of("allocate.normalize"), help=help_of("allocate.normalize"))
    a.add_argument("--power", type=float, default=default_of("allocate.power"), help=help_of("allocate.power"))
    a.add_argument("--out", default=None, help="where to write the allocation (in --format)")
    a.add_argument("--format", default="json", choices=("json", "peft", "axolotl"),
                   help="json: SADRA's allocation file; peft: an adapter_config.json-ready LoraConfig; "
                        "axolotl: YAML keys lora_target_modules / lora_rank_pattern / lora_alpha_pattern")
    a.add_argument("--alpha-ratio", type=float, default=default_of("allocate.alpha_ratio"),
                   help=help_of("allocate.alpha_ratio"))
    a.add_argument("--task-type", default=None, help="peft format: the LoraConfig's task_type (e.g. CAUSAL_LM, SEQ_CLS)")
    a.add_argument("--plot", default=None, help="also draw the allocation as a heatmap PNG")

    t = sub.add_parser("train", help="fine-tune one (task, method, seed) and evaluate it")
    t.add_argument("--task", required=True, help="a GLUE task (sst2, mrpc, qnli, ...), sst2-lm (SST-2 as prompts for a causal LM) or causal-lm (with --text-file)")
    t.add_argument("--text-file", default=None, help="causal-lm: training text, one document per line")
    t.add_argument("--method", required=True, help="one of: " + ", ".join(METHODS))
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--preset", default=None, help=f"take settings from a preset ({', '.join(PRESETS)})")
    t.add_argument("--config", default=None, help="YAML file of settings")
    _add_data_args(t)
    t.add_argument("--model", default=None)
    t.add_argument("--max-train-samples", type=_positive_int, default=None)
    t.add_argument("--max-eval-samples", type=_positive_int, default=None)
    t.add_argument("--probe-file", default=None, help="sadra variants: use this probe report instead of probing")
    t.add_argument("--allocation-file", default=None, help="sadra variants: use this allocation as it is")
    t.add_argument("--trust-remote-code", action="store_true")
    t.add_argument("--preset-name", default=None, help=argparse.SUPPRESS)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.epochs=2")

    b = sub.add_parser("benchmark", help="run the grid tasks x methods x seeds")
    b.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (default smoke; cpu-llm: SmolLM2 on SST-2 prompts)")
    b.add_argument("--config", default=None, help="YAML benchmark config instead of a preset")
    b.add_argument("--tasks", nargs="+", default=None)
    b.add_argument("--methods", nargs="+", default=None)
    b.add_argument("--seeds", nargs="+", type=_non_negative_int, default=None)
    _add_data_args(b)
    b.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    b.add_argument("--series", default=None,
                   help="start a separate series in OUT/SERIES (settings may differ from OUT's finished cells)")
    b.add_argument("--no-retry-failed", action="store_true",
                   help="skip cells recorded in failures.jsonl (by default a failed cell is retried once)")
    b.add_argument("--workers", default=None,
                   help="cell processes run at once, each claiming the next cell: a number, or 'auto' (CPU cores / "
                        "train.threads); default: the preset's workers (1 if it names none)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument("overrides", nargs="*", help="key=value settings, e.g. train.epochs=2 per_method.full.train.learning_rate=5e-5")

    r = sub.add_parser("report", help="rewrite results.md, report.md and the figures of a benchmark folder "
                                      "from its results.jsonl")
    r.add_argument("folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"probe": cmd_probe, "allocate": cmd_allocate, "train": cmd_train,
                "benchmark": cmd_benchmark, "report": cmd_report}[args.command](args)
    except SadraError as exc:
        msg = " ".join(str(exc).split())
        print(f"sadra: error: {msg}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permissions changed mid-run, ...: the environment, not a bug
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"sadra: error: {exc.strerror or exc}{where}; free space or fix permissions, then rerun to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sadra: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def cmd_probe(args) -> int:
    from .adapt import probe_options
    from .config import RUN_DEFAULTS, merge_run
    from .data import get_task
    from .io import check_output_file
    from .probe import estimate_sensitivity

    out = check_output_file(args.out, "probe report")  # before any work
    settings = merge_run(RUN_DEFAULTS, {"probe": {
        "estimator": args.estimator, "mode": args.mode, "max_probes": args.max_probes, "rtol": args.rtol,
        "probes_per_batch": args.probes_per_batch, "batch_size": args.batch_size, "num_batches": args.num_batches,
        "head_warmup_steps": args.head_warmup_steps}, "allocate": {"max_rank": args.max_rank}}, "command line")
    model, batches, task_name = _probe_inputs(args)
    has_head = not args.text_file and not get_task(args.task or "sst2").is_prompt
    report = estimate_sensitivity(model, batches, targets=args.targets, seed=args.seed, progress=sys.stderr.isatty(),
                                  **probe_options(settings, has_head=has_head))
    report.model = args.model
    report.meta["task"] = task_name
    report.save(out)
    rel = sorted(report.relative_stderr.values())
    print(f"probed {len(report.scores)} modules with {report.estimator} in {report.seconds:.1f} s "
          f"({report.probes} probes, median relative s.e. {rel[len(rel) // 2]:.3f}); wrote {out}")
    return 0


def _probe_inputs(args):
    """The model (as a run loads it) and calibration batches of ``sadra probe``."""
    from .data import calibration_batches, get_task, load_glue
    from .models import load_model

    if args.text_file:
        from .lm import load_text_batches

        model, tokenizer = load_model(args.model, task="causal-lm", trust_remote_code=args.trust_remote_code)
        batches = load_text_batches(args.text_file, tokenizer, num_batches=args.num_batches, batch_size=args.batch_size,
                                    max_length=args.max_length, seed=args.seed)
        return model, batches, None
    spec = get_task(args.task or "sst2")
    rows = load_glue(spec, "train", args.glue_dir)
    sizes = dict(num_batches=args.num_batches, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    if spec.is_prompt:  # a causal LM scored on the answer token, as `sadra train` probes it
        from .lm import prompt_batches

        model, tokenizer = load_model(args.model, task="causal-lm", trust_remote_code=args.trust_remote_code)
        return model, prompt_batches(rows, spec.prompt, tokenizer, **sizes), spec.name
    model, tokenizer = load_model(args.model, spec.num_labels, seed=args.seed, trust_remote_code=args.trust_remote_code)
    return model, calibration_batches(rows, tokenizer, **sizes), spec.name


def cmd_allocate(args) -> int:
    from .allocate import allocate_ranks
    from .io import check_output_file
    from .probe import SensitivityReport

    if args.format != "json" and not args.out:
        from .errors import ConfigError

        raise ConfigError(f"--format {args.format} writes a file: give --out PATH")
    out = check_output_file(args.out, "allocation") if args.out else None
    plot = check_output_file(args.plot, "plot") if args.plot else None
    report = SensitivityReport.load(args.probe)
    budget = args.budget or f"lora-r{args.base_rank}"
    alloc = allocate_ranks(report, rule=args.rule, budget=budget, base_rank=args.base_rank, min_rank=args.min_rank,
                           max_rank=args.max_rank, prune=args.prune, normalize=args.normalize, power=args.power)
    print(alloc.table())
    if out:
        extra = {"task_type": args.task_type} if args.format == "peft" and args.task_type else {}
        alloc.export(out, args.format, alpha_ratio=args.alpha_ratio, **extra)
        print(f"wrote {out} ({args.format})")
    if plot:
        from .report import plot_allocation

        plot_allocation(alloc.ranks, alloc.shapes, plot, title=f"SADRA ranks ({report.estimator}, {alloc.rule})",
                        budget=alloc.budget, base_rank=alloc.base_rank)
        print(f"wrote {plot}")
    return 0


def _run_settings(args) -> tuple[dict, str | None]:
    from .config import GRID_KEYS, BenchmarkConfig, load_benchmark_config, load_yaml, merge_run, RUN_DEFAULTS

    if args.config and args.preset:
        from .errors import ConfigError

        raise ConfigError("give --preset or --config, not both")
    if args.preset:
        cfg = load_benchmark_config(preset=args.preset)
        settings = cfg.resolve(*_task_method(args))
        preset = args.preset
    elif args.config:
        data = load_yaml(args.config)
        if set(GRID_KEYS) & set(data):
            settings = BenchmarkConfig(data, where=args.config).resolve(*_task_method(args))
        else:
            settings = merge_run(RUN_DEFAULTS, data, args.config)
        preset = None
    else:
        settings = merge_run(RUN_DEFAULTS, {}, "defaults")
        preset = None
    direct = {}
    for key in ("glue_dir", "model", "max_train_samples", "max_eval_samples", "probe_file", "allocation_file"):
        value = getattr(args, key, None)
        if value is not None:
            direct[key] = value
    if args.trust_remote_code:
        direct["trust_remote_code"] = True
    settings = merge_run(settings, direct, "command line")
    from .config import nest, parse_override

    for text in args.overrides:
        keys, value = parse_override(text)
        settings = merge_run(settings, nest(keys, value), f"override {text!r}")
    return settings, preset


def _task_method(args) -> tuple[str, str]:
    from .config import check_method
    from .data import get_task

    if args.task == "causal-lm":
        return "causal-lm", check_method(args.method)
    return get_task(args.task).name, check_method(args.method)


def cmd_train(args) -> int:
    from .benchmark import end_with_benchmark
    from .train import run_causal_lm, run_glue

    end_with_benchmark()

    task, method = _task_method(args)
    if (task == "causal-lm") != bool(args.text_file):
        from .errors import ConfigError

        raise ConfigError("--text-file goes with --task causal-lm (and causal-lm needs --text-file FILE)")
    settings, preset = _run_settings(args)
    if task == "causal-lm":
        record = run_causal_lm(args.text_file, method, args.seed, args.out, settings, progress=not args.quiet,
                               preset=args.preset_name or preset)
    else:
        record = run_glue(task, method, args.seed, args.out, settings, progress=not args.quiet,
                          preset=args.preset_name or preset)
    metric = record["main_metric"]
    before = record.get("zero_shot_metrics", {}).get(metric)
    print(f"{task} {method} seed {args.seed}: {metric} {record['metrics'][metric]:.4f}"
          + (f" (zero-shot {before:.4f})" if before is not None else "") + " "
          f"({record['trainable_params']:,} trainable; train {record['train_seconds']:.0f} s); wrote {args.out}/metrics.json")
    return 0


def cmd_benchmark(args) -> int:
    from .benchmark import run_benchmark
    from .config import load_benchmark_config

    overrides = list(args.overrides)
    if args.tasks:
        overrides.append("tasks=" + ",".join(args.tasks))
    if args.methods:
        overrides.append("methods=" + ",".join(args.methods))
    if args.seeds:
        overrides.append("seeds=" + ",".join(str(s) for s in args.seeds))
    if args.glue_dir:
        overrides.append(f"glue_dir={args.glue_dir}")
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    cfg = load_benchmark_config(args.preset, args.config, overrides)
    out = Path(args.out or os.path.join("runs", cfg.name))
    if args.series:
        from .config import check_name

        out = out / check_name(args.series, "--series")
    from .distributed import is_main_process
    from .io import read_jsonl

    records = run_benchmark(cfg, out, progress=not args.quiet, retry_failed=not args.no_retry_failed,
                            workers=cfg.worker_count())
    if not is_main_process():
        return 0
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.jsonl'}, {out / 'results.md'} and {out / 'report.md'}")
    finished = {(r.get("task"), r.get("method"), r.get("seed")) for r in records}
    failed = sorted({f"{f['task']}/{f['method']}/seed{f['seed']}" for f in read_jsonl(out / "failures.jsonl")
                     if (f.get("task"), f.get("method"), f.get("seed")) not in finished})
    if failed:
        print(f"sadra: {len(failed)} cell(s) failed: {', '.join(failed)}; see {out / 'failures.jsonl'}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from .io import read_json, read_jsonl
    from .report import write_report
    from .results import grid_methods, write_results

    path = write_report(args.folder)  # checks the folder and its records before anything is written
    folder = Path(args.folder)
    # A grid stopped at a time limit never wrote its results.md; the report brings it up to date.
    grid = read_json(folder / "benchmark_config.json") if (folder / "benchmark_config.json").is_file() else {}
    write_results(read_jsonl(folder / "results.jsonl"), folder, methods=grid_methods(grid) or None,
                  failures=read_jsonl(folder / "failures.jsonl"))
    print(f"wrote {path} and {folder / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run and benchmark settings: one schema, YAML presets, config files and key=value overrides.

Every setting has a default here; a preset or config file overrides some of them; ``key=value``
on the command line (dotted keys, YAML values) overrides any field last. An unknown key is an
error that suggests the nearest known one, and every value is checked against its default's
type, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError

from . import settings as _settings

METHODS = ("full", "lora", "lora-ga", "sadra", "sadra-seed", "sadra-fisher", "adalora", "eva", "random")
# Methods whose ranks come from SADRA's probe and allocation (or, for random, its solver).
ALLOCATED_METHODS = ("sadra", "sadra-seed", "sadra-fisher", "random")
PRESETS = ("smoke", "cpu", "evidence", "gpu", "paper", "cpu-llm")
# Settings a method fixes whatever the config says: the named variants of SADRA, and LoRA-GA.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "sadra-seed": {"probe": {"estimator": "hutchinson"}, "allocate": {"rule": "proportional"}},
    "sadra-fisher": {"probe": {"estimator": "fisher"}, "allocate": {"rule": "proportional"}},
    "lora-ga": {"init": "gradient"},
    "lora": {"init": "default"},
}


# Settings that say where things are, not what runs: they do not change a cell's identity.
NOT_IDENTITY = ("glue_dir", "cell_timeout", "uniform_twin", "zero_shot_from")
# What uniform LoRA does not read: two cells alike in everything else train the same adapter
# whenever their ranks are alike.
_NOT_TRAINING = NOT_IDENTITY + ("probe", "allocate", "eva", "adalora", "probe_file", "allocation_file")
# Settings added after cells were recorded: left out of the hash while unset, so that the cells
# recorded before them, which ran as if unset, still match.
_ADDED_UNSET = ("min_train_words",)


def settings_hash(settings: dict[str, Any], base_method: str) -> str:
    """A short hash of what a cell runs: its method and every setting that changes the result."""
    ident = {k: v for k, v in settings.items()
             if k not in NOT_IDENTITY and not (k in _ADDED_UNSET and v is None)}
    text = json.dumps({"method": base_method, "settings": ident}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def training_hash(settings: dict[str, Any]) -> str:
    """The settings hash of what uniform LoRA reads of ``settings``."""
    return settings_hash({k: v for k, v in settings.items() if k not in _NOT_TRAINING}, "lora")


def zero_shot_key(task: str, settings: dict[str, Any]) -> str:
    """What a prompt task's zero-shot score reads: the model and the evaluation rows (and how they
    are batched). Two runs alike in it score the untrained model identically, whatever they train."""
    keys = ("model", "trust_remote_code", "max_length", "eval_split", "max_eval_samples", "data_seed",
            "min_train_words")
    read = {"task": task, **{k: settings[k] for k in keys}, "eval_batch_size": settings["train"]["eval_batch_size"]}
    return settings_hash(read, "zero-shot")


def method_settings(method: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with what ``method`` fixes applied (``sadra-seed`` always probes with Hutchinson)."""
    run = merge_run(dict(settings), METHOD_SETTINGS.get(method, {}), f"method {method}")
    check_signal_and_rule(method, run)
    return run


def check_signal_and_rule(method: str, run: Mapping[str, Any]) -> None:
    """A spectral rule reads the gradient spectrum: say so before any model is loaded, not after the probe."""
    rule, signal = run["allocate"]["rule"], run["probe"]["estimator"]
    probes = method in ALLOCATED_METHODS and method != "random" and not run["probe_file"] and not run["allocation_file"]
    if probes and rule in _settings.SPECTRAL_RULES and signal not in _settings.SPECTRUM_SIGNALS:
        raise ConfigError(f"allocate.rule={rule} reads the gradient spectrum, which probe.estimator={signal} does not "
                          f"measure; set probe.estimator=gradient, or allocate.rule=proportional to rank by the {signal} trace")

# The run schema: every default, type and rule comes from sadra.settings.
RUN_DEFAULTS: dict[str, Any] = _settings.defaults()
_OPTIONAL_TYPES = {p: (f.metadata["optional"],) for p, f in _settings.walk() if f.metadata.get("optional")}
_POSITIVE = {p for p, f in _settings.walk() if f.metadata.get("check") == "positive"}
_NON_NEGATIVE = {p for p, f in _settings.walk() if f.metadata.get("check") == "non_negative"}
_CHOICES = {p: f.metadata["choices"] for p, f in _settings.walk() if f.metadata.get("choices")}

# A benchmark config is a run config plus the grid and per-task / per-method overrides.
GRID_DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "tasks": ["sst2", "mrpc", "qnli"],
    "methods": list(METHODS),
    "seeds": [0],
    "workers": 1,
}
GRID_KEYS = ("name", "tasks", "methods", "seeds", "method_seeds", "workers", "per_task", "per_method", "variants")


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"


def _check_value(path: str, value: Any, default: Any) -> Any:
    if value is None:
        if default is None:
            return None
        raise ConfigError(f"{path} cannot be empty; give a value like {default!r}")
    expected: tuple[type, ...]
    if default is None:
        expected = _OPTIONAL_TYPES.get(path, (str,))
    else:
        expected = (type(default),)
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if float in expected and isinstance(value, str):
        try:  # YAML 1.1 reads 5e-4 (no dot) as text
            value = float(value)
        except ValueError:
            pass
    if bool not in expected and isinstance(value, bool) or not isinstance(value, expected):
        names = "/".join(t.__name__ for t in expected)
        raise ConfigError(f"{path} must be {names}, got {value!r}; e.g. {path}={default if default is not None else 1}")
    if isinstance(value, float) and value != value:
        raise ConfigError(f"{path} is NaN; give a number")
    if path in _POSITIVE and isinstance(value, (int, float)) and value <= 0:
        raise ConfigError(f"{path} must be positive, got {value!r}")
    if path in _NON_NEGATIVE and isinstance(value, (int, float)) and value < 0:
        raise ConfigError(f"{path} must not be negative, got {value!r}")
    if path in _CHOICES and value not in _CHOICES[path]:
        raise ConfigError(f"{path} must be one of {', '.join(_CHOICES[path])}, got {value!r}")
    return value


def merge_run(base: dict[str, Any], override: Mapping[str, Any], where: str = "config", prefix: str = "") -> dict[str, Any]:
    """``base`` updated by ``override``, both shaped like RUN_DEFAULTS; checks every key and type."""
    if not isinstance(override, Mapping):
        raise ConfigError(f"{where}: {prefix or 'the config'} must be a mapping of settings, got {override!r}")
    out = copy.deepcopy(base)
    schema = _schema_at(prefix)
    for key, value in override.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            raise ConfigError(f"{where}: unknown key {path!r}{_suggest(str(key), list(schema))}")
        if isinstance(schema[key], dict):
            out[key] = merge_run(out[key], value, where, path)
        else:
            out[key] = _check_value(path, value, schema[key])
    return out


def _schema_at(prefix: str) -> dict[str, Any]:
    node: Any = RUN_DEFAULTS
    for part in filter(None, prefix.split(".")):
        node = node[part]
    return node


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=1e-3"`` -> (['train', 'learning_rate'], 0.001)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value; write e.g. train.epochs=2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; write e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r} has a value that is not valid YAML; quote strings, e.g. model='my/model'") from None
    if isinstance(value, str) and raw.strip().lower() in ("nan", ".nan"):
        value = float("nan")
    return key.split("."), value


def nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings, not {type(data).__name__}")
    return data


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}, or pass --config FILE")
    return Path(str(resources.files("sadra") / "presets" / f"{name}.yaml"))


class BenchmarkConfig:
    """A grid (tasks x methods x seeds) and the settings of each of its runs."""

    def __init__(self, data: Mapping[str, Any] | None = None, where: str = "config"):
        data = dict(data or {})
        grid = copy.deepcopy(GRID_DEFAULTS)
        run_part = {k: v for k, v in data.items() if k not in GRID_KEYS}
        for key in ("name", "tasks", "methods", "seeds", "workers"):
            if key in data:
                grid[key] = data[key]
        self.where = where
        self.name = check_name(grid["name"], where)
        self.variants = self._variants(data.get("variants") or {}, where)
        self.tasks = _check_list("tasks", grid["tasks"], str, where)
        self.methods = _check_list("methods", grid["methods"], str, where)
        self.seeds = _check_list("seeds", grid["seeds"], int, where)
        from .data import get_task

        self.tasks = [get_task(t).name for t in self.tasks]
        for m in self.methods:
            self.check_method(m)
        # The file's own order, kept when --methods runs a subset: a folder's tables follow it.
        self.listed_methods = list(self.methods)
        if any(s < 0 for s in self.seeds):
            raise ConfigError(f"{where}: seeds must be non-negative integers, got {self.seeds}")
        self.method_seeds = self._method_seeds(data.get("method_seeds") or {}, where)
        self.workers = check_workers(grid["workers"], where)
        self.run = merge_run(RUN_DEFAULTS, run_part, where)
        self.per_task = self._overrides(data.get("per_task") or {}, "per_task", where)
        self.per_method = self._overrides(data.get("per_method") or {}, "per_method", where)

    def _variants(self, table: Any, where: str) -> dict[str, dict[str, Any]]:
        """Named arms: ``{name: {method: <a method>, <settings>...}}``, e.g. a rule or signal of ``sadra``."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: variants must map names to {{method: ..., settings}}")
        out = {}
        for name, entry in table.items():
            check_name(name, f"{where}: variant")
            if name in METHODS:
                raise ConfigError(f"{where}: variant {name!r} has the name of a method; choose another name")
            if not isinstance(entry, Mapping) or "method" not in entry:
                raise ConfigError(f"{where}: variant {name!r} needs 'method: <one of {', '.join(METHODS)}>'")
            check_method(entry["method"])
            settings = {k: v for k, v in entry.items() if k != "method"}
            merge_run(RUN_DEFAULTS, settings, f"{where}: variant {name}")
            out[name] = {"method": entry["method"], **settings}
        return out

    def _method_seeds(self, table: Any, where: str) -> dict[str, list[int]]:
        """``{method: [seeds]}``: the only seeds that method runs (costly or secondary arms get fewer)."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: method_seeds must map methods to lists of seeds, e.g. {{eva: [0, 1, 2]}}")
        out = {}
        for name, seeds in table.items():
            self.check_method(name)
            out[name] = _check_list(f"method_seeds.{name}", seeds, int, where)
            if any(s < 0 for s in out[name]):
                raise ConfigError(f"{where}: method_seeds.{name} must list non-negative integers, got {seeds!r}")
        return out

    def seeds_for(self, method: str) -> list[int]:
        """The seeds a method's cells run: ``seeds``, less those outside ``method_seeds[method]`` if set.

        A run restricted with ``--seeds`` therefore keeps each method's own limit."""
        own = self.method_seeds.get(method)
        return [s for s in self.seeds if own is None or s in own]

    def worker_count(self) -> int:
        """How many cells run at once: ``workers``, where ``auto`` is the CPU cores over each cell's
        ``train.threads`` (1 if threads is unset: torch then takes every core for one cell)."""
        if self.workers != "auto":
            return self.workers
        import os

        threads = self.run["train"]["threads"]
        return max(1, (os.cpu_count() or 1) // threads) if threads else 1

    def cells(self) -> list[tuple[str, str, int]]:
        """Every (task, method, seed) of the grid, in the order they run."""
        return [(t, m, s) for t in self.tasks for m in self.methods for s in self.seeds_for(m)]

    def check_method(self, method: str) -> str:
        return method if method in self.variants else check_method(method)

    def base_method(self, method: str) -> str:
        """The method a grid column runs: a variant's own method, else the column's name."""
        return self.variants[method]["method"] if method in self.variants else method

    def _overrides(self, table: Any, label: str, where: str) -> dict[str, dict[str, Any]]:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: {label} must map names to settings")
        out = {}
        for name, settings in table.items():
            if label == "per_task":
                from .data import get_task

                name = get_task(name).name
            else:
                self.check_method(name)
            merge_run(RUN_DEFAULTS, settings or {}, where, "")  # validate now, not mid-benchmark
            out[name] = settings or {}
        return out

    def apply(self, overrides: list[str]) -> None:
        """Apply ``key=value`` strings. Grid keys (tasks, methods, seeds) take lists or a1,a2."""
        for text in overrides:
            keys, value = parse_override(text)
            if keys[0] in ("tasks", "methods", "seeds") and len(keys) == 1:
                kind = int if keys[0] == "seeds" else str
                values = _check_list(keys[0], _override_items(value, kind), kind, f"override {text!r}")
                if keys[0] == "tasks":
                    from .data import get_task

                    values = [get_task(t).name for t in values]
                elif keys[0] == "methods":
                    values = [self.check_method(m) for m in values]
                elif any(s < 0 for s in values):
                    raise ConfigError(f"override {text!r}: seeds must be non-negative integers")
                setattr(self, keys[0], values)
            elif keys[0] in ("per_task", "per_method") and len(keys) >= 3:
                table = getattr(self, keys[0])
                name = keys[1]
                entry = copy.deepcopy(table.get(name, {}))
                _deep_set(entry, keys[2:], value)
                table.update(self._overrides({name: entry}, keys[0], f"override {text!r}"))
            elif keys[0] == "method_seeds" and len(keys) == 2:
                items = _override_items(value, int)
                self.method_seeds = self._method_seeds({**self.method_seeds, keys[1]: items}, f"override {text!r}")
            elif keys[0] == "workers" and len(keys) == 1:
                self.workers = check_workers(value, f"override {text!r}")
            elif keys[0] == "name" and len(keys) == 1:
                self.name = check_name(value, f"override {text!r}")
            else:
                self.run = merge_run(self.run, nest(keys, value), f"override {text!r}")

    def resolve(self, task: str, method: str) -> dict[str, Any]:
        """The settings of one run: base <- per_task[task] <- per_method[method] <- the variant's own
        settings <- what the method fixes (``sadra-seed`` is always Hutchinson)."""
        run = merge_run(self.run, self.per_task.get(task, {}), self.where)
        run = merge_run(run, self.per_method.get(method, {}), self.where)
        if method in self.variants:
            run = merge_run(run, {k: v for k, v in self.variants[method].items() if k != "method"}, self.where)
        return method_settings(self.base_method(method), run)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tasks": self.tasks, "methods": self.methods, "seeds": self.seeds,
                "method_seeds": self.method_seeds, "workers": self.workers, **self.run, "per_task": self.per_task,
                "per_method": self.per_method, "variants": self.variants}


def _override_items(value: Any, kind: type) -> list:
    """A list override's items: a YAML list as given, else ``a1,a2`` split at commas (whole numbers
    read as int when ``kind`` is int; anything else is left for the list check to name)."""
    items = value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
    return [int(v) if kind is int and str(v).lstrip("-").isdigit() else v for v in items]


def _deep_set(d: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _check_list(label: str, value: Any, kind: type, where: str) -> list:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: {label} must be a non-empty list, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ConfigError(f"{where}: {label} must list {kind.__name__} values, got {v!r}")
    return list(dict.fromkeys(value))


def check_name(name: Any, where: str) -> str:
    """A benchmark name becomes a folder name (runs/<name>): letters, digits, '.', '_', '-' only."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"{where}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names a folder)")
    return name


def check_workers(value: Any, where: str) -> int | str:
    """``workers``: a positive whole number, or ``auto``."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ConfigError(f"{where}: workers must be a positive whole number or 'auto', got {value!r}")


def check_method(method: str) -> str:
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown method {method!r}; {hint}choose one of: {', '.join(METHODS)}")
    return method


def load_benchmark_config(preset: str | None = None, config_file: str | None = None, overrides: list[str] | None = None) -> BenchmarkConfig:
    if preset and config_file:
        raise ConfigError("give --preset or --config, not both")
    if config_file:
        cfg = BenchmarkConfig(load_yaml(config_file), where=str(config_file))
    else:
        name = preset or "smoke"
        cfg = BenchmarkConfig(load_yaml(preset_path(name)), where=f"preset {name}")
    cfg.apply(list(overrides or []))
    return cfg

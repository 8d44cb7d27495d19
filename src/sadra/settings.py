"""Every run setting in one place: typed dataclasses, each field with its default, its allowed
values and its help text.

The YAML presets, ``key=value`` overrides, config validation, the ``sadra`` CLI flags, the
benchmark and the report all read these classes; nothing else holds a default. A field's
``metadata`` says what values it takes:

* ``help``      one line for ``--help`` and the docs
* ``check``     ``"positive"`` (> 0) or ``"non_negative"`` (>= 0) for numbers
* ``choices``   the allowed values of a string
* ``optional``  the type of a field whose default is None (None: not set)

Dotted keys name nested fields: ``train.learning_rate``, ``probe.estimator``.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Iterator


def setting(default: Any, help: str, *, check: str | None = None, choices: tuple | None = None,
            optional: type | None = None) -> Any:
    """A dataclass field with its help text and validation rule."""
    meta = {"help": help, "check": check, "choices": choices, "optional": optional}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def group(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


ESTIMATORS = ("fisher", "hutchinson", "gradient")
RULES = ("proportional", "spectral", "spectral-newton")
# Rules that read the gradient spectrum, and the signals that measure one.
SPECTRAL_RULES = ("spectral", "spectral-newton")
SPECTRUM_SIGNALS = ("gradient",)


def default_rule(has_spectrum: bool) -> str:
    """``allocate.rule``'s default, or ``proportional`` for input without a gradient spectrum (a trace or
    plain scores), the only rule such input supports."""
    rule = default_of("allocate.rule")
    return rule if rule not in SPECTRAL_RULES or has_spectrum else "proportional"
INITS = ("default", "gradient")


@dataclass
class TrainSettings:
    epochs: float = setting(3.0, "passes over the training rows", check="positive")
    learning_rate: float = setting(5e-4, "peak learning rate (AdamW, linear decay after warm-up)", check="positive")
    batch_size: int = setting(32, "training examples per device and step", check="positive")
    eval_batch_size: int = setting(64, "examples per evaluation batch", check="positive")
    grad_accum: int = setting(1, "gradient accumulation steps (effective batch = batch_size x grad_accum x processes)",
                              check="positive")
    weight_decay: float = setting(0.01, "AdamW weight decay", check="non_negative")
    warmup_ratio: float = setting(0.06, "fraction of optimizer steps with a linear learning-rate warm-up",
                                  check="non_negative")
    lr_scheduler: str = setting("linear", "learning-rate schedule after warm-up",
                                choices=("linear", "cosine", "constant", "constant_with_warmup"))
    max_grad_norm: float = setting(1.0, "gradient clipping norm", check="non_negative")
    logging_steps: int = setting(10, "optimizer steps between loss log lines", check="positive")
    save_steps: int = setting(200, "optimizer steps between checkpoints (a killed run resumes from the last)",
                              check="positive")
    save_total_limit: int = setting(1, "checkpoints kept", check="non_negative")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory")
    threads: int | None = setting(None, "torch CPU threads (default: torch's choice)", check="positive", optional=int)
    evals_per_epoch: int = setting(1, "evaluations on the eval split per epoch (0: only the final one, which "
                                   "every run makes)", check="non_negative")


@dataclass
class LoraSettings:
    r: int = setting(8, "uniform LoRA rank; also sets the parameter budget of every allocated method "
                        "(the cost of uniform rank r on the same modules)", check="positive")
    alpha: float = setting(16.0, "LoRA alpha of uniform LoRA (scale alpha/r)", check="non_negative")
    dropout: float = setting(0.1, "dropout on the LoRA input", check="non_negative")


@dataclass
class ProbeSettings:
    estimator: str = setting("gradient", "the signal measured per module before training: gradient (mean-gradient "
                             "spectrum and Fisher trace; the default, chosen by the selection study), fisher "
                             "(Monte-Carlo Fisher trace) or hutchinson (Hessian trace)", choices=ESTIMATORS)
    mode: str = setting("per_module", "Hutchinson only: per_module (one HvP per module) or joint (one HvP per round)",
                        choices=("per_module", "joint"))
    num_batches: int = setting(4, "calibration batches drawn from the train split", check="positive")
    batch_size: int = setting(16, "rows per calibration batch", check="positive")
    max_probes: int = setting(16, "the most probe rounds (one sample per module each): the bound on the stopping rule "
                              "(the gradient signal makes one pass over its batches, so at most num_batches)",
                              check="positive")
    min_probes: int = setting(3, "rounds before the stopping rule may stop", check="positive")
    rtol: float = setting(0.1, "stop once every module's standard error / |mean| <= rtol (0: always max_probes)",
                          check="non_negative")
    probes_per_batch: int | None = setting(None, "rounds that share one batch (default: 8 for joint Hutchinson, else 1)",
                                           check="positive", optional=int)
    head_warmup_steps: int = setting(50, "train the fresh task head alone for this many steps before probing "
                                     "(restored afterwards)", check="non_negative")
    head_warmup_lr: float = setting(1e-3, "learning rate of the head warm-up", check="non_negative")


@dataclass
class AllocateSettings:
    rule: str = setting("spectral", "what a rank is worth: spectral (greedy by sigma_j^2 per parameter; the default, "
                        "chosen by the selection study), spectral-newton (sigma_j^2 / Fisher curvature per weight) or "
                        "proportional (rank ~ score)", choices=RULES)
    min_rank: int = setting(2, "smallest rank of a kept module", check="non_negative")
    max_rank: int = setting(32, "largest rank of any module", check="positive")
    prune: bool = setting(False, "allow rank 0 (no adapter) where a module is worth less than min_rank")
    normalize: str = setting("none", "proportional rule: none (raw trace) or per_param (trace per weight)",
                             choices=("none", "per_param"))
    power: float = setting(1.0, "proportional rule: rank ~ score**power", check="positive")
    alpha_ratio: float = setting(2.0, "lora_alpha = alpha_ratio x rank per module (keeps alpha/r constant)",
                                 check="positive")
    use_rslora: bool = setting(False, "rsLoRA scaling alpha/sqrt(r) with one alpha for every module")


@dataclass
class AdaLoraSettings:
    init_r: int = setting(12, "AdaLoRA's starting rank per module", check="positive")
    target_r: int = setting(8, "AdaLoRA's average final rank", check="positive")
    alpha: float = setting(16.0, "AdaLoRA's alpha", check="non_negative")
    tinit_ratio: float = setting(0.1, "fraction of steps before budgeting starts", check="non_negative")
    tfinal_ratio: float = setting(0.3, "fraction of steps after budgeting ends (ranks fixed)", check="non_negative")
    deltaT: int = setting(10, "steps between rank updates", check="positive")
    beta1: float = setting(0.85, "EMA of sensitivity", check="non_negative")
    beta2: float = setting(0.85, "EMA of uncertainty", check="non_negative")
    orth_reg_weight: float = setting(0.1, "orthogonality regulariser weight", check="non_negative")


@dataclass
class EvaSettings:
    rho: float = setting(2.0, "EVA: the most rank one module may take, as a multiple of lora.r", check="positive")
    tau: float = setting(0.99, "EVA: cosine similarity at which a component counts as converged", check="non_negative")
    num_batches: int = setting(8, "EVA calibration batches", check="positive")
    batch_size: int = setting(16, "rows per EVA calibration batch", check="positive")
    whiten: bool = setting(False, "EVA: whiten the components")
    adjust_scaling_factors: bool = setting(True, "EVA: keep alpha/r constant when ranks move")
    max_passes: int = setting(20, "EVA: the most passes over its calibration batches. PEFT repeats them until every "
                              "layer's components agree with the previous pass, with no limit of its own; a layer "
                              "still moving at the cap keeps its current components and is counted in the run "
                              "record (eva_layers_capped). 20 is about twice the 9.1 passes EVA took to converge "
                              "on SST-2 with the cpu preset's 8 batches of 16 (all 36 layers), and ends the layers "
                              "that never settle, as in the smoke preset's 2 batches",
                              check="positive")


@dataclass
class RunSettings:
    """The settings of one run: ``sadra train``, one benchmark cell."""

    model: str = setting("minilm", "'minilm' (offline default), a local folder or a hub id")
    glue_dir: str | None = setting(None, "local GLUE folder (default: $SADRA_GLUE_DIR, else the hub)", optional=str)
    trust_remote_code: bool = setting(False, "run code shipped with a hub model (off unless asked)")
    max_length: int = setting(128, "token length of training and evaluation rows", check="positive")
    max_train_samples: int | None = setting(None, "seeded subset of the training rows (default: all)",
                                            check="positive", optional=int)
    min_train_words: int | None = setting(None, "train only on rows of at least this many words (both texts of a "
                                          "pair together), before the selection rows are held out, so those "
                                          "rows are filtered alike; the dev set never is. For SST-2, whose train "
                                          "file is mostly phrases and whose dev set is whole sentences (default: "
                                          "every row)", check="positive", optional=int)
    max_eval_samples: int | None = setting(None, "seeded subset of the evaluation rows (default: all)",
                                           check="positive", optional=int)
    data_seed: int = setting(0, "seed of the row subsets and of the selection split", check="non_negative")
    eval_split: str = setting("validation", "what the final metrics are computed on: validation (the GLUE dev set) "
                              "or selection (rows held out of the train file, for choosing settings)",
                              choices=("validation", "selection"))
    init: str = setting("default", "adapter initialisation of allocated methods: default (PEFT's LoRA init) or "
                        "gradient (LoRA-GA: the calibration gradient's top singular directions)", choices=INITS)
    cell_timeout: int | None = setting(None, "benchmark: seconds a cell may run before it is killed and recorded as "
                                       "failed (default: derived from the cell's rows, epochs and length)",
                                       check="positive", optional=int)
    probe_file: str | None = setting(None, "allocated methods: use this probe report instead of probing", optional=str)
    allocation_file: str | None = setting(None, "allocated methods: use this allocation as it is", optional=str)
    uniform_twin: str | None = setting(None, "allocated methods: the folder of a finished uniform-LoRA run with "
                                       "otherwise the same settings. When this run's allocation comes out as "
                                       "that very adapter (every module at lora.r, same alpha, PEFT's init), the "
                                       "run takes that run's results instead of training the same adapter again "
                                       "(the benchmark sets it)", optional=str)
    zero_shot_from: str | None = setting(None, "prompt tasks: the folder of a finished run of the same task, "
                                         "model and evaluation rows; this run takes its zero-shot metrics (the "
                                         "untrained model's, which do not depend on the method or seed) instead "
                                         "of scoring the evaluation rows again (the benchmark sets it)", optional=str)
    train: TrainSettings = group(TrainSettings, "training")
    lora: LoraSettings = group(LoraSettings, "uniform LoRA and the budget")
    probe: ProbeSettings = group(ProbeSettings, "the calibration probe")
    allocate: AllocateSettings = group(AllocateSettings, "rank allocation")
    adalora: AdaLoraSettings = group(AdaLoraSettings, "AdaLoRA")
    eva: EvaSettings = group(EvaSettings, "EVA")


def defaults() -> dict[str, Any]:
    """The run defaults as a nested dict (the shape of presets and config files)."""
    return asdict(RunSettings())


def walk(cls: type = RunSettings, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf field as ``(dotted path, dataclasses.Field)``."""
    for f in fields(cls):
        path = f"{prefix}{f.name}"
        default = f.default_factory() if f.default is MISSING else f.default
        if is_dataclass(default):
            yield from walk(type(default), path + ".")
        else:
            yield path, f


def spec(path: str):
    """The dataclasses.Field of a dotted path (KeyError if there is none)."""
    for p, f in walk():
        if p == path:
            return f
    raise KeyError(path)


def default_of(path: str) -> Any:
    node: Any = defaults()
    for part in path.split("."):
        node = node[part]
    return node


def help_of(path: str) -> str:
    f = spec(path)
    return f"{f.metadata['help']} (default: {default_of(path)!r})"

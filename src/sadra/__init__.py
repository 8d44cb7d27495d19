"""SADRA: sensitivity-aware rank allocation for LoRA.

Probe the loss curvature of each target module before training, allocate LoRA ranks under the
parameter budget of uniform LoRA, then fine-tune with Hugging Face PEFT.

    probe (curvature per module) -> allocate (ranks under a budget) -> adapt (PEFT) -> train

Attributes are imported lazily so that ``sadra.allocate`` (pure numpy) never imports torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "sadra.models",
    "auto_lora_config": "sadra.auto",
    "load_probe_model": "sadra.models",
    "find_targets": "sadra.models",
    "estimate_sensitivity": "sadra.probe",
    "SensitivityReport": "sadra.probe",
    "allocate_ranks": "sadra.allocate",
    "RankAllocation": "sadra.allocate",
    "load_glue": "sadra.data",
    "calibration_batches": "sadra.data",
    "glue_metrics": "sadra.metrics",
    "run_glue": "sadra.train",
    "run_benchmark": "sadra.benchmark",
    "SadraError": "sadra.errors",
    "ConfigError": "sadra.errors",
    "DataError": "sadra.errors",
    "ModelError": "sadra.errors",
    "BudgetError": "sadra.errors",
    "CurvatureError": "sadra.errors",
    "OutputError": "sadra.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sadra' has no attribute {name!r}")


def __dir__():
    return __all__

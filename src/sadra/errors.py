"""Exceptions for input a user can fix.

Every message is one line that names the problem and the fix. The CLI prints it as
``sadra: error: <message>`` and exits with status 2; the Python API raises the class.
"""


class SadraError(Exception):
    """Base class: bad input or state that the user can fix."""


class ConfigError(SadraError, ValueError):
    """An unknown, misspelt or ill-typed setting (CLI flag, preset, config file, key=value)."""


class DataError(SadraError, ValueError):
    """Missing, empty or malformed data: a GLUE folder, a TSV file, a text file, a JSON file."""


class ModelError(SadraError, ValueError):
    """A model that cannot be loaded, or target modules it does not have."""


class BudgetError(SadraError, ValueError):
    """Rank-allocation constraints that no allocation can satisfy."""


class CurvatureError(SadraError, ArithmeticError):
    """A non-finite loss or curvature estimate during probing or training."""


class OutputError(SadraError, OSError):
    """An output path that cannot be written."""

"""The one exception hierarchy of graphopt.

Every error a user can cause derives from :class:`GraphoptError` and carries the exit
code the CLI returns for it; its message names what was expected, what was found and
the fix. Anything else that escapes is a bug in graphopt.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""

    exit_code: int = 2


class ModelLoadError(GraphoptError):
    """The model file is missing, unreadable, not ONNX, truncated or unsafe."""


class ModelSaveError(GraphoptError):
    """The output cannot be written where asked, or would overwrite the input."""


class RecipeError(GraphoptError):
    """A recipe or a pass configuration is invalid."""


class DataError(GraphoptError):
    """Calibration or verification data is missing or does not fit the model."""


class DeviceError(GraphoptError):
    """The requested device is not available to ONNX Runtime."""


class PassError(GraphoptError):
    """A pass failed, or left the model invalid; the message names the pass."""

    exit_code = 3


class AccuracyBudgetError(GraphoptError):
    """The optimized model is outside the recipe's accuracy budget; carries the report."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report

"""One error hierarchy for everything a user can get wrong.

Every error a user sees derives from :class:`MLSQLError`. Messages name what was
wrong and where; :func:`did_you_mean` supplies the nearest existing name.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from device_bridge import errors as _device_errors  # light: no third-party imports


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (case-insensitive), or None."""
    cands = [c for c in candidates if c]
    lowered = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


class MLSQLError(Exception):
    """Base of every error MLSQL raises for a user mistake or a failed statement."""

    engine_error: str | None = None  # the engine's own error class, when the engine raised it

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        Exception.__init__(self, self.__str__())  # not super(): DeviceError also derives from device_bridge's

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"

    def with_context(self, where: str) -> MLSQLError:
        """Prefix the message with where it happened (e.g. the statement of a script)."""
        self.message = f"{where}: {self.message}"
        self.args = (str(self),)
        return self


class ParseError(MLSQLError):
    """Text that is not valid MLSQL; carries 1-based line and column."""

    def __init__(self, message: str, *, sql: str = "", line: int | None = None,
                 col: int | None = None, hint: str | None = None):
        self.sql, self.line, self.col = sql, line, col
        text = message
        if line is not None and col is not None:
            text = f"{message}. Line {line}, Col: {col}."
            snippet = caret_snippet(sql, line, col)
            if snippet:
                text = f"{text}\n{snippet}"
        super().__init__(text, hint=hint)


def caret_snippet(sql: str, line: int, col: int) -> str:
    """The offending line of ``sql`` with a caret under column ``col``."""
    lines = sql.splitlines()
    if not (1 <= line <= len(lines)):
        return ""
    src = lines[line - 1]
    return f"  {src}\n  {' ' * max(col - 1, 0)}^"


class UnknownNameError(MLSQLError):
    """A table, model, column, option, device or function that does not exist."""

    kind = "name"

    def __init__(self, name: str, candidates: Iterable[str] = (), *, where: str | None = None,
                 message: str | None = None):
        self.name = name
        self.candidates = list(candidates)
        self.suggestion = did_you_mean(name, self.candidates)
        msg = message or f"Unknown {self.kind} '{name}'" + (f" {where}" if where else "")
        if self.suggestion:
            hint = f"Did you mean '{self.suggestion}'?"
        elif 0 < len(self.candidates) <= 10:
            hint = f"Known {self.kind}s: {', '.join(sorted(map(str, self.candidates)))}."
        else:
            hint = None
        super().__init__(msg, hint=hint)


class UnknownTableError(UnknownNameError):
    kind = "table"


class UnknownModelError(UnknownNameError):
    kind = "model"


class UnknownColumnError(UnknownNameError):
    kind = "column"


class UnknownOptionError(UnknownNameError):
    kind = "option"


class UnknownDeviceError(UnknownNameError):
    kind = "device"


class UnknownJobError(UnknownNameError):
    kind = "job"


class JobError(MLSQLError):
    """A scheduled job could not be created, run or changed."""


class UnknownFunctionError(UnknownNameError):
    kind = "function"


class UnknownVariableError(UnknownNameError):
    kind = "variable"


class OptionError(MLSQLError):
    """An option with a value of the wrong type or out of range."""


class EngineError(MLSQLError):
    """The engine (DuckDB, Spark) refused a statement. ``engine_error`` names the engine's own
    error class (e.g. DuckDB's ``CatalogException``)."""

    def __init__(self, message: str, *, hint: str | None = None, engine_error: str | None = None):
        super().__init__(message, hint=hint)
        self.engine_error = engine_error


class TrainingError(MLSQLError):
    """Training could not proceed (no rows, constant label, bad label type...)."""


class InputTypeError(MLSQLError):
    """A column given to a model has another type than the model was trained on."""


class ModelError(MLSQLError):
    """A model cannot do what was asked (wrong input columns, wrong kind of model)."""


class WorkspaceError(MLSQLError):
    """The workspace cannot be used (locked by another process, unreadable)."""


class ExportError(MLSQLError):
    """A model or expression that cannot be exported to ONNX."""


class DeviceError(MLSQLError, _device_errors.DeviceError):
    """A device or hub refused or failed a request: the notebook side of device_bridge's one
    error hierarchy (``except device_bridge.errors.DeviceError`` catches it too). ``kind`` and
    ``status`` come from the device's answer; ``device_error`` is the typed original."""

    def __init__(self, message: str, *, hint: str | None = None, kind: str | None = None,
                 status: int | None = None, device_error: Exception | None = None):
        MLSQLError.__init__(self, message, hint=hint)
        self.status, self.url, self.kind = status, getattr(device_error, "url", None), kind
        self.device_error = device_error

    def __str__(self) -> str:
        return MLSQLError.__str__(self)

"""One error hierarchy for everything a user can get wrong.

Every error a user sees derives from :class:`MLSQLError`. Messages name what was
wrong and where; :func:`did_you_mean` supplies the nearest existing name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from device_bridge import errors as _device_errors  # light: no third-party imports


def did_you_mean(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (case-insensitive), or None."""
    cands = [c for c in candidates if c]
    lowered = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


@dataclass(frozen=True)
class Span:
    """Where an error is in the SQL the user wrote: 1-based lines and columns, the end exclusive."""

    line: int
    column: int
    end_line: int
    end_column: int

    def shifted(self, lines: int) -> Span:
        return Span(self.line + lines, self.column, self.end_line + lines, self.end_column)


class MLSQLError(Exception):
    """Base of every error MLSQL raises for a user mistake or a failed statement.

    ``line``, ``column``, ``end_line``, ``end_column`` (1-based, relative to the script the user
    wrote) are set when the error knows where it is: the session sets them from the statement's
    tree (:mod:`mlsql.language.positions`) for the errors that only know a name (an unknown model,
    option, column...), and ``source``, the script, from which the message shows the line with a
    caret. ``line_offset``: lines above the script where the user reads it (the ``%%mlsql`` line
    of a notebook cell), added to every line number the message and :meth:`span` give. ``also``:
    more errors of the same statement, reported with this one (every bad option, not the first)."""

    engine_error: str | None = None  # the engine's own error class, when the engine raised it
    line: int | None = None
    column: int | None = None
    end_line: int | None = None
    end_column: int | None = None
    statement_line: int | None = None  # the line of the script where the failing statement starts
    source: str | None = None
    line_offset: int = 0
    also: tuple[MLSQLError, ...] = ()
    summary: str | None = None  # the first line when ``also`` is not empty ("2 problems in ...")

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        self._contexts: list[tuple[str, int | None]] = []
        Exception.__init__(self, self.__str__())  # not super(): DeviceError also derives from device_bridge's

    def __str__(self) -> str:
        off = self.line_offset
        if self.also:
            text = "\n".join([self.summary or f"{1 + len(self.also)} problems"]
                             + [e._block(off) for e in (self, *self.also)])
        else:
            text = self._block(off)
        for where, line in getattr(self, "_contexts", ()):
            text = f"{where}{f' (line {line + off})' if line is not None else ''}: {text}"
        return text

    def _block(self, off: int) -> str:
        """The message, where it is (line, column, and the line with a caret) and the hint."""
        text = self.message
        if _ENGINE_LINE.search(text):  # the engine's own "LINE n:" and caret: renumbered, not repeated
            if off:
                text = _ENGINE_LINE_NO.sub(lambda m: f"LINE {int(m.group(1)) + off}:", text)
        elif self.line is not None and self.column is not None:
            # sqlglot's way: the first line ends with the position, the line with a caret follows
            head, _, rest = text.rstrip().partition("\n")
            head += f"{' ' if head[-1:] in ('.', '!', '?') else '. '}Line {self.line + off}, Col: {self.column}."
            snippet = caret_snippet(self.source or "", self.line, self.column)
            text = "\n".join(part for part in (head, snippet, rest) if part)
        return text if not self.hint else f"{text}\n{self.hint}"

    def _changed(self) -> None:
        self.args = (str(self),)

    def with_context(self, where: str, *, line: int | None = None) -> MLSQLError:
        """Prefix the message with where it happened (e.g. ``Statement 2`` of a script); ``line``:
        the script line where that statement starts, shown after ``where`` as ``(line L)``."""
        self._contexts.append((where, line))
        if line is not None and self.statement_line is None:
            self.statement_line = line
        self._changed()
        return self

    def set_span(self, line: int, column: int, end_line: int | None = None, end_column: int | None = None,
                 *, source: str | None = None) -> None:
        self.line, self.column = line, column
        self.end_line = end_line if end_line is not None else line
        self.end_column = end_column if end_column is not None else column + 1
        if source is not None:
            self.source = source
        self._changed()

    def shift_lines(self, lines: int) -> None:
        """Number every line as the user reads it: ``lines`` lines above the script (a cell's
        ``%%mlsql`` line). The message and :meth:`span` follow."""
        for e in (self, *self.also):
            e.line_offset = lines
        self._changed()

    def add(self, others: list[MLSQLError], summary: str | None = None) -> MLSQLError:
        """Report ``others`` (errors of the same statement) with this one."""
        self.also = (*self.also, *others)
        self.summary = summary or self.summary
        self._changed()
        return self

    def span(self, sql: str | None = None) -> Span | None:
        """Where the error is, lines as the user reads them (``line_offset`` added): the error's own
        position, else the caret of the engine's message, else the first whole-word occurrence in
        ``sql`` (the script that ran) of the name the error is about, at or after its statement's
        line."""
        found = self._script_span(sql)
        return found.shifted(self.line_offset) if found is not None and self.line_offset else found

    def _script_span(self, sql: str | None) -> Span | None:
        if self.line is not None and self.column is not None:
            return Span(self.line, self.column, self.end_line or self.line, self.end_column or self.column + 1)
        from_engine = engine_span(self.message)
        if from_engine is not None:
            return _align(from_engine, self.message, sql)
        name = getattr(self, "name", None)
        if not sql or not isinstance(name, str) or not name:
            return None
        first = self.statement_line or 1
        offset = 0
        for _ in range(first - 1):
            nl = sql.find("\n", offset)
            if nl < 0:
                return None
            offset = nl + 1
        m = re.compile(r"(?<![\w$])" + re.escape(name) + r"(?!\w)", re.IGNORECASE).search(sql, offset)
        if m is None:
            return None
        line, col = line_col(sql, m.start())
        end_line, end_col = line_col(sql, m.end())
        return Span(line, col, end_line, end_col)


def line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of a character offset in ``text``."""
    offset = max(0, min(offset, len(text)))
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def span_of(text: str, start: int, end: int) -> Span:
    """The span of characters ``start`` to ``end`` (exclusive) of ``text``."""
    line, col = line_col(text, start)
    end_line, end_col = line_col(text, max(end, start + 1))
    return Span(line, col, end_line, end_col)


class ParseError(MLSQLError):
    """Text that is not valid MLSQL; carries 1-based line and column."""

    def __init__(self, message: str, *, sql: str = "", line: int | None = None,
                 col: int | None = None, hint: str | None = None):
        self.sql = sql
        super().__init__(message, hint=hint)
        if line is not None and col is not None:
            self.set_span(line, col, line, col + _token_length(sql, line, col), source=sql)

    @property
    def col(self) -> int | None:
        return self.column


def _token_length(sql: str, line: int, col: int) -> int:
    """Length of the word (or one character) at a 1-based line and column of ``sql``."""
    lines = sql.splitlines()
    if not (1 <= line <= len(lines)):
        return 1
    m = re.match(r"[\w$]+", lines[line - 1][col - 1:])
    return len(m.group(0)) if m else 1


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
                 message: str | None = None, hint: str | None = None):
        self.name = name
        self.candidates = list(candidates)
        self.suggestion = did_you_mean(name, self.candidates)
        msg = message or f"Unknown {self.kind} '{name}'" + (f" {where}" if where else "")
        if hint is None and self.suggestion:
            hint = f"Did you mean '{self.suggestion}'?"
        elif hint is None and 0 < len(self.candidates) <= 10:
            hint = f"Known {self.kind}s: {', '.join(sorted(map(str, self.candidates)))}."
        super().__init__(msg, hint=hint)


class UnknownTableError(UnknownNameError):
    kind = "table"


class UnknownModelError(UnknownNameError):
    kind = "model"


class UnknownColumnError(UnknownNameError):
    kind = "column"
    function: str | None = None  # the ML function whose input lacks the column ('PREDICT'), if any
    missing: list[str] | None = None  # every column that input lacks, this one first


class UnknownOptionError(UnknownNameError):
    kind = "option"
    statement_kind: str | None = None  # whose OPTIONS or STRUCT settings ('CREATE MODEL', 'ML.PREDICT')


class UnknownDeviceError(UnknownNameError):
    kind = "device"


class UnknownJobError(UnknownNameError):
    kind = "job"


class JobError(MLSQLError):
    """A scheduled job could not be created, run or changed."""


class UnknownAlertError(UnknownNameError):
    kind = "alert"


class AlertError(MLSQLError):
    """An alert could not be created, checked or changed."""


class UnknownFeatureViewError(UnknownNameError):
    kind = "feature view"


class FeatureViewError(MLSQLError):
    """A feature view that cannot be defined (a construct a device cannot compute incrementally, a
    window longer than the view's ttl, ...) or used. ``at``: the character offsets (start, end
    exclusive) in the script of the construct named, when known (mlsql.language.positions)."""

    def __init__(self, message: str, *, hint: str | None = None, at: tuple[int, int] | None = None):
        super().__init__(message, hint=hint)
        self.at = at


class UnknownFunctionError(UnknownNameError):
    kind = "function"


class UnknownVariableError(UnknownNameError):
    kind = "variable"


class OptionError(MLSQLError):
    """An option with a value of the wrong type or out of range. ``option``: its name, when the
    error is about one option's value; ``statement_kind``: whose OPTIONS ('CREATE MODEL',
    'ML.PREDICT'); ``at_name``: the error is about the option's name, not its value."""

    option: str | None = None
    statement_kind: str | None = None
    at_name: bool = False


class EngineError(MLSQLError):
    """The engine (DuckDB, Spark) refused a statement. ``engine_error`` names the engine's own
    error class (e.g. DuckDB's ``CatalogException``)."""

    def __init__(self, message: str, *, hint: str | None = None, engine_error: str | None = None):
        super().__init__(message, hint=hint)
        self.engine_error = engine_error


# DuckDB's errors end with the script line and a caret under the column: "LINE 3: SELECT a FRM t\n   ^"
_ENGINE_LINE = re.compile(r"^LINE (\d+): (.*)\n( *)\^", re.M)
_ENGINE_LINE_NO = re.compile(r"^LINE (\d+):", re.M)


def _align(span: Span, message: str, sql: str | None) -> Span:
    """DuckDB counts columns from the statement's start: a statement that starts inside a line
    (``SELECT 1; SELECT zz``) is found in the script's line and its columns shifted."""
    m = _ENGINE_LINE.search(message)
    lines = sql.split("\n") if sql else []
    if m is None or not m.group(2).strip() or not 1 <= span.line <= len(lines):
        return span
    at = lines[span.line - 1].find(m.group(2))
    if at <= 0:
        return span
    return Span(span.line, span.column + at, span.end_line, span.end_column + at)


def without_engine_position(message: str) -> str:
    """The engine's message without its "LINE n:" line and caret: for a statement the engine ran
    as MLSQL rendered it, they point into that rendering, not into what the user wrote."""
    return _ENGINE_LINE.sub("", message).rstrip()


def engine_span(message: str) -> Span | None:
    """The position DuckDB's message points at (its "LINE n:" line and the caret under it)."""
    m = _ENGINE_LINE.search(message)
    if m is None:
        return None
    head = len(f"LINE {m.group(1)}: ")
    col = len(m.group(3)) - head + 1
    if col < 1:
        return None
    word = re.match(r"[\w$]+", m.group(2)[col - 1:])
    line = int(m.group(1))
    return Span(line, col, line, col + (len(word.group(0)) if word else 1))


class TrainingError(MLSQLError):
    """Training could not proceed (no rows, constant label, bad label type...)."""


class InputTypeError(MLSQLError):
    """A column given to a model has another type than the model was trained on."""


class ModelError(MLSQLError):
    """A model cannot do what was asked (wrong input columns, wrong kind of model)."""


class ModelImportError(ModelError):
    """A model file given to CREATE MODEL ... OPTIONS (model_path = ...) cannot be imported: missing,
    corrupt, an operator the runtime lacks, inputs no column feeds. The message names the file."""


class WorkspaceError(MLSQLError):
    """The workspace cannot be used (locked by another process, unreadable)."""


class ExportError(MLSQLError):
    """A model or expression that cannot be exported to ONNX. ``report``: the parity report when
    the export was refused by its parity or quantization check (``report.passed`` is False), else
    None (the graph could not be built or run at all)."""

    report = None


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

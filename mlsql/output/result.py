"""What a statement returns: an Arrow table, a message, and how long it took."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlsql._lazy import pyarrow as pa  # imported by the first statement, not by connect()


@dataclass
class Result:
    """The outcome of one statement. Rows stay in Arrow until asked for."""

    table: pa.Table
    message: str | None = None
    elapsed: float = 0.0
    statement: str = ""
    kind: str = "query"
    truncated: bool = False
    log: list[str] = field(default_factory=list)
    display_limit: int = 10
    extras: dict[str, Any] = field(default_factory=dict)
    # the engine's own conversions (DuckDB's fetchall() and df()), for plain SQL results
    python_rows: Callable[[pa.Table], list[tuple]] | None = None
    pandas_frame: Callable[[pa.Table], Any] | None = None
    # charts of the result (mlsql.output.plots panels: ROC curve, confusion matrix, bars, loss curve), drawn
    # below the table when shown in IPython and ``show_plots`` (the magic's --plot / MLSQLMagic.plots)
    plots: list = field(default_factory=list)
    show_plots: bool = True
    # a browsable table widget for results longer than the display limit (set by the magic in a kernel)
    interactive: bool = False
    # what EXPORT MODEL and DEPLOY ... TO GROUP made, beside their report tables
    export: Any = None
    rollout: Any = None

    # -- data out ------------------------------------------------------------
    def to_arrow(self) -> pa.Table:
        return self.table

    def to_pandas(self):
        if self.pandas_frame is not None:
            return self.pandas_frame(self.table)
        return self.table.to_pandas()

    def to_polars(self):
        import polars

        return polars.from_arrow(self.table)

    def fetchall(self) -> list[tuple]:
        return self._rows(self.table)

    def fetchone(self) -> tuple | None:
        rows = self.table.slice(0, 1)
        return self._rows(rows)[0] if rows.num_rows else None

    def scalar(self):
        row = self.fetchone()
        return row[0] if row else None

    @property
    def columns(self) -> list[str]:
        return self.table.column_names

    def __len__(self) -> int:
        return self.table.num_rows

    def _rows(self, t: pa.Table) -> list[tuple]:
        if self.python_rows is not None:
            return self.python_rows(t)
        cols = [c.to_pylist() for c in t.columns]
        return list(zip(*cols))

    # -- display -------------------------------------------------------------
    def footer(self, shown: bool = True) -> str:
        """'N rows × M columns[, showing 1–k] · time' (``shown``: say which rows a static table shows)."""
        n = self.table.num_rows
        rows = f"{n:,} row{'s' if n != 1 else ''}"
        if self.truncated:
            rows += " (autolimit reached)"
        rows += f" × {self.table.num_columns} columns"
        k = self._shown_rows()
        if shown and k < n:
            rows += f", showing 1–{k:,}"
        return f"{rows} · {_fmt_time(self.elapsed)}"

    def _shown_rows(self) -> int:
        n = self.table.num_rows
        if self.kind in WHOLE_KINDS or not self.display_limit or self.display_limit <= 0:
            return n  # reports and descriptions are read whole
        return min(n, self.display_limit)

    def _preview(self) -> tuple[list[str], list[list[str]], bool]:
        shown = self._shown_rows()
        return self.table.column_names, format_rows(self.table.slice(0, shown)), self.table.num_rows > shown

    def _messages_html(self) -> list[str]:
        parts = [f"<div class='mlsql-log'>{html.escape(m)}</div>" for m in self.log]
        if self.message:
            parts.append(f"<div class='mlsql-message'>{html.escape(self.message)}</div>")
        return parts

    def _repr_html_(self) -> str:
        parts = self._messages_html()
        if self.table.num_columns:
            cols, rows, more = self._preview()
            parts.append(html_table(cols, rows, numeric_columns(self.table), more))
        parts.append(f"<div class='mlsql-footer' style='color:#777;font-size:85%'>{self.footer()}</div>")
        return "\n".join(parts)

    def pager(self, page_size: int | None = None):
        """A table widget that holds this result in the kernel and sends the browser one page at a
        time, sorted on request (:class:`mlsql.output.pager.TablePager`)."""
        from mlsql.output.pager import TablePager

        return TablePager(self.table, page_size=page_size or self.display_limit or 10)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        bundle = {"text/plain": repr(self), "text/html": self._repr_html_()}
        if self.interactive and self.table.num_rows > self._shown_rows():
            try:
                widget = self.pager()
            except ImportError:  # no anywidget: the static table is all there is
                return bundle
            view = widget._repr_mimebundle_()
            if isinstance(view, tuple):
                view = view[0]
            if "application/vnd.jupyter.widget-view+json" in view:
                widget.set_messages(self._messages_html(), self.footer(shown=False))
                bundle["application/vnd.jupyter.widget-view+json"] = view[
                    "application/vnd.jupyter.widget-view+json"]
        return bundle

    def _ipython_display_(self) -> None:
        """The table (a browsable widget where it helps), then the charts of the result."""
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)
        if self.plots and self.show_plots:
            from mlsql.output import plots

            display(plots.bundle(self.plots), raw=True)

    def __repr__(self) -> str:
        out = list(self.log)
        if self.message:
            out.append(self.message)
        if self.table.num_columns:
            cols, rows, more = self._preview()
            out.append(format_table(cols, rows, more))
        out.append(self.footer())
        return "\n".join(out)

    __str__ = __repr__


# results read whole whatever the display limit: parity reports, model and job descriptions, plans
WHOLE_KINDS = frozenset({"export", "describe", "explain", "deploy", "rollout"})
CELL_CHARS = 40  # widest cell in text tables


def format_table(cols: list[str], rows: list, more: bool = False) -> str:
    """A plain-text table, for the CLI and for terminals. ``rows``: formatted cells (or values)."""
    cells = [[v if isinstance(v, str) else _fmt_cell(v) for v in r] for r in rows]
    cells = [[" ".join(v.split()) for v in r] for r in cells]  # one line per row
    widths = [len(str(c)) for c in cols]
    for r in cells:
        widths = [max(w, min(len(v), CELL_CHARS)) for w, v in zip(widths, r)]

    def clip(v: str, w: int) -> str:
        return v if len(v) <= CELL_CHARS else v[:CELL_CHARS - 1] + "…"

    def line(vals):
        return " | ".join(clip(str(v), w).ljust(w) for v, w in zip(vals, widths))

    out = [line(cols), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells]
    if more:
        out.append("…")
    return "\n".join(out)


def numeric_columns(table: pa.Table) -> list[bool]:
    return [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
            for t in table.schema.types]


def format_rows(table: pa.Table) -> list[list[str]]:
    """Every cell of a (small: one page) table as display text, one formatter per column type."""
    cols = [format_column(c) for c in table.columns]
    return [list(r) for r in zip(*cols)] if cols else []


def format_column(col) -> list[str]:
    """Display text of one column: integers as they are, floats to 6 significant digits without
    exponents between 1e-5 and 1e15 (so 1546283.7, 1632661.0 and 857076 read 1546284, 1632661
    and 857076), JSON text pretty-printed, NULL as NULL."""
    t = col.type
    if pa.types.is_floating(t):
        return [format_number(v) for v in col.to_pylist()]
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return [_fmt_text(v) for v in col.to_pylist()]
    return [_fmt_cell(v) for v in col.to_pylist()]


def format_number(v) -> str:
    """One number as a table shows it (see ``format_column``)."""
    if v is None:
        return "NULL"
    if isinstance(v, bool) or not isinstance(v, float):
        return _fmt_cell(v)
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    a = abs(v)
    if v.is_integer() and a < 1e15:
        return str(int(v))
    if a >= 1e15 or a < 1e-5:
        return f"{v:.6g}"
    import math

    decimals = min(max(6 - math.floor(math.log10(a)) - 1, 0), 10)
    out = f"{v:.{decimals}f}"
    return out.rstrip("0").rstrip(".") if "." in out else out


def _fmt_text(v) -> str:
    """Strings as they are; JSON objects and arrays pretty-printed (a table wraps and bounds them)."""
    if v is None:
        return "NULL"
    s = v.strip()
    if len(s) > 1 and s[0] in "{[" and s[-1] in "}]":
        import json

        try:
            return json.dumps(json.loads(s), indent=1, ensure_ascii=False)
        except ValueError:
            return v
    return v


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return format_number(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt_cell(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_cell(x) for x in v) + "]"
    return str(v)


_CELL_STYLE = ("max-height:9em;max-width:42em;overflow:auto;white-space:pre-wrap;"
               "word-break:break-word;text-align:left")


def html_cell(text: str, numeric: bool) -> str:
    """One cell: numbers right-aligned; long or multi-line text wrapped in a bounded, scrolling box
    (a JSON column makes a row a few lines tall, not 800 px)."""
    esc = html.escape(text)
    if numeric:
        return f"<td style='text-align:right'>{esc}</td>"
    if "\n" in text or len(text) > 60:
        mono = "font-family:monospace;font-size:90%;" if text[:1] in "{[" else ""
        return f"<td style='text-align:left'><div style='{mono}{_CELL_STYLE}'>{esc}</div></td>"
    return f"<td style='text-align:left'>{esc}</td>"


def html_table(cols: list[str], rows: list[list[str]], numeric: list[bool], more: bool = False) -> str:
    head = "".join(f"<th style='text-align:{'right' if n else 'left'}'>{html.escape(str(c))}</th>"
                   for c, n in zip(cols, numeric))
    body = "".join("<tr>" + "".join(html_cell(v, n) for v, n in zip(r, numeric)) + "</tr>" for r in rows)
    if more:
        body += f"<tr><td colspan='{len(cols)}'>…</td></tr>"
    return f"<table class='mlsql-result'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt_time(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"

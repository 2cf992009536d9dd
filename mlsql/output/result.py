"""What a statement returns: an Arrow table, a message, and how long it took."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlsql._lazy import pyarrow as pa  # imported by the first statement, not by connect()
from mlsql.output.formats import (
    format_rows,
    format_table,
    html_table,
    numeric_columns,
)


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
def _fmt_time(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"

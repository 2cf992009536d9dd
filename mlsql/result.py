"""What a statement returns: an Arrow table, a message, and how long it took."""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._lazy import pyarrow as pa  # imported by the first statement, not by connect()


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
    def footer(self) -> str:
        n = self.table.num_rows
        rows = f"{n:,} row{'s' if n != 1 else ''}"
        if self.truncated:
            rows += " (autolimit reached)"
        return f"{rows} × {self.table.num_columns} columns · {_fmt_time(self.elapsed)}"

    def _preview(self) -> tuple[list[str], list[tuple], bool]:
        limit = self.display_limit if self.display_limit and self.display_limit > 0 else self.table.num_rows
        head = self.table.slice(0, limit)
        return self.table.column_names, self._rows(head), self.table.num_rows > limit

    def _repr_html_(self) -> str:
        parts = [f"<div class='mlsql-log'>{html.escape(m)}</div>" for m in self.log]
        if self.message:
            parts.append(f"<div class='mlsql-message'>{html.escape(self.message)}</div>")
        if self.table.num_columns:
            cols, rows, more = self._preview()
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(_fmt_cell(v))}</td>" for v in r) + "</tr>"
                for r in rows
            )
            if more:
                body += f"<tr><td colspan='{len(cols)}'>…</td></tr>"
            parts.append(
                f"<table class='mlsql-result'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            )
        parts.append(f"<div class='mlsql-footer' style='color:#777;font-size:85%'>{self.footer()}</div>")
        return "\n".join(parts)

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


def format_table(cols: list[str], rows: list[tuple], more: bool = False) -> str:
    """A plain-text table, for the CLI and for terminals."""
    cells = [[_fmt_cell(v) for v in r] for r in rows]
    widths = [len(str(c)) for c in cols]
    for r in cells:
        widths = [max(w, min(len(v), 40)) for w, v in zip(widths, r)]

    def line(vals):
        return " | ".join(str(v)[:40].ljust(w) for v, w in zip(vals, widths))

    out = [line(cols), "-+-".join("-" * w for w in widths)] + [line(r) for r in cells]
    if more:
        out.append("…")
    return "\n".join(out)


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        if v.is_integer() and abs(v) < 1e15:
            return f"{v:.1f}"
        return f"{v:.6g}"
    if isinstance(v, list) and v and isinstance(v[0], dict):
        return "[" + ", ".join("{" + ", ".join(f"{k}: {_fmt_cell(x)}" for k, x in d.items()) + "}" for d in v) + "]"
    return str(v)


def _fmt_time(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"

"""One number format per column, and text and HTML tables of formatted cells: what a result, its
pager and its charts' summaries all print, so that the same value reads the same everywhere."""

from __future__ import annotations

import html
from typing import Any

from mlsql._lazy import pyarrow as pa

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

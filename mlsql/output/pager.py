"""A browsable table: the kernel holds the Arrow table, the browser gets one page at a time.

An anywidget: state as traits (the page, the sort, the formatted rows of that page). The
browser asks for a page, page size or sort (``request``); the kernel sets ``page``,
``page_size``, ``sort_by`` and ``descending`` and answers with the rows of that page, sorted with ``pyarrow.compute.sort_indices`` (computed once per sort).
Only ``page_size`` rows ever cross to the browser. Where widgets cannot render (nbconvert,
exported HTML, a notebook reopened without its kernel) the static table of the first rows beside
it in the same display bundle is what shows.
"""

from __future__ import annotations

from pathlib import Path

import anywidget
import traitlets as T

from mlsql._lazy import pyarrow as pa
from mlsql.output.formats import format_rows, numeric_columns

_STATIC = Path(__file__).parent.parent / "static"
MAX_PAGE_SIZE = 500


class TablePager(anywidget.AnyWidget):
    """Pages and sorts a result in the kernel; see the module docstring."""

    _esm = _STATIC / "table.js"
    _css = _STATIC / "table.css"

    columns = T.List(T.Unicode()).tag(sync=True)
    numeric = T.List(T.Bool()).tag(sync=True)
    sortable = T.List(T.Bool()).tag(sync=True)
    rows = T.List(T.List(T.Unicode())).tag(sync=True)  # the formatted cells of the current page
    total = T.Int(0).tag(sync=True)
    page = T.Int(0).tag(sync=True)  # 0-based
    page_size = T.Int(10).tag(sync=True)
    sort_by = T.Unicode("").tag(sync=True)  # "" = the result's own order
    descending = T.Bool(False).tag(sync=True)
    messages = T.List(T.Unicode()).tag(sync=True)  # the result's log and message, as HTML
    footer = T.Unicode("").tag(sync=True)
    # what the browser asks for ({page, page_size, sort_by, descending}): it never sets the state
    # traits itself, so a click made before the previous answer arrived cannot be undone by it
    request = T.Dict().tag(sync=True)

    def __init__(self, table: pa.Table, page_size: int = 10, **kwargs):
        self._table = table
        self._order = None  # indices of the current sort
        super().__init__(
            columns=list(table.column_names), numeric=numeric_columns(table),
            sortable=[_sortable(t) for t in table.schema.types], total=table.num_rows,
            page_size=max(1, min(int(page_size), MAX_PAGE_SIZE)), **kwargs)
        self._render_page()

    def set_messages(self, messages: list[str], footer: str) -> None:
        with self.hold_sync():
            self.messages = list(messages)
            self.footer = footer

    @T.observe("request")
    def _on_request(self, change):
        r = change["new"] or {}
        with self.hold_sync():
            if "page_size" in r:
                self.page_size = int(r["page_size"])
            if "sort_by" in r:
                self.sort_by = str(r["sort_by"] or "")
            if "descending" in r:
                self.descending = bool(r["descending"])
            if "page" in r:  # last: a new sort starts at page 0 unless the request says otherwise
                self.page = int(r["page"])

    @T.validate("page")
    def _valid_page(self, proposal):
        return min(max(int(proposal["value"]), 0), max(self.pages - 1, 0))

    @T.validate("page_size")
    def _valid_page_size(self, proposal):
        return max(1, min(int(proposal["value"]), MAX_PAGE_SIZE))

    @T.validate("sort_by")
    def _valid_sort(self, proposal):
        name = proposal["value"]
        if name and (name not in self._table.column_names
                     or not _sortable(self._table.schema.field(name).type)):
            return ""  # a list or struct column has no order: keep the result's
        return name

    @T.observe("sort_by", "descending")
    def _resort(self, change):
        self._order = None
        if self.page:
            self.page = 0  # observed below: renders once
        else:
            self._render_page()

    @T.observe("page", "page_size")
    def _repage(self, change):
        self._render_page()

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.page_size))

    def page_table(self) -> pa.Table:
        """The Arrow rows of the current page, in the current order."""
        start = self.page * self.page_size
        stop = min(start + self.page_size, self.total)
        if not self.sort_by:
            return self._table.slice(start, max(stop - start, 0))
        if self._order is None:
            import pyarrow.compute as pc

            self._order = pc.sort_indices(
                self._table, sort_keys=[(self.sort_by, "descending" if self.descending else "ascending", "at_end")])
        return self._table.take(self._order.slice(start, max(stop - start, 0)))

    def _render_page(self) -> None:
        self.rows = format_rows(self.page_table())


def _sortable(t) -> bool:
    return not (pa.types.is_nested(t) or pa.types.is_dictionary(t) and pa.types.is_nested(t.value_type))

"""``%mlsql`` and ``%%mlsql``: a thin notebook layer over :class:`mlsql.runtime.session.Session`.

Options are traitlets (``%config MLSQLMagic.displaylimit = 50``). User errors
are raised as ``UsageError``: the user ran SQL, so they see the message with its
position and hint, not a Python traceback.
"""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, needs_local_scope
from traitlets import Bool, Dict, Int, Unicode, default

from mlsql.notebook.cell import USAGE, parse_magic_options


@magics_class
class MLSQLMagic(Magics):
    """Runs MLSQL statements from notebook cells."""

    autolimit = Int(0, help="Fetch at most this many rows of a query's result (0: no limit).").tag(config=True)
    displaylimit = Int(10, help="Show at most this many rows of a result (0: all).").tag(config=True)
    engine = Unicode("duckdb", help="Engine for new sessions: 'duckdb' or 'spark'.").tag(config=True)
    engine_options = Dict(help="Keyword arguments for opening an engine, by engine name "
                               "(e.g. {'spark': {'master': 'local[4]', 'conf': {...}}}).").tag(config=True)
    workspace = Unicode(
        None, allow_none=True, help="Workspace folder (default: MLSQL_HOME or ./.mlsql)."
    ).tag(config=True)
    progress = Bool(True, help="Show a progress bar while a model trains.").tag(config=True)
    pager = Bool(True, help="Show results longer than displaylimit as a table widget that pages and sorts "
                            "in the kernel (False: a static table of the first rows).").tag(config=True)
    plots = Bool(help="Draw charts with results (ROC curve, confusion matrix, importance bars, loss "
                      "curves, a live loss curve while training); default: on in a notebook's kernel.",
                 ).tag(config=True)

    @default("plots")
    def _plots_default(self):
        from mlsql.notebook.progress import in_kernel

        return in_kernel()

    # lines of the cell above its SQL (the %%mlsql line); the MLSQL kernel, whose cells are all SQL, sets 0
    cell_line_offset = 1

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._sessions: dict = {}
        if shell is not None and hasattr(shell, "configurables"):
            shell.configurables.append(self)
        if shell is not None:
            from mlsql.notebook.completion import install_ipython_hooks

            install_ipython_hooks(shell, self)  # Tab and Shift-Tab in %%mlsql cells

    def session(self, workspace: str | None = None, engine: str | None = None):
        """The session for a workspace and engine, opened on first use."""
        from mlsql.runtime.session import Session

        key = (workspace or self.workspace, engine or self.engine)
        if key not in self._sessions:
            s = Session(key[0], key[1], namespace=self.shell.user_ns if self.shell else None,
                        **self.engine_options.get(str(key[1]).lower(), {}))
            self._sessions[key] = s
        return self._sessions[key]

    @needs_local_scope
    @line_cell_magic
    def mlsql(self, line: str, cell: str | None = None, local_ns=None):
        from mlsql.errors import MLSQLError

        opts, rest = parse_magic_options(line)
        sql = cell if cell is not None else rest
        if cell is not None and rest.strip():
            raise UsageError(f"Unexpected text after the options: {rest.strip()!r}\n\n{USAGE}")
        if not sql.strip():
            raise UsageError(USAGE)
        ns = dict(self.shell.user_ns) if self.shell else {}
        ns.update(local_ns or {})
        try:
            session = self.session(opts.get("workspace"), opts.get("engine"))
            session.display_limit = self.displaylimit
            plots = self.plots if opts.get("plot") is None else opts["plot"]
            session.progress = _progress_factory(plots) if (self.progress and not opts.get("no_progress")) else None
            session.on_wait = notice = _WaitNotice()
            sql, params = bind_python_variables(sql, ns, line_offset=self.cell_line_offset if cell is not None else 0)
            limit = opts.get("limit") or self.autolimit or None
            try:
                result = session.sql(sql, params, autolimit=limit)
            finally:
                notice.done()
        except MLSQLError as exc:
            if cell is not None:  # every line number as the editor shows the cell: the %%mlsql line counts
                exc.shift_lines(self.cell_line_offset)
                for e in (exc, *exc.also):
                    if e.source == sql:
                        e.source = cell  # the caret under the cell's own text ({name}, not $name)
                publish_error_span(exc, cell)
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            # a statement stops where it was: nothing half-done is registered (a model is
            # registered only after training ends), earlier statements of the cell stay done
            raise UsageError("Interrupted. The statement that was running was stopped and left nothing "
                             "behind (no half-trained model is registered); statements before it in the "
                             "cell took effect.") from None
        if opts.get("out"):
            self.shell.user_ns[opts["out"]] = result.to_pandas()
        result.show_plots = plots
        result.interactive = self.pager and _widgets_here()
        return result


def bind_python_variables(sql: str, namespace: dict, *, line_offset: int = 0) -> tuple[str, dict]:
    """Turn ``{name}`` into the query parameter ``$name`` bound to the notebook's value.

    Values never enter the SQL text. Braces inside strings and DuckDB struct
    literals (``{'a': 1}``) are left alone; an unknown ``{name}`` is a UsageError naming it and
    its line (``line_offset``: lines of the cell above ``sql``, its ``%%mlsql`` line).
    """
    if "{" not in sql:
        return sql, {}
    from sqlglot.dialects.duckdb import DuckDB
    from sqlglot.tokens import TokenType

    toks = DuckDB().tokenize(sql)
    params: dict = {}
    edits = []
    for i in range(len(toks) - 2):
        a, b, c = toks[i], toks[i + 1], toks[i + 2]
        if (a.token_type == TokenType.L_BRACE and c.token_type == TokenType.R_BRACE
                and b.start == a.end + 1 and c.start == b.end + 1 and b.text.isidentifier()
                and not (i > 0 and toks[i - 1].end + 1 == a.start and toks[i - 1].text == "$")):
            if b.text not in namespace:
                import difflib

                near = difflib.get_close_matches(b.text, [k for k in namespace if not k.startswith("_")], n=1)
                line = sql.count("\n", 0, a.start) + 1 + line_offset
                raise UsageError(f"{{{b.text}}} at line {line}: no notebook variable named '{b.text}'"
                                 + (f". Did you mean {{{near[0]}}}?" if near else
                                    ". Set it in a Python cell first, e.g. " + b.text + " = ..."))
            params[b.text] = namespace[b.text]
            # as long as what it replaces (a trailing space): an error's column stays the cell's
            edits.append((a.start, c.end + 1, f"${b.text} "))
    for start, end, text in reversed(edits):
        sql = sql[:start] + text + sql[end:]
    return sql, params


MLSQLMagic.mlsql.__doc__ = "Run MLSQL statements.\n\n" + USAGE


class _WaitNotice:
    """One line in the cell's output, updated in place, while the cell waits for the workspace."""

    def __init__(self):
        self.handle = None
        self.waited = 0.0
        self.message = ""

    def __call__(self, message: str, waited_s: float) -> None:
        from IPython.display import display

        text = f"{message} (waited {waited_s:.0f} s)"
        self.waited, self.message = waited_s, message
        if self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)

    def done(self) -> None:
        if self.handle is not None:
            # what it waited for: the workspace (another process held it), or Spark's start
            m, secs = self.message, f"{self.waited:.0f} s"
            text = f"Waited {secs} for {m[len('Waiting for '):]}." if m.startswith("Waiting for ") else f"{m}: {secs}."
            self.handle.update({"text/plain": text}, raw=True)


def _progress_factory(live_plot: bool):
    """The training display: a bar (a widget in a kernel, text elsewhere), with a live loss curve."""
    from mlsql.notebook.progress import TrainingProgress

    def make(title: str, total: int):
        return TrainingProgress(title, total, live_plot=live_plot)

    return make


def _widgets_here() -> bool:
    """Whether results may be browsable widgets: in a kernel, with anywidget installed."""
    from mlsql.notebook.progress import in_kernel

    if not in_kernel():
        return False
    import importlib.util

    return importlib.util.find_spec("anywidget") is not None


ERROR_MIME = "application/vnd.mlsql.error+json"


def publish_error_span(exc, sql: str) -> None:
    """Before the error itself: where it is in the cell, for the JupyterLab extension to mark
    (docs/EXTENSION.md). Only that MIME type, no text/plain: other front-ends show nothing.
    Lines are the cell's (``exc.shift_lines`` done), as the message says them. ``errors``: every
    error reported together (each bad option of a statement), the first one's also at the top."""
    spans = [(e, e.span(sql)) for e in (exc, *exc.also)]
    spans = [(e, sp) for e, sp in spans if sp is not None]
    if not spans:
        return
    from IPython.display import publish_display_data

    def fields(sp) -> dict:
        return {"line": sp.line, "column": sp.column, "end_line": sp.end_line, "end_column": sp.end_column}

    data = {"message": str(exc), "kind": type(exc).__name__, **fields(spans[0][1])}
    if exc.also:
        data["errors"] = [{"message": e._block(e.line_offset), "kind": type(e).__name__, **fields(sp)}
                          for e, sp in spans]
    publish_display_data({ERROR_MIME: data})

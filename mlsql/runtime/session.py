"""A session: one workspace, one engine, the registry, and the statements run so far."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsql._lazy import pyarrow as pa  # imported by the first statement, not by connect()
from mlsql.engines.base import engine_class, open_engine
from mlsql.errors import (
    MLSQLError,
    OptionError,
    ParseError,
    UnknownOptionError,
    UnknownVariableError,
    span_of,
)
from mlsql.language.scripts import ML_SYNTAX, Statement, plain_statements, substitute_variables
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.registry import Registry
from mlsql.runtime.steps import catalog, devices, export, feature_views, ml_functions, training
from mlsql.runtime.steps.ml_functions import LoadedModel, load_model
from mlsql.workspace import Workspace

_WORD = re.compile(r"[A-Za-z_]\w*")
_FRAME_TYPES = {
    ("pandas", "DataFrame"),
    ("pyarrow", "Table"),
    ("pyarrow", "RecordBatchReader"),
    ("pyarrow", "RecordBatch"),
    ("pyarrow", "Dataset"),
    ("polars", "DataFrame"),
    ("polars", "LazyFrame"),
}
MLSQL_SETTINGS = ("mlsql_engine", "mlsql_lock_timeout", "mlsql_dialect", "mlsql_log_level")


class Session:
    """Runs MLSQL scripts. ``mlsql.connect()`` makes one; the notebook magic wraps one."""

    def __init__(self, workspace: str | Path | None = None, engine: str = "duckdb", *,
                 namespace: dict | None = None, **engine_conf):
        engine_class(engine)  # an unknown engine fails before the workspace is touched
        from mlsql import logs

        logs.apply()  # the libraries' loggers at the process's mlsql_log_level (errors only by default)
        self.workspace = Workspace.open(workspace)
        # e.g. master=, remote=, conf= for Spark; kept so SET mlsql_engine back to it reopens it alike
        self._engine_conf = {str(engine).lower(): engine_conf} if engine_conf else {}
        self.engine = open_engine(engine, self.workspace, **engine_conf)
        self.sql_dialect: str | None = None  # SET mlsql_dialect: plain statements in the engine's own SQL
        self.registry = Registry(self.workspace)
        self.namespace = namespace
        self.progress = None  # factory(title, total) -> reporter with update(i, total, metrics), close()
        self.display_limit = 10
        self._planner = P.Planner(self.engine.temp_name)
        from mlsql.deploy.devices import DeviceStore

        self.devices = DeviceStore(self.workspace.devices_path)
        # model versions loaded so far, by (name, version): a cell that predicts twice loads once
        self.loaded_models: dict[tuple[str, int], LoadedModel] = {}
        self._from_namespace: set[str] = set()
        self.on_wait = _say_on_stderr

    @property
    def on_wait(self):
        """Called as ``on_wait(message, waited_s)`` about every half second while a statement waits
        for the workspace (another process holds it); the notebook shows it in the cell."""
        return getattr(self.engine, "on_wait", None)

    @on_wait.setter
    def on_wait(self, fn) -> None:
        if hasattr(self.engine, "on_wait"):
            self.engine.on_wait = fn

    # -- public API ------------------------------------------------------------
    def sql(self, text: str, params: dict | None = None, *, autolimit: int | None = None) -> Result:
        """Run a script; the last statement's result (earlier messages are in ``.log``)."""
        results = self.execute(text, params, autolimit=autolimit)
        if not results:
            return Result(pa.table({}), message="No statement to run.")
        last = results[-1]
        last.log = [r.message for r in results[:-1] if r.message]
        return last

    def execute(self, text: str, params: dict | None = None, *,
                autolimit: int | None = None) -> list[Result]:
        """Run every statement of a script in order; one Result each.

        A failing statement raises; everything before it has already taken effect.
        """
        return list(self.iter_execute(text, params, autolimit=autolimit))

    def iter_execute(self, text: str, params: dict | None = None, *,
                     autolimit: int | None = None) -> Iterator[Result]:
        """``execute``, yielding each statement's Result as soon as it has run (``mlsql run``
        prints them as they come, so a later failure does not hide earlier results)."""
        stmts = self._statements(text)
        for i, item in enumerate(stmts):
            is_last = i == len(stmts) - 1
            stmt = None
            try:
                for stmt in (item() if callable(item) else [item]):
                    yield self._run_statement(stmt, params, autolimit if is_last else None)
            except MLSQLError as exc:
                line = stmt.line if stmt is not None else getattr(item, "line", None)
                if len(stmts) > 1:
                    exc.with_context(f"Statement {i + 1}", line=line)
                elif line is not None:
                    exc.statement_line = line
                _place(exc, stmt, text)
                raise

    def register(self, name: str, data) -> None:
        """Make a pandas/polars/Arrow object queryable as ``name``."""
        self.engine.register(name, data)

    def model(self, ref: str) -> LoadedModel:
        """Load ``name``, ``name@3`` or ``name@alias`` from the registry."""
        return load_model(self, _spec(ref))

    def export(self, ref: str, **options) -> Result:
        """Python form of ``EXPORT MODEL ref OPTIONS (...)``: the parity report as a Result."""
        from mlsql.export import resolve_export_options

        return export.export(self, _spec(ref), resolve_export_options({k.lower(): v for k, v in options.items()}))

    def set_alias(self, model: str, alias: str, version: int) -> None:
        self.registry.set_alias(model, alias, version)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- parsing ---------------------------------------------------------------
    def _statements(self, text: str) -> list:
        """The script's statements. With ``${var}`` in the text, each statement is a thunk parsed
        just before it runs, so a SET earlier in the script applies to the statements after it."""
        if "${" not in text and not ML_SYNTAX.search(text):
            return plain_statements(text)  # plain DuckDB SQL: no sqlglot parse, DuckDB reads it
        from sqlglot.tokens import TokenType

        from mlsql.language.dialect import _DIALECT, parse_script

        if "${" not in text:
            return parse_script(text)

        bounds, start = [], 0
        for tok in _DIALECT.tokenize(text):
            if tok.token_type == TokenType.SEMICOLON:
                bounds.append((start, tok.start))
                start = tok.end + 1
        bounds.append((start, len(text)))
        return [self._thunk(text, a, b) for a, b in bounds if text[a:b].strip()]

    def _thunk(self, text: str, a: int, b: int):
        def parse() -> list[Statement]:
            from mlsql.language.dialect import parse_script

            chunk = text[a:b]
            line0 = text.count("\n", 0, a)
            try:
                parsed = parse_script(substitute_variables(chunk, self.variables))
            except UnknownVariableError as exc:  # where ${name} is in the script, not in the chunk
                found = re.search(r"\$\{\s*" + re.escape(exc.name) + r"\s*\}", chunk, re.IGNORECASE)
                err = UnknownVariableError(exc.name, exc.candidates, message=f"Unknown variable '${{{exc.name}}}'",
                                           hint=f"Set it first with SET VARIABLE {exc.name} = <value>.")
                if found:
                    sp = span_of(text, a + found.start(), a + found.end())
                    err.set_span(sp.line, sp.column, sp.end_line, sp.end_column, source=text)
                raise err from None
            except ParseError as exc:
                # the chunk's text, variables substituted: its line moved to the script's (a
                # column after a substituted variable on the same line is the substituted text's)
                col = exc.col if exc.line != 1 else (exc.col or 1) + a - (text.rfind("\n", 0, a) + 1)
                raise ParseError(exc.message, sql=text, line=(exc.line or 1) + line0, col=col,
                                 hint=exc.hint) from None
            for st in parsed:  # positions in the tree: offsets of the script, not of the chunk
                for node in st.expression.walk() if st.expression is not None else ():
                    if node._meta and "start" in node.meta:
                        node.meta["start"] += a
                        node.meta["end"] += a
            return [Statement(sql=st.sql, expression=st.expression, start=st.start + a,
                              line=st.line + line0, is_ml=st.is_ml) for st in parsed]

        chunk = text[a:b]
        parse.line = text.count("\n", 0, a + len(chunk) - len(chunk.lstrip())) + 1  # for an error before it parses
        return parse

    # -- running ---------------------------------------------------------------
    def _run_statement(self, stmt: Statement, params, autolimit) -> Result:
        t0 = time.perf_counter()
        plan = self._planner.plan(stmt)
        self._bind_namespace(stmt.sql)
        # the user's own text (not MLSQL's rendering of an ML statement) may be in the engine's dialect
        ctx = _StepContext(params, autolimit, temps=[], dialect=self.sql_dialect if not stmt.is_ml else None)
        try:
            result = charted = None  # charted: the ML function's result that has charts, if any
            for step in plan.steps:
                result = self._run_step(step, ctx)
                if result is not None and result.plots:
                    charted = result
        finally:
            for name in ctx.temps:
                self.engine.unregister(name)
        if charted is not None and result is not charted and _same_rows(result.table, charted.table):
            result.plots = charted.plots  # SELECT * FROM ML.EVALUATE(...): its charts go with it
        result.elapsed = time.perf_counter() - t0
        result.statement = stmt.sql
        result.display_limit = self.display_limit
        return result

    def _run_step(self, step, ctx: _StepContext) -> Result:
        handler = _HANDLERS.get(type(step))
        if handler is None:
            raise AssertionError(f"no runner for {step!r}")
        return handler(self, step, ctx)

    def _run_query(self, step: P.QueryStep, ctx: _StepContext) -> Result:
        kw = {"dialect": ctx.dialect} if ctx.dialect else {}  # DuckDB's run() knows no dialect: it is never set there
        got = self.engine.run(step.query, P.params_for(step.query, ctx.params), limit=ctx.autolimit, line=step.line, **kw)
        truncated = bool(ctx.autolimit) and got.table.num_rows == ctx.autolimit
        return Result(got.table, truncated=truncated, python_rows=got.rows, pandas_frame=got.frame)

    def _run_ml(self, step: P.MLStep, ctx: _StepContext) -> Result:
        charts: list = []
        table = ml_functions.run_ml(self, step, ctx.params, charts)
        self.engine.register(step.output, table)
        ctx.temps.append(step.output)
        return Result(table, kind="ml", plots=charts)

    @property
    def variables(self) -> dict[str, Any]:
        """The script variables (``SET VARIABLE name = value``, read as ``${name}``)."""
        return self.engine.variables()

    def _set(self, step: P.SetStep, ctx: _StepContext | None = None) -> Result:
        """MLSQL's own settings, ``SET mlsql_<name> = value`` (``RESET mlsql_<name>``: the default)."""
        name = step.name.lower()
        reset = step.value is None
        if name == "mlsql_engine":
            want = "duckdb" if reset else str(step.value).lower()
            engine_class(want)  # unknown names fail with a suggestion
            if want != self.engine.name:
                on_wait = self.on_wait
                self.engine.close()
                self.engine = open_engine(want, self.workspace, **self._engine_conf.get(want, {}))
                self.on_wait = on_wait
                self._planner = P.Planner(self.engine.temp_name)
                if self.sql_dialect and self.sql_dialect != self.engine.dialect:
                    self.sql_dialect = None
            return Result(pa.table({}), message=f"mlsql_engine = '{want}'")
        if name == "mlsql_dialect":
            want = None if reset else str(step.value).lower()
            if want in ("duckdb", "mlsql"):
                want = None
            if want is not None and want != self.engine.dialect:
                raise OptionError(f"mlsql_dialect = '{want}': the {self.engine.name} engine reads MLSQL's "
                                  f"(DuckDB) SQL{' or ' + repr(self.engine.dialect) if self.engine.dialect != 'duckdb' else ''}",
                                  hint="SET mlsql_engine = 'spark' first to write Spark SQL directly.")
            self.sql_dialect = want
            return Result(pa.table({}), message=f"mlsql_dialect = '{want or 'duckdb'}'"
                          + (" (plain statements go to the engine as written)" if want else ""))
        if name == "mlsql_lock_timeout":
            from mlsql.locks import DEFAULT_TIMEOUT_S

            v = DEFAULT_TIMEOUT_S if reset else step.value
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise OptionError(f"mlsql_lock_timeout must be a number of seconds ≥ 0, got {v!r}")
            self.engine.lock_timeout = float(v)
            return Result(pa.table({}), message=f"mlsql_lock_timeout = {float(v):g} s")
        if name == "mlsql_log_level":
            from mlsql import logs

            want = logs.set_level(logs.DEFAULT if reset else step.value)
            self.engine.log_level_changed()
            return Result(pa.table({}), message=f"mlsql_log_level = '{want}'" + (
                " (library logs shown at this level)" if logs.verbose() else ""))
        raise UnknownOptionError(step.name, MLSQL_SETTINGS, where="(MLSQL's own settings)")

    def _bind_namespace(self, sql: str) -> None:
        """Expose notebook DataFrames named in the statement that are not catalog tables."""
        ns = self.namespace
        if not ns:
            return
        for name in set(_WORD.findall(sql)) & ns.keys():
            obj = ns[name]
            cls = type(obj)
            if (cls.__module__.split(".")[0], cls.__name__) not in _FRAME_TYPES:
                continue
            if name in self._from_namespace or not self.engine.has_relation(name):
                self.engine.register(name, obj)
                self._from_namespace.add(name)


def _place(exc: MLSQLError, stmt: Statement | None, text: str) -> None:
    """Give ``exc`` (and the errors reported with it) its position in ``text``, the script: the
    node of the statement's tree it is about, else the caret of the engine's message, else the
    first use of the name it is about in the statement."""
    from mlsql.errors import engine_span, without_engine_position

    for e in (exc, *exc.also):
        e.statement_line = e.statement_line or exc.statement_line
        if stmt is not None and stmt.is_ml and engine_span(e.message) is not None:
            # the engine ran MLSQL's rendering of the statement: its caret points there
            e.message = without_engine_position(e.message)
        if e.line is None:
            found = None
            tree = stmt.expression if stmt is not None else None
            if tree is not None and engine_span(e.message) is None:
                from mlsql.language.positions import locate

                at = locate(e, tree)
                found = span_of(text, *at) if at is not None else None
            found = found or e.span(text)
            if found is not None:
                e.set_span(found.line, found.column, found.end_line, found.end_column)
        if e.source is None:
            e.source = text
    exc.args = (str(exc),)


def _spec(ref: str) -> P.ModelSpec:
    name, _, tail = ref.partition("@")
    return P.ModelSpec(name.lower(), int(tail) if tail.isdigit() else None, tail if tail and not tail.isdigit() else None)


def _same_rows(a: pa.Table, b: pa.Table) -> bool:
    """Whether a statement returned an ML function's rows as they are (same columns, same count)."""
    return a.num_rows == b.num_rows and a.column_names == b.column_names


def _say_on_stderr(message: str, waited_s: float) -> None:
    import sys

    if waited_s < 1.0 or int(waited_s * 2) % 4 == 0:  # at once, then every two seconds
        print(f"{message} (waited {waited_s:.0f} s)", file=sys.stderr, flush=True)


@dataclass
class _StepContext:
    """What a step may need beyond itself: the script's parameters, the display limit (last
    statement only), the temporary relations to drop after the statement, the user's SQL dialect."""

    params: dict | None
    autolimit: int | None
    temps: list[str]
    dialect: str | None


def _explain(s: Session, step: P.ExplainStep, ctx: _StepContext) -> Result:
    return Result(step.plan.explain_table(), kind="explain")


def _job(s: Session, step: P.JobStep, ctx: _StepContext) -> Result:
    from mlsql.jobs.statements import run_job_step

    return run_job_step(s.workspace, step)


def _alert(s: Session, step: P.AlertStep, ctx: _StepContext) -> Result:
    from mlsql.jobs.alert_statements import run_alert_step

    return run_alert_step(s.workspace, step)


def _experiment(s: Session, step: P.ExperimentStep, ctx: _StepContext) -> Result:
    from mlsql.runtime.steps.experiments import experiment_step

    return experiment_step(s, step, load_model, devices.deployable)


# plan step type -> the function that runs it: handler(session, step, ctx) -> Result
_HANDLERS = {
    P.QueryStep: Session._run_query,
    P.MLStep: Session._run_ml,
    P.CreateModelStep: lambda s, step, ctx: training.create_model(s, step, ctx.params, ctx.temps),
    P.ShowModelsStep: lambda s, step, ctx: catalog.show_models(s, step),
    P.DescribeModelStep: lambda s, step, ctx: catalog.describe_model(s, step),
    P.DropModelStep: lambda s, step, ctx: catalog.drop_model(s, step),
    P.SetStep: Session._set,
    P.ExplainStep: _explain,
    P.ExportStep: lambda s, step, ctx: export.export(s, step.model, step.options),
    P.DeviceStep: lambda s, step, ctx: devices.device_step(s, step),
    P.JobStep: _job,
    P.AlertStep: _alert,
    P.ExperimentStep: _experiment,
    P.FeatureViewStep: lambda s, step, ctx: feature_views.feature_view_step(s, step),
}

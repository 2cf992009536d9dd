"""Statement → plan: a short list of typed steps the session runs in order.

Steps hold sqlglot trees, never SQL text rendered for one engine: each engine renders a tree
once, in its own dialect (``Engine.render``). The one exception is a plain statement, which
keeps the user's text exactly as typed (:class:`QueryStep` with a string).

ML table functions are planned bottom-up: each becomes an :class:`MLStep` whose result is
exposed to the engine under a temporary name, and the statement around it becomes a tree over
that name. Every OPTIONS clause and STRUCT of settings is checked here, once, by the options
table (``mlsql.language.options``); steps carry the checked values.

What plans a statement is one table, ``STATEMENTS``: node type name → planning function. A new
statement is one expression class (``mlsql.language.expressions``), one entry here and one step
with its handler (``mlsql.runtime.steps``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlsql.language.scripts import Statement

if TYPE_CHECKING:  # sqlglot loads with the first statement that has ML syntax
    import pyarrow as pa
    from sqlglot import exp


_PARAM = re.compile(r"(?<![$\w])\$([A-Za-z_]\w*)")


def params_for(sql: str | exp.Expression, params: dict | None) -> dict | None:
    """Only the named parameters (``$name``) a step's SQL or tree uses: DuckDB rejects extra ones."""
    if not params:
        return None
    if isinstance(sql, str):
        used = set(_PARAM.findall(sql))
    else:
        exp, _ = _sqlglot()
        used = {p.name for p in sql.find_all(exp.Placeholder)}
    return {k: v for k, v in params.items() if k in used} or None


def sql_text(sql: str | exp.Expression) -> str:
    """A step's SQL as MLSQL's (DuckDB) text, for EXPLAIN and the registry: the user's text as
    typed, or the tree written out."""
    return sql if isinstance(sql, str) else sql.sql("duckdb")


def _mlsql_text(tree: exp.Expression) -> str:
    """A tree with ML functions in it, written out in MLSQL's own dialect (it parses back)."""
    from mlsql.language.dialect import MLSQL

    return tree.sql(dialect=MLSQL)


def _sqlglot():
    from sqlglot import exp

    from mlsql.language import expressions as mx

    return exp, mx


@dataclass(frozen=True)
class ModelSpec:
    """A model reference: name plus an optional version or alias."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def of(cls, ref) -> ModelSpec:
        return cls(ref.name, ref.version, ref.alias)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.alias:
            return f"{self.name}@{self.alias}"
        return self.name


@dataclass
class QueryStep:
    """What the engine runs; its rows are the statement's result when it is the last step. A
    plain statement's own text (run as typed), or a tree the engine renders in its dialect."""

    query: str | exp.Expression
    line: int = 1

    kind = "query"

    def describe(self) -> tuple[str, str]:
        return "run SQL on the engine", sql_text(self.query)


@dataclass
class MLStep:
    """An ML table function, materialized as Arrow under ``output``."""

    func: str
    model: ModelSpec | None
    input: exp.Expression | None  # the rows it reads: a query tree
    settings: dict[str, Any]  # STRUCT(...) settings, checked
    output: str
    args: list[Any] = field(default_factory=list)
    study: exp.Expression | None = None  # ML.VALIDATE_DATA_DRIFT's second input: a query tree

    kind = "ml"

    def describe(self) -> tuple[str, str]:
        target = f"MODEL {self.model}" if self.model else ", ".join(map(repr, self.args))
        return f"ML.{self.func}({target}) → {self.output}", sql_text(self.input) if self.input is not None else ""


@dataclass
class CreateModelStep:
    model: str
    replace: bool
    if_not_exists: bool
    options: dict[str, Any]  # checked
    given: dict[str, Any]  # as written, for the registry
    transform: list[exp.Expression] | None
    query: exp.Expression | None  # None: an imported model without example rows (model_path)
    statement: str
    # the training query as written when it reads ML table functions (ML.DEVICE_DATA...): ``query``
    # then reads their temporary results, which export and deploy cannot read again later
    source_sql: str | None = None
    # the feature views its query reads through ML.FEATURES_AT: their specs go with the model
    feature_views: list[str] = field(default_factory=list)

    kind = "create_model"

    @property
    def query_sql(self) -> str:
        """The training query in MLSQL's (DuckDB) SQL: what the registry keeps, so that export and
        deploy read the same rows again on any engine."""
        return sql_text(self.query) if self.query is not None else ""

    @property
    def imported(self) -> bool:
        """OPTIONS (model_path = ...): a model trained elsewhere, imported rather than trained."""
        return "model_path" in self.options

    def describe(self) -> tuple[str, str]:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.given.items())
        if self.imported:
            return f"import model {self.model}: {opts}", self.query_sql
        fit = "fit TRANSFORM, " if self.transform else ""
        return f"train model {self.model}: {fit}{opts}", self.query_sql


@dataclass
class ShowModelsStep:
    kind = "show_models"

    def describe(self):
        return "list models in the registry", ""


@dataclass
class DescribeModelStep:
    model: ModelSpec
    kind = "describe_model"

    def describe(self):
        return f"describe model {self.model}", ""


@dataclass
class DropModelStep:
    model: str
    if_exists: bool
    kind = "drop_model"

    def describe(self):
        return f"drop model {self.model} and all its versions", ""


@dataclass
class SetStep:
    name: str
    value: Any
    sql: str
    kind = "set"

    def describe(self):
        return f"set {self.name} = {self.value!r}", self.sql


@dataclass
class ExplainStep:
    plan: Plan
    kind = "explain"

    def describe(self):
        return "explain", ""


@dataclass
class ExportStep:
    model: ModelSpec
    options: dict[str, Any]  # checked, every default filled in
    kind = "export"

    def describe(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"export model {self.model} to ONNX ({opts}), check parity, record in the registry", ""


@dataclass
class DeviceStep:
    """A device statement: action is create_device, create_group, show_devices, drop_device,
    drop_group, deploy or rollback."""

    action: str
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # DEPLOY's checked; the devices' store checks its own
    model: ModelSpec | None = None
    target_kind: str = "DEVICE"
    replace: bool = False
    exists: bool = False
    kind = "device"

    def describe(self):
        what = {"deploy": f"export + package {self.model}, install on {self.target_kind.lower()} '{self.name}'",
                "rollback": f"roll {self.model} back on {self.target_kind.lower()} '{self.name}'",
                "show_devices": "list devices with their live status",
                "show_deployments": "list each device's models with how they share it"}.get(self.action, f"{self.action} '{self.name}'")
        return what, ""


@dataclass
class JobStep:
    """A job statement: action is create, show, describe, drop, run, pause or resume."""

    action: str
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    notebook: str | None = None
    body: str | None = None
    replace: bool = False
    exists: bool = False
    kind = "job"

    def describe(self):
        what = {"create": f"create job '{self.name}'", "show": "list jobs with their next run",
                "run": f"run job '{self.name}' now and wait for it"}.get(self.action, f"{self.action} job '{self.name}'")
        return what, self.body or self.notebook or ""


@dataclass
class AlertStep:
    """An alert statement: action is create, show, describe, drop or check."""

    action: str
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    body: str | None = None
    replace: bool = False
    exists: bool = False
    kind = "alert"

    def describe(self):
        what = {"create": f"create alert '{self.name}'", "show": "list alerts with their last check",
                "check": f"check alert '{self.name}' now (its query, then its notification)"}.get(
            self.action, f"{self.action} alert '{self.name}'")
        return what, self.body or ""


@dataclass
class ExperimentStep:
    """An experiment statement: action is create, stop or show."""

    action: str
    name: str = ""
    group: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # CREATE EXPERIMENT's, checked, defaults filled in
    promote: str | None = None
    kind = "experiment"

    def describe(self):
        what = {"create": f"install every arm on each device of group '{self.group}', start experiment '{self.name}'",
                "stop": f"stop experiment '{self.name}', keep its final readout"
                        + (f", promote {self.promote} to its group" if self.promote else ""),
                "show": "list experiments with their state"}[self.action]
        return what, ""


@dataclass
class FeatureViewStep:
    """A feature view statement: action is create, show, describe or drop. CREATE carries the checked
    OPTIONS, the SELECT's tree and the statement's text and offset in the script (a refusal points into
    it); the runtime reads the event table's schema and compiles the spec
    (mlsql.language.feature_views)."""

    action: str
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    query: exp.Expression | None = None
    statement: str = ""
    start: int = 0
    replace: bool = False
    exists: bool = False
    kind = "feature_view"

    def describe(self):
        what = {"create": f"compile feature view '{self.name}' to its spec, store it in the workspace",
                "show": "list feature views"}.get(self.action, f"{self.action} feature view '{self.name}'")
        return what, self.statement if self.action == "create" else ""


@dataclass
class Plan:
    statement: Statement
    steps: list = field(default_factory=list)

    def explain_table(self) -> pa.Table:
        import pyarrow as pa

        rows = [(i, s.kind, *s.describe()) for i, s in enumerate(self.steps, start=1)]
        cols = list(zip(*rows)) if rows else [[], [], [], []]
        return pa.table(
            {
                "step": pa.array(cols[0], pa.int32()),
                "kind": pa.array(cols[1], pa.string()),
                "detail": pa.array(cols[2], pa.string()),
                "engine_sql": pa.array(cols[3], pa.string()),
            }
        )


class Planner:
    """Turns parsed statements into plans. Holds only a counter for temp names."""

    def __init__(self, temp_name):
        self._temp_name = temp_name

    def plan(self, stmt: Statement) -> Plan:
        e = stmt.expression
        plan = Plan(stmt)
        if e is None or not stmt.is_ml:
            plan.steps.append(QueryStep(stmt.sql, stmt.line))
            return plan
        how = STATEMENTS.get(type(e).__name__, _plan_query)
        plan.steps.extend(how(self, e, stmt))
        return plan

    def lift_ml_functions(self, tree: exp.Expression) -> tuple[list, exp.Expression]:
        """Replace each ML table function (innermost first) by a temp relation name."""
        from mlsql.language.options import validate

        _, mx = _sqlglot()
        steps: list = []
        nodes = list(tree.find_all(mx.MLFunction))
        # find_all is breadth-first: reversed, inner calls come before the calls holding them.
        for node in reversed(nodes):
            name = self._temp_name("ml")
            steps.append(
                MLStep(
                    func=node.func,
                    model=ModelSpec.of(node.model) if node.model is not None else None,
                    input=self._input(node, tree),
                    settings=validate(f"ML.{node.func}", node.settings()),
                    output=name,
                    args=[_literal(a) for a in node.args_list],
                    study=self._input(node, tree, node.study) if node.study is not None else None,
                )
            )
            mx.replace_with_table(node, name)
        return steps, tree

    @staticmethod
    def _input(node, tree: exp.Expression, src=None) -> exp.Expression | None:
        """The rows ``node`` reads (its input, or ``src``: another of its inputs) as a query tree."""
        exp, _ = _sqlglot()
        src = node.input if src is None else src
        if src is None:
            return None
        if isinstance(src, exp.Table):
            query: exp.Expression = exp.select("*").from_(src.copy())
        elif isinstance(src, exp.Subquery):
            query = src.this.copy()
        else:
            query = src.copy()
        ctes = _visible_ctes(node, tree)
        if ctes and isinstance(query, exp.Query):
            with_ = exp.With(expressions=[c.copy() for c in ctes])
            if query.args.get("with_") or query.args.get("with"):
                inner = query.args.get("with_") or query.args.get("with")
                with_.set("expressions", with_.expressions + inner.expressions)
            query.set("with_" if "with_" in query.arg_types else "with", with_)
        return query


# -- one planning function per statement ---------------------------------------------------------

def _plan_query(planner: Planner, e: exp.Expression, stmt: Statement) -> list:
    """Any statement with ML table functions in it: each function a step, then the query over them."""
    steps, tree = planner.lift_ml_functions(e.copy())
    return [*steps, QueryStep(tree, stmt.line)]


def _plan_explain(planner: Planner, e, stmt: Statement) -> list:
    from mlsql.language.dialect import is_mlsql

    inner = Statement(sql=e.this.sql(dialect="mlsql"), expression=e.this, start=stmt.start, line=stmt.line,
                      is_ml=is_mlsql(e.this))
    return [ExplainStep(planner.plan(inner))]


def _plan_create_model(planner: Planner, e, stmt: Statement) -> list:
    from mlsql.language.options import validate

    given = e.options()
    checked = validate("CREATE MODEL", given)  # every option, aliases included, before any data is read
    _check_import(checked, e)
    if e.query is None:  # an imported model with no example rows
        steps, query, source = [], None, None
    else:
        steps, query = planner.lift_ml_functions(e.query.copy())
        source = _mlsql_text(e.query) if steps else None  # the query as written, ML functions in it
    views = list(dict.fromkeys(str(st.args[0]) for st in steps if st.func == "FEATURES_AT" and st.args))
    return [*steps, CreateModelStep(model=e.model.name, replace=bool(e.args.get("replace")), source_sql=source,
                                    feature_views=views,
                                    if_not_exists=bool(e.args.get("exists")), options=checked, given=given,
                                    transform=e.transform, query=query, statement=stmt.sql)]


def _check_import(checked: dict, e) -> None:
    """model_path and an imported model_type go together; torch needs example rows to trace;
    an imported model has no TRANSFORM (its graph is its own preprocessing)."""
    from mlsql.errors import OptionError
    from mlsql.language.options import IMPORTED

    mt = checked.get("model_type")
    if mt in IMPORTED and "model_path" not in checked:
        raise OptionError(f"model_type = '{mt}' imports a model: it needs OPTIONS (model_path = '<file>')",
                          hint="model_path names the file (or models:/name/version) to import.")
    if mt in IMPORTED and e.transform:
        raise OptionError(f"An imported {mt} model cannot have a TRANSFORM: its graph takes the columns as they are",
                          hint="Compute the columns in the AS SELECT, or in the query given to ML.PREDICT.")
    if mt == "torch" and e.query is None:
        raise OptionError("model_type = 'torch' needs AS SELECT ...: example rows whose columns feed forward() "
                          "in order, from which the graph is traced to ONNX")


def _plan_export(planner: Planner, e, stmt: Statement) -> list:
    from mlsql.language.options import validate

    return [ExportStep(ModelSpec.of(e.model), validate("EXPORT MODEL", e.options(), defaults=True))]


def _plan_deploy(planner: Planner, e, stmt: Statement) -> list:
    from mlsql.language.options import validate

    return [DeviceStep("deploy", e.target, validate("DEPLOY MODEL", e.options(), defaults=True),
                       ModelSpec.of(e.model), e.target_kind)]


def _plan_create_feature_view(planner: Planner, e, stmt: Statement) -> list:
    from mlsql.language.options import validate

    return [FeatureViewStep("create", e.name, validate("CREATE FEATURE VIEW", e.options(), defaults=True),
                            e.query, stmt.sql, stmt.start, **_flags(e))]


def _flags(e) -> dict:
    return {"replace": bool(e.args.get("replace")), "exists": bool(e.args.get("exists"))}


STATEMENTS: dict[str, Callable[[Planner, Any, Statement], list]] = {
    "Explain": _plan_explain,
    "CreateModel": _plan_create_model,
    "ShowModels": lambda p, e, st: [ShowModelsStep()],
    "DescribeModel": lambda p, e, st: [DescribeModelStep(ModelSpec.of(e.model))],
    "DropModel": lambda p, e, st: [DropModelStep(e.model.name, bool(e.args.get("exists")))],
    "SetVariable": lambda p, e, st: [SetStep(e.name, e.value, st.sql)],
    "ExportModel": _plan_export,
    "CreateDevice": lambda p, e, st: [DeviceStep("create_device", e.name, e.options(), **_flags(e))],
    "CreateDeviceGroup": lambda p, e, st: [DeviceStep("create_group", e.name, e.options(), **_flags(e))],
    "ShowDevices": lambda p, e, st: [DeviceStep("show_devices")],
    "ShowDeployments": lambda p, e, st: [DeviceStep("show_deployments")],
    "DropDeviceGroup": lambda p, e, st: [DeviceStep("drop_group", e.name, exists=bool(e.args.get("exists")))],
    "DropDevice": lambda p, e, st: [DeviceStep("drop_device", e.name, exists=bool(e.args.get("exists")))],
    "DeployModel": _plan_deploy,
    "RollbackModel": lambda p, e, st: [DeviceStep("rollback", e.target, {}, ModelSpec.of(e.model), e.target_kind)],
    "CreateJob": lambda p, e, st: [JobStep("create", e.name, e.options(), e.notebook, e.body, **_flags(e))],
    "ShowJobs": lambda p, e, st: [JobStep("show")],
    "DescribeJob": lambda p, e, st: [JobStep("describe", e.name)],
    "DropJob": lambda p, e, st: [JobStep("drop", e.name, exists=bool(e.args.get("exists")))],
    "RunJob": lambda p, e, st: [JobStep("run", e.name)],
    "AlterJob": lambda p, e, st: [JobStep(e.args["action"].lower(), e.name)],
    "CreateAlert": lambda p, e, st: [AlertStep("create", e.name, e.options(), e.body, **_flags(e))],
    "ShowAlerts": lambda p, e, st: [AlertStep("show")],
    "DescribeAlert": lambda p, e, st: [AlertStep("describe", e.name)],
    "DropAlert": lambda p, e, st: [AlertStep("drop", e.name, exists=bool(e.args.get("exists")))],
    "CheckAlert": lambda p, e, st: [AlertStep("check", e.name)],
    "CreateExperiment": lambda p, e, st: [_plan_experiment(e)],
    "StopExperiment": lambda p, e, st: [ExperimentStep("stop", e.name, promote=e.promote)],
    "ShowExperiments": lambda p, e, st: [ExperimentStep("show")],
    "CreateFeatureView": _plan_create_feature_view,
    "ShowFeatureViews": lambda p, e, st: [FeatureViewStep("show")],
    "DescribeFeatureView": lambda p, e, st: [FeatureViewStep("describe", e.name)],
    "DropFeatureView": lambda p, e, st: [FeatureViewStep("drop", e.name, exists=bool(e.args.get("exists")))],
}


def _plan_experiment(e) -> ExperimentStep:
    from mlsql.language.options import validate

    return ExperimentStep("create", e.name, e.group, validate("CREATE EXPERIMENT", e.options(), defaults=True))


def _visible_ctes(node, tree: exp.Expression) -> list[exp.CTE]:
    """CTEs of the enclosing statement that the ML function's input may reference."""
    exp, _ = _sqlglot()
    w = tree.args.get("with_") or tree.args.get("with")
    if not isinstance(w, exp.With):
        return []
    out = []
    for cte in w.expressions:
        if node in list(cte.find_all(type(node))):
            break  # only CTEs defined before the one holding this call
        out.append(cte)
    return out


def _literal(a) -> Any:
    from mlsql.language.options import read_literal

    exp, _ = _sqlglot()
    return read_literal(a) if isinstance(a, exp.Expression) else a

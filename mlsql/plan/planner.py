"""Statement → plan: a short list of typed steps the session runs in order.

ML table functions are planned bottom-up: each becomes an :class:`MLStep` whose
result is exposed to the engine under a temporary name, and the statement
around it becomes ordinary engine SQL over that name. A plain statement is a
single :class:`QueryStep` that runs its original text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlsql.language.scripts import Statement

if TYPE_CHECKING:  # sqlglot loads with the first statement that has ML syntax
    import pyarrow as pa
    from sqlglot import exp


_PARAM = re.compile(r"(?<![$\w])\$([A-Za-z_]\w*)")


def params_for(sql: str, params: dict | None) -> dict | None:
    """Only the named parameters a step's SQL uses: DuckDB rejects extra ones."""
    if not params:
        return None
    used = set(_PARAM.findall(sql))
    return {k: v for k, v in params.items() if k in used} or None


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
    """Engine SQL; its rows are the statement's result when it is the last step."""

    sql: str
    line: int = 1

    kind = "query"

    def describe(self) -> tuple[str, str]:
        return "run SQL on the engine", self.sql


@dataclass
class MLStep:
    """An ML table function, materialized as Arrow under ``output``."""

    func: str
    model: ModelSpec | None
    input_sql: str | None
    settings: dict[str, Any]
    output: str
    args: list[Any] = field(default_factory=list)

    kind = "ml"

    def describe(self) -> tuple[str, str]:
        target = f"MODEL {self.model}" if self.model else ", ".join(map(repr, self.args))
        return f"ML.{self.func}({target}) → {self.output}", self.input_sql or ""


@dataclass
class CreateModelStep:
    model: str
    replace: bool
    if_not_exists: bool
    options: dict[str, Any]
    transform: list[exp.Expression] | None
    query_sql: str
    statement: str

    kind = "create_model"

    def describe(self) -> tuple[str, str]:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
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
    options: dict[str, Any]
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
    options: dict[str, Any] = field(default_factory=dict)
    model: ModelSpec | None = None
    target_kind: str = "DEVICE"
    replace: bool = False
    exists: bool = False
    kind = "device"

    def describe(self):
        what = {"deploy": f"export + package {self.model}, install on {self.target_kind.lower()} '{self.name}'",
                "rollback": f"roll {self.model} back on {self.target_kind.lower()} '{self.name}'",
                "show_devices": "list devices with their live status"}.get(self.action, f"{self.action} '{self.name}'")
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
        plan.steps.extend(self._plan_expression(e, stmt))
        return plan

    def _plan_expression(self, e: exp.Expression, stmt: Statement) -> list:
        _, mx = _sqlglot()
        if isinstance(e, mx.Explain):
            inner = Statement(
                sql=e.this.sql(dialect="mlsql"), expression=e.this, start=stmt.start, line=stmt.line,
                is_ml=_has_ml(e.this),
            )
            return [ExplainStep(self.plan(inner))]
        if isinstance(e, mx.CreateModel):
            query = e.query.copy()
            steps, query = self._lift_ml_functions(query)
            steps.append(
                CreateModelStep(
                    model=e.model.name,
                    replace=bool(e.args.get("replace")),
                    if_not_exists=bool(e.args.get("exists")),
                    options=e.options(),
                    transform=e.transform,
                    query_sql=query.sql("duckdb"),
                    statement=stmt.sql,
                )
            )
            return steps
        if isinstance(e, mx.ShowModels):
            return [ShowModelsStep()]
        if isinstance(e, mx.DescribeModel):
            return [DescribeModelStep(ModelSpec.of(e.model))]
        if isinstance(e, mx.DropModel):
            return [DropModelStep(e.model.name, bool(e.args.get("exists")))]
        if isinstance(e, mx.SetVariable):
            return [SetStep(e.name, e.value, stmt.sql)]
        if isinstance(e, mx.ExportModel):
            return [ExportStep(ModelSpec.of(e.model), e.options())]
        if isinstance(e, mx.CreateDevice):
            return [DeviceStep("create_device", e.name, e.options(), replace=bool(e.args.get("replace")),
                               exists=bool(e.args.get("exists")))]
        if isinstance(e, mx.CreateDeviceGroup):
            return [DeviceStep("create_group", e.name, e.options(), replace=bool(e.args.get("replace")),
                               exists=bool(e.args.get("exists")))]
        if isinstance(e, mx.ShowDevices):
            return [DeviceStep("show_devices")]
        if isinstance(e, mx.DropDeviceGroup):
            return [DeviceStep("drop_group", e.name, exists=bool(e.args.get("exists")))]
        if isinstance(e, mx.DropDevice):
            return [DeviceStep("drop_device", e.name, exists=bool(e.args.get("exists")))]
        if isinstance(e, mx.DeployModel):
            return [DeviceStep("deploy", e.target, e.options(), ModelSpec.of(e.model), e.target_kind)]
        if isinstance(e, mx.RollbackModel):
            return [DeviceStep("rollback", e.target, {}, ModelSpec.of(e.model), e.target_kind)]
        if isinstance(e, mx.CreateJob):
            return [JobStep("create", e.name, e.options(), e.notebook, e.body, replace=bool(e.args.get("replace")),
                            exists=bool(e.args.get("exists")))]
        if isinstance(e, mx.ShowJobs):
            return [JobStep("show")]
        if isinstance(e, mx.DescribeJob):
            return [JobStep("describe", e.name)]
        if isinstance(e, mx.DropJob):
            return [JobStep("drop", e.name, exists=bool(e.args.get("exists")))]
        if isinstance(e, mx.RunJob):
            return [JobStep("run", e.name)]
        if isinstance(e, mx.AlterJob):
            return [JobStep(e.args["action"].lower(), e.name)]
        steps, tree = self._lift_ml_functions(e.copy())
        steps.append(QueryStep(tree.sql("duckdb"), stmt.line))
        return steps

    def _lift_ml_functions(self, tree: exp.Expression) -> tuple[list, exp.Expression]:
        """Replace each ML table function (innermost first) by a temp relation name."""
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
                    input_sql=self._input_sql(node, tree),
                    settings=node.settings(),
                    output=name,
                    args=[_literal(a) for a in node.args_list],
                )
            )
            mx.replace_with_table(node, name)
        return steps, tree

    @staticmethod
    def _input_sql(node, tree: exp.Expression) -> str | None:
        exp, _ = _sqlglot()
        src = node.input
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
        return query.sql("duckdb")


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


def _has_ml(e: exp.Expression) -> bool:
    _, mx = _sqlglot()
    nodes = tuple(getattr(mx, n) for n in ("MLFunction", "CreateModel", "ModelRef") if hasattr(mx, n))
    return isinstance(e, mx.Explain) or any(isinstance(n, nodes) for n in e.walk())


def _literal(a) -> Any:
    from mlsql.language.options import read_literal

    exp, _ = _sqlglot()
    return read_literal(a) if isinstance(a, exp.Expression) else a

"""MLSQL's syntax-tree nodes: the ML statements and table functions on top of DuckDB SQL.

Every node is a ``sqlglot`` expression, so a parsed script is one ordinary tree
that sqlglot's tools (walk, find_all, transform, generate) understand. The
helpers on each node turn its parts into Python values for the planner.
"""

from __future__ import annotations

from typing import Any

from sqlglot import exp

from mlsql.language.options import (
    read_literal as to_python,  # the one reader of SQL literals (options, settings, SET)
)


class MLNode:
    """Marker base: a tree holding any MLNode is an ML statement."""


def options_dict(options: list[exp.Expression] | None) -> dict[str, Any]:
    """``OPTIONS (a = 1, b = 'x')`` → ``{'a': 1, 'b': 'x'}``; names lower-cased."""
    out: dict[str, Any] = {}
    for o in options or []:
        out[o.this.name.lower()] = to_python(o.expression)
    return out


def _name_of(e: exp.Expression | None) -> str:
    if e is None:
        return ""
    if isinstance(e, exp.Literal):
        return e.this
    return e.name


class ModelRef(MLNode, exp.Expression):
    """``m``, ``m@3`` or ``m@champion``."""

    arg_types = {"this": True, "version": False, "alias": False}

    @property
    def name(self) -> str:
        ident = self.this
        return ident.this if ident.quoted else ident.this.lower()

    @property
    def version(self) -> int | None:
        v = self.args.get("version")
        return int(v) if v is not None else None

    @property
    def alias(self) -> str | None:
        return self.args.get("alias")

    @property
    def ref(self) -> str:
        tail = f"@{self.version}" if self.version is not None else (f"@{self.alias}" if self.alias else "")
        return self.name + tail


class CreateModel(MLNode, exp.Expression):
    """``CREATE [OR REPLACE] MODEL [IF NOT EXISTS] m [TRANSFORM (...)] [OPTIONS (...)] AS query``."""

    arg_types = {"this": True, "replace": False, "exists": False, "transform": False,
                 "options": False, "query": False}  # no query: an imported model (model_path)

    @property
    def model(self) -> ModelRef:
        return self.this

    @property
    def transform(self) -> list[exp.Expression] | None:
        return self.args.get("transform") or None

    @property
    def query(self) -> exp.Expression | None:
        return self.args.get("query")

    def options(self) -> dict[str, Any]:
        return options_dict(self.args.get("options"))


class MLFunction(MLNode, exp.Expression):
    """``ML.<FUNC>(MODEL m [, TABLE t | (query)] [, STRUCT(...)])`` used as a table."""

    arg_types = {"this": True, "model": False, "input": False, "study": False, "settings": False, "expressions": False}

    @property
    def func(self) -> str:
        return self.this.upper()

    @property
    def model(self) -> ModelRef | None:
        return self.args.get("model")

    @property
    def input(self) -> exp.Expression | None:
        return self.args.get("input")

    @property
    def study(self) -> exp.Expression | None:
        """The second input of a function that compares two (``ML.VALIDATE_DATA_DRIFT``'s study rows)."""
        return self.args.get("study")

    def settings(self) -> dict[str, Any]:
        s = self.args.get("settings")
        v = to_python(s) if s is not None else {}
        return v if isinstance(v, dict) else {}

    @property
    def args_list(self) -> list[exp.Expression]:
        return list(self.args.get("expressions") or [])


def replace_with_table(node: MLFunction, name: str) -> None:
    """Swap an ML table function in its tree for a plain reference to relation ``name``."""
    parent = node.parent
    if isinstance(parent, exp.Table) and parent.this is node:
        parent.set("this", exp.to_identifier(name))
        parent.set("db", None)
        parent.set("catalog", None)
    else:  # used as an expression (e.g. in a scalar subquery's FROM-less position)
        node.replace(exp.select("*").from_(name).subquery())


class ShowModels(MLNode, exp.Expression):
    arg_types: dict[str, bool] = {}


class ShowDevices(MLNode, exp.Expression):
    arg_types: dict[str, bool] = {}


class ShowDeployments(MLNode, exp.Expression):
    arg_types: dict[str, bool] = {}


class ShowJobs(MLNode, exp.Expression):
    arg_types: dict[str, bool] = {}


class ShowAlerts(MLNode, exp.Expression):
    arg_types: dict[str, bool] = {}


class DescribeModel(MLNode, exp.Expression):
    arg_types = {"this": True}

    @property
    def model(self) -> ModelRef:
        return self.this


class DropModel(MLNode, exp.Expression):
    arg_types = {"this": True, "exists": False}

    @property
    def model(self) -> ModelRef:
        return self.this


class _Named(MLNode, exp.Expression):
    """A statement about a named object (device, group, job) given as identifier or string."""

    arg_types = {"this": True, "exists": False, "options": False}

    @property
    def name(self) -> str:
        return _name_of(self.this)

    def options(self) -> dict[str, Any]:
        return options_dict(self.args.get("options"))


class DropDevice(_Named):
    pass


class DropDeviceGroup(_Named):
    pass


class DropJob(_Named):
    pass


class CreateDevice(_Named):
    arg_types = {"this": True, "replace": False, "exists": False, "options": False}


class CreateDeviceGroup(_Named):
    arg_types = {"this": True, "replace": False, "exists": False, "options": False}


class CreateJob(_Named):
    """``CREATE JOB j OPTIONS (...) AS NOTEBOOK 'path'`` or ``... AS (<statements>)``."""

    arg_types = {"this": True, "replace": False, "exists": False, "options": False, "notebook": False, "body": False}

    @property
    def notebook(self) -> str | None:
        nb = self.args.get("notebook")
        return _name_of(nb) if nb is not None else None

    @property
    def body(self) -> str | None:
        b = self.args.get("body")
        return b.this if b is not None else None


class DescribeJob(_Named):
    pass


class RunJob(_Named):
    pass


class AlterJob(_Named):
    arg_types = {"this": True, "action": True}


class CreateAlert(_Named):
    """``CREATE ALERT a OPTIONS (every = ..., notify = [...]) AS (<query>)``: fires when the query returns rows."""

    arg_types = {"this": True, "replace": False, "exists": False, "options": False, "body": True}

    @property
    def body(self) -> str:
        return self.args["body"].this


class DropAlert(_Named):
    pass


class DescribeAlert(_Named):
    pass


class CheckAlert(_Named):
    """``CHECK ALERT a``: run the alert's check now (query, notification, history row) and wait."""


class CreateFeatureView(_Named):
    """``CREATE [OR REPLACE] FEATURE VIEW [IF NOT EXISTS] v OPTIONS (key = ..., time_col = ..., ttl = ...)
    AS SELECT ... WINDOW ...``: window aggregates over an event table, compiled to a view spec
    (mlsql.language.feature_views)."""

    arg_types = {"this": True, "replace": False, "exists": False, "options": False, "query": True}

    @property
    def query(self) -> exp.Expression:
        return self.args["query"]

    def options(self) -> dict[str, Any]:
        # ttl = INTERVAL 30 DAYS: the options table reads durations as text ('30 days')
        out = {}
        for o in self.args.get("options") or []:
            v = o.expression
            out[o.this.name.lower()] = interval_text(v) if isinstance(v, exp.Interval) else to_python(v)
        return out


def interval_text(node: exp.Interval) -> str:
    """``INTERVAL 30 DAYS`` / ``INTERVAL '30' DAY`` / ``INTERVAL '90 minutes'`` → ``'30 days'``."""
    value = node.this.name if node.this is not None else ""
    unit = node.args.get("unit")
    return f"{value} {unit.name}".strip() if unit is not None else value


class ShowFeatureViews(MLNode, exp.Expression):
    arg_types: dict[str, bool] = {}


class DescribeFeatureView(_Named):
    pass


class DropFeatureView(_Named):
    pass


class Explain(MLNode, exp.Expression):
    arg_types = {"this": True}


class SetVariable(MLNode, exp.Expression):
    """``SET name = value``: a script variable (``${name}``), the engine, or a DuckDB setting."""

    arg_types = {"this": True, "expression": True}

    @property
    def name(self) -> str:
        return self.this.name

    @property
    def value(self) -> Any:
        return to_python(self.expression)


class ExportModel(MLNode, exp.Expression):
    arg_types = {"this": True, "options": False}

    @property
    def model(self) -> ModelRef:
        return self.this

    def options(self) -> dict[str, Any]:
        return options_dict(self.args.get("options"))


class DeployModel(MLNode, exp.Expression):
    """``DEPLOY MODEL m[@v] TO DEVICE 'd' | GROUP 'g' [OPTIONS (...)]``."""

    arg_types = {"this": True, "kind": True, "target": True, "options": False}

    @property
    def model(self) -> ModelRef:
        return self.this

    @property
    def target_kind(self) -> str:
        return self.args["kind"]

    @property
    def target(self) -> str:
        return _name_of(self.args["target"])

    def options(self) -> dict[str, Any]:
        return options_dict(self.args.get("options"))


class RollbackModel(MLNode, exp.Expression):
    """``ROLLBACK MODEL m ON DEVICE 'd' | GROUP 'g'``."""

    arg_types = {"this": True, "kind": True, "target": True}

    @property
    def model(self) -> ModelRef:
        return self.this

    @property
    def target_kind(self) -> str:
        return self.args["kind"]

    @property
    def device(self) -> str:
        return _name_of(self.args["target"])

    target = device





class CreateExperiment(_Named):
    """``CREATE EXPERIMENT e ON GROUP 'g' OPTIONS (arms = [...], ...)``: an A/B experiment on a device group."""

    arg_types = {"this": True, "group": True, "options": False}

    @property
    def group(self) -> str:
        return _name_of(self.args["group"])


class StopExperiment(_Named):
    """``STOP EXPERIMENT e [PROMOTE 'm@v']``."""

    arg_types = {"this": True, "promote": False}

    @property
    def promote(self) -> str | None:
        p = self.args.get("promote")
        return _name_of(p) if p is not None else None


class ShowExperiments(MLNode, exp.Expression):
    arg_types: dict[str, bool] = {}

"""Feature views: ``CREATE/SHOW/DESCRIBE/DROP FEATURE VIEW`` and ``ML.FEATURES_AT``.

A view is stored as its spec (mlsql.language.feature_views), one JSON file per view in the
workspace's ``feature_views/`` folder, written whole and renamed into place: every session and
process on the workspace sees the same views, and a failed CREATE leaves the old one as it was.
``ML.FEATURES_AT`` runs one engine query written from the spec (mlsql.plan.feature_sql).
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from mlsql._lazy import pyarrow as pa
from mlsql.errors import (
    EngineError,
    FeatureViewError,
    MLSQLError,
    UnknownColumnError,
    UnknownFeatureViewError,
    UnknownTableError,
)
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.steps import SessionState

if TYPE_CHECKING:
    from mlsql.workspace import Workspace

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


# -- the store ------------------------------------------------------------------------------------
def _path(ws: Workspace, name: str):
    return ws.feature_views_dir / f"{name.lower()}.json"


def view_names(ws: Workspace) -> list[str]:
    d = ws.feature_views_dir
    return sorted(p.stem for p in d.glob("*.json")) if d.exists() else []


def load_view(ws: Workspace, name: str) -> dict:
    """The spec of feature view ``name``, or an error naming the nearest view."""
    path = _path(ws, str(name))
    if not _NAME.match(str(name)) or not path.exists():
        raise UnknownFeatureViewError(
            str(name), view_names(ws), hint=None if view_names(ws) else "Create one with CREATE FEATURE VIEW."
        )
    return json.loads(path.read_text())["spec"]


def _save(ws: Workspace, spec: dict) -> None:
    ws.feature_views_dir.mkdir(parents=True, exist_ok=True)
    path = _path(ws, spec["name"])
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    tmp.write_text(json.dumps({"created": created, "spec": spec}, indent=1))
    os.replace(tmp, path)


# -- statements -----------------------------------------------------------------------------------
def feature_view_step(s: SessionState, step: P.FeatureViewStep) -> Result:
    return {"create": _create, "show": _show, "describe": _describe, "drop": _drop}[step.action](s, step)


def _create(s: SessionState, step: P.FeatureViewStep) -> Result:
    from mlsql.language.feature_views import compile_view, event_table
    from mlsql.language.positions import extent

    name = step.name
    if not _NAME.match(name):
        raise FeatureViewError(f"Feature view name '{name}': letters, digits and '_', starting with a letter")
    if _path(s.workspace, name).exists():
        if step.exists:
            return Result(pa.table({}), message=f"Feature view {name} already exists; nothing changed.")
        if not step.replace:
            raise FeatureViewError(
                f"Feature view '{name}' already exists",
                hint=f"Use CREATE OR REPLACE FEATURE VIEW {name}, or DROP FEATURE VIEW {name}.",
            )
    table_node = event_table(step.query)
    if table_node is None:  # not one table: the compiler names what it is instead
        compile_view(name, step.query, step.options, [], table="", sql=step.statement, start=step.start)
        raise FeatureViewError(f"CREATE FEATURE VIEW {name}: a feature view reads one event table")
    table = table_node.sql("duckdb")
    try:
        schema = s.engine.query(f"SELECT * FROM {table} LIMIT 0").schema
    except (EngineError, UnknownTableError):
        err = UnknownTableError(
            table_node.name,
            s.engine.table_names(),
            message=f"CREATE FEATURE VIEW {name}: no event table '{table}'",
        )
        err.at = extent(table_node)
        raise err from None
    spec = compile_view(
        name,
        step.query,
        step.options,
        [(f.name, str(f.type)) for f in schema],
        table=table,
        sql=step.statement,
        start=step.start,
    )
    _save(s.workspace, spec)
    feats = ", ".join(f["name"] for f in spec["features"])
    return Result(pa.table({}), message=f"Created feature view {name} over {table}: {feats}.")


def _show(s: SessionState, step: P.FeatureViewStep) -> Result:
    rows = []
    for n in view_names(s.workspace):
        doc = json.loads(_path(s.workspace, n).read_text())
        spec = doc["spec"]
        rows.append(
            {
                "feature_view": spec["name"],
                "table": spec["table"],
                "key": spec["key"],
                "time_col": spec["time_col"],
                "ttl": _duration(spec["ttl_us"]),
                "features": [f["name"] for f in spec["features"]],
                "created": doc.get("created", ""),
            }
        )
    schema = pa.schema(
        [
            ("feature_view", pa.string()),
            ("table", pa.string()),
            ("key", pa.string()),
            ("time_col", pa.string()),
            ("ttl", pa.string()),
            ("features", pa.list_(pa.string())),
            ("created", pa.string()),
        ]
    )
    return Result(pa.Table.from_pylist(rows, schema=schema), kind="show")


def _describe(s: SessionState, step: P.FeatureViewStep) -> Result:
    """One row per feature: its aggregate, argument, filter, window and type; the view's own
    properties in the message."""
    from mlsql.language.feature_views import describe_expr

    spec = load_view(s.workspace, step.name)
    rows = [
        {
            "feature": f["name"],
            "agg": f["agg"],
            "arg": describe_expr(f["arg"]) or "*",
            "filter": describe_expr(f["filter"]) or None,
            "window": _duration(f["window_us"]),
            "window_us": int(f["window_us"]),
            "type": f["type"],
        }
        for f in spec["features"]
    ]
    schema = pa.schema(
        [
            ("feature", pa.string()),
            ("agg", pa.string()),
            ("arg", pa.string()),
            ("filter", pa.string()),
            ("window", pa.string()),
            ("window_us", pa.int64()),
            ("type", pa.string()),
        ]
    )
    msg = (
        f"Feature view {spec['name']} over {spec['table']}: key {spec['key']}, time {spec['time_col']}, "
        f"ttl {_duration(spec['ttl_us'])}."
    )
    return Result(pa.Table.from_pylist(rows, schema=schema), kind="describe", message=msg)


def _drop(s: SessionState, step: P.FeatureViewStep) -> Result:
    path = _path(s.workspace, step.name)
    if not _NAME.match(step.name) or not path.exists():
        if step.exists:
            return Result(pa.table({}), message=f"Feature view {step.name} does not exist; nothing dropped.")
        load_view(s.workspace, step.name)  # the error, with the nearest name
    path.unlink()
    return Result(pa.table({}), message=f"Dropped feature view {step.name}.")


def _duration(us: int) -> str:
    for unit, n in (
        ("days", 86_400_000_000),
        ("hours", 3_600_000_000),
        ("minutes", 60_000_000),
        ("seconds", 1_000_000),
    ):
        if us % n == 0:
            return f"{us // n} {unit if us // n != 1 else unit[:-1]}"
    return f"{us} microseconds"


# -- ML.FEATURES_AT -------------------------------------------------------------------------------
AT_COLUMN = "at"


def features_at(c) -> pa.Table:
    """``ML.FEATURES_AT(view, (probes))``: each probe row (in its order) with the view's features
    as of its ``at`` column, by one engine query (mlsql.plan.feature_sql). ``c``: the call
    (mlsql.runtime.steps.ml_functions.Call, which imports this module)."""
    import sqlglot
    from sqlglot import exp

    from mlsql.plan.feature_sql import features_at_sql

    s, step = c.s, c.step
    if len(step.args) != 1 or not isinstance(step.args[0], str) or step.input is None:
        raise MLSQLError(
            "ML.FEATURES_AT takes a feature view and the probe rows: "
            "ML.FEATURES_AT(my_view, (SELECT <key>, <time> AS at, ... FROM ...))"
        )
    # the spec a model was trained on, when its training rows are read again (export), else the workspace's
    spec = c.settings.get("view_spec") or load_view(s.workspace, step.args[0])
    dialect = s.engine.dialect
    if dialect not in ("duckdb", "spark"):
        raise MLSQLError(f"ML.FEATURES_AT runs on DuckDB and Spark, not on the {s.engine.name} engine")
    params = P.params_for(step.input, c.params)
    head = exp.select("*").from_(step.input.copy().subquery("__q")).limit(0)
    probe_schema = s.engine.query(head, params).schema
    cols = list(probe_schema.names)
    by_lower = {n.lower(): n for n in cols}
    for want in (spec["key"], AT_COLUMN):
        if want.lower() not in by_lower:
            what = "the view's key" if want == spec["key"] else "the time to compute the features at"
            err = UnknownColumnError(
                want,
                cols,
                message=(
                    f"ML.FEATURES_AT({spec['name']}, ...): the probe rows have no column '{want}' ({what})"
                ),
                hint=f"Select it, e.g. (SELECT {spec['key']}, ts AS at, ... FROM ...).",
            )
            err.function = "FEATURES_AT"
            raise err
    taken = [f["name"] for f in spec["features"] if f["name"].lower() in by_lower]
    if taken:
        raise MLSQLError(
            f"ML.FEATURES_AT({spec['name']}, ...): the probe rows already have a column "
            f"'{taken[0]}', a feature of the view",
            hint="Leave it out of the probe rows, or rename it there.",
        )
    at_col = by_lower[AT_COLUMN]
    at_type = probe_schema.field(at_col).type
    micros = pa.types.is_integer(at_type)
    if not (micros or pa.types.is_timestamp(at_type)):
        raise MLSQLError(
            f"ML.FEATURES_AT: the probe column '{at_col}' is {at_type}; it must be a TIMESTAMP "
            "(or whole microseconds since the epoch)"
        )
    events = s.engine.render(sqlglot.parse_one(f"SELECT * FROM {spec['table']}", read="duckdb"))
    probes = s.engine.render(step.input)
    sql = features_at_sql(
        spec,
        events=events,
        probes=probes,
        probe_columns=cols,
        key=by_lower[spec["key"].lower()],
        at=at_col,
        at_is_micros=micros,
        dialect=dialect,
    )
    kw = {"dialect": "spark"} if dialect == "spark" else {}
    return s.engine.query(sql, params, **kw)

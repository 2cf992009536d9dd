"""The alert statements: CREATE / SHOW / DESCRIBE / DROP / CHECK ALERT and ML.ALERT_HISTORY.

The alerts themselves (store, check, notification) are :mod:`mlsql.jobs.alerts`; this module
turns a planned :class:`mlsql.plan.planner.AlertStep` into a call there and its answer into a Result.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from mlsql.errors import AlertError
from mlsql.output.result import Result

if TYPE_CHECKING:
    from mlsql.plan.planner import AlertStep
    from mlsql.workspace import Workspace

_TS = pa.timestamp("us", tz="UTC")
HISTORY_SCHEMA = pa.schema([
    ("alert", pa.string()), ("check_id", pa.string()), ("trigger", pa.string()), ("checked_at", _TS),
    ("duration_s", pa.float64()), ("status", pa.string()), ("rows", pa.int64()), ("fired", pa.bool_()),
    ("notified", pa.bool_()), ("attempts", pa.int32()), ("error", pa.string()), ("preview", pa.string()),
])
ALERTS_SCHEMA = pa.schema([
    ("alert", pa.string()), ("every", pa.string()), ("notify", pa.list_(pa.string())), ("next_check", _TS),
    ("last_checked", _TS), ("last_status", pa.string()), ("last_fired", _TS), ("fired_count", pa.int64()),
    ("last_error", pa.string()),
])


def run_alert_step(workspace: Workspace, step: AlertStep) -> Result:
    from mlsql.jobs.alerts import AlertStore

    store = AlertStore(workspace)
    a = step.action
    if a == "create":
        return _create(store, step)
    if a == "show":
        return Result(alerts_table(store), kind="show")
    if a == "describe":
        return Result(_describe(store, step.name), kind="describe")
    if a == "drop":
        dropped = store.drop(step.name, if_exists=step.exists)
        return Result(pa.table({}), message=f"Dropped alert {step.name} and its check history." if dropped
                      else f"Alert {step.name} does not exist; nothing dropped.")
    if a == "check":
        return _check_now(workspace, store, step.name)
    raise AssertionError(a)


def alert_history_table(workspace: Workspace, args: list) -> pa.Table:
    """``ML.ALERT_HISTORY(['name'])``: one row per check, newest first (of one alert, or of all)."""
    from mlsql.jobs.alerts import AlertStore

    if len(args) > 1 or (args and not isinstance(args[0], str)):
        raise AlertError("ML.ALERT_HISTORY takes one alert name, or none for every alert: "
                         "ML.ALERT_HISTORY('low_accuracy')")
    return history_table(AlertStore(workspace).checks(args[0] if args else None, limit=1000))


def history_table(checks) -> pa.Table:
    rows = []
    for c in checks:
        rows.append({"alert": c.alert, "check_id": c.check_id, "trigger": c.trigger, "checked_at": c.checked_at,
                     "duration_s": (c.finished_at - c.checked_at).total_seconds() if c.finished_at else None,
                     "status": c.status, "rows": c.rows, "fired": c.fired, "notified": c.notified,
                     "attempts": c.attempts, "error": c.error, "preview": c.preview})
    return pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)


def alerts_table(store, specs=None) -> pa.Table:
    from mlsql.jobs.alerts import mask_url
    from mlsql.jobs.options import format_duration

    rows = []
    for s in store.list() if specs is None else specs:
        summary = store.summary(s.name)
        rows.append({"alert": s.name, "every": format_duration(s.options["every"]), "notify": [mask_url(u) for u in s.options["notify"]],
                     "next_check": store.next_check_time(s), **summary})
    return pa.Table.from_pylist(rows, schema=ALERTS_SCHEMA)


def _create(store, step: AlertStep) -> Result:
    from mlsql.jobs.alerts import AlertSpec, resolve_alert_options

    options = resolve_alert_options(step.options)
    _check_query(step.body)  # a syntax error, or a statement that is not a query, fails CREATE ALERT
    spec = AlertSpec(name=step.name, query=step.body.strip(), options=options,
                     created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    made = store.create(spec, replace=step.replace, if_not_exists=step.exists)
    if made is None:
        return Result(pa.table({}), message=f"Alert {step.name} already exists; nothing changed.")
    nxt = store.next_check_time(made)
    return Result(alerts_table(store, [made]), kind="show", message=(
        f"Created alert {made.name} ({made.every_text}); first check {_when(nxt)}. The scheduler checks it "
        f"(inside JupyterLab started with make lab, or mlsql scheduler in a shell); CHECK ALERT {made.name} "
        "checks it now."))


def _check_now(workspace, store, name: str) -> Result:
    from mlsql.jobs.alerts import check_alert

    c = check_alert(workspace, store.get(name), trigger="manual")
    table = history_table([c])
    if c.status == "ok":
        msg = f"Alert {name}: its query returned no rows; nothing sent."
    elif c.status == "skipped":
        msg = f"Alert {name} not checked: {c.error}"
    elif c.status == "cooldown":
        msg = f"Alert {name} fired ({c.rows} rows), within its cooldown: recorded, not sent."
    else:
        what = (f"fired ({c.rows} row{'s' if c.rows != 1 else ''})" if c.status == "fired"
                else "could not be checked: its query failed")
        sent = (f"notified in {c.attempts} attempt{'s' if c.attempts != 1 else ''}" if c.notified
                else "NOT notified")
        msg = f"Alert {name} {what}; {sent}." + (f"\n{c.error}" if c.error else "")
    return Result(table, kind="alert", message=msg)


def _check_query(body: str) -> None:
    import duckdb
    from sqlglot import exp

    from mlsql.errors import ParseError
    from mlsql.language.dialect import parse_script

    stmts = parse_script(body)
    if len(stmts) != 1:
        raise AlertError(f"An alert's AS ( ... ) holds one query, got {len(stmts)} statements",
                         hint="Write AS (SELECT ... ) with the rows that should fire the alert.")
    st = stmts[0]
    if st.expression is None:  # plain SQL sqlglot could not read: ask DuckDB's own parser
        try:
            parsed = duckdb.extract_statements(st.sql)
        except duckdb.Error as exc:
            raise ParseError(f"In the alert's query: {str(exc).splitlines()[0]}", sql=body) from None
        is_query = all(p.type == duckdb.StatementType.SELECT for p in parsed)
    else:
        is_query = isinstance(st.expression, exp.Query)
    if not is_query:
        raise AlertError("An alert's AS ( ... ) must be a query (SELECT, WITH, FROM ...): it fires when the query "
                         "returns rows", hint="Put statements that change data in a job (CREATE JOB).")


def _describe(store, name: str) -> pa.Table:
    from mlsql.jobs.alerts import mask_url

    s = store.get(name)
    props = [("alert", s.name), ("query", s.query), ("every", s.every_text),
             ("next_check", _when(store.next_check_time(s))), ("created_at", s.created_at)]
    for k, v in sorted(s.options.items()):
        if v is None or k == "every":
            continue
        if k == "notify":
            v = [mask_url(u) for u in v]
        props.append((f"option.{k}", json.dumps(v) if not isinstance(v, str) else v))
    props += [(k, "" if v is None else str(v)) for k, v in store.summary(name).items()]
    return pa.table({"property": [p[0] for p in props], "value": [str(p[1]) for p in props]})


def _when(t: datetime | None) -> str:
    return "none (paused)" if t is None else t.isoformat(sep=" ", timespec="seconds")

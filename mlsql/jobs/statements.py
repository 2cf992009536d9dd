"""The job statements: CREATE / SHOW / DESCRIBE / DROP / RUN / ALTER JOB and ML.JOB_RUNS.

The jobs themselves (store, runner, scheduler) are :mod:`mlsql.jobs`; this module turns a
planned :class:`mlsql.plan.planner.JobStep` into a call there and its answer into a Result.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from mlsql.errors import JobError
from mlsql.output.result import Result

if TYPE_CHECKING:
    from mlsql.plan.planner import JobStep
    from mlsql.workspace import Workspace

RUN_SCHEMA = pa.schema([
    ("job", pa.string()), ("run_id", pa.string()), ("attempt", pa.int32()), ("trigger", pa.string()),
    ("start", pa.timestamp("us", tz="UTC")), ("end", pa.timestamp("us", tz="UTC")), ("duration_s", pa.float64()),
    ("status", pa.string()), ("error", pa.string()), ("output_path", pa.string()),
])


def run_job_step(workspace: Workspace, step: JobStep) -> Result:
    from mlsql.jobs import JobStore

    store = JobStore(workspace)
    a = step.action
    if a == "create":
        return _create(store, step)
    if a == "show":
        return Result(_jobs_table(store), kind="show")
    if a == "describe":
        return Result(_describe(store, step.name), kind="describe")
    if a == "drop":
        dropped = store.drop(step.name, if_exists=step.exists)
        return Result(pa.table({}), message=f"Dropped job {step.name} and its run history; executed notebooks stay "
                      f"in {workspace.root / 'jobs' / step.name}."
                      if dropped else f"Job {step.name} does not exist; nothing dropped.")
    if a in ("pause", "resume"):
        spec = store.set_paused(step.name, a == "pause")
        nxt = store.next_run_time(spec)
        return Result(_jobs_table(store, [spec]), kind="show",
                      message=f"Job {spec.name} is paused." if spec.paused
                      else f"Job {spec.name} is resumed; next run {_when(nxt)}.")
    if a == "run":
        return _run_now(workspace, store, step.name)
    raise AssertionError(a)


def job_runs_table(workspace: Workspace, args: list) -> pa.Table:
    """``ML.JOB_RUNS('name')``: the job's runs, newest first."""
    from mlsql.jobs import JobStore

    if len(args) != 1 or not isinstance(args[0], str):
        raise JobError("ML.JOB_RUNS takes one job name: ML.JOB_RUNS('nightly')")
    return runs_table(JobStore(workspace).runs(args[0]))


def runs_table(runs) -> pa.Table:
    rows = []
    for r in runs:
        end = r.end
        rows.append({"job": r.job, "run_id": r.run_id, "attempt": r.attempt, "trigger": r.trigger,
                     "start": r.start, "end": end,
                     "duration_s": (end - r.start).total_seconds() if end is not None else None,
                     "status": r.status, "error": r.error, "output_path": r.output_path})
    return pa.Table.from_pylist(rows, schema=RUN_SCHEMA)


def _create(store, step: JobStep) -> Result:
    from mlsql.jobs import JobSpec, resolve_job_options

    options = resolve_job_options(step.options)
    if step.notebook is not None:
        path = Path(step.notebook).expanduser().resolve()
        if path.suffix != ".ipynb":
            raise JobError(f"AS NOTEBOOK '{step.notebook}' is not a notebook (.ipynb file)")
        if not path.is_file():
            raise JobError(f"Notebook '{step.notebook}' does not exist (looked for {path})",
                           hint="Paths are relative to the current directory (a notebook's own folder in Jupyter).")
        kind, target = "notebook", str(path)
    else:
        _check_syntax(step.body)  # a syntax error fails CREATE JOB, not the first run
        kind, target = "sql", step.body
    spec = JobSpec(name=step.name, kind=kind, target=target, options=options, paused=False,
                   created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    made = store.create(spec, replace=step.replace, if_not_exists=step.exists)
    if made is None:
        return Result(pa.table({}), message=f"Job {step.name} already exists; nothing changed.")
    nxt = store.next_run_time(made)
    return Result(_jobs_table(store, [made]), kind="show", message=(
        f"Created job {made.name} ({_schedule(made.options)}); next run {_when(nxt)}. The scheduler runs it "
        "(inside JupyterLab started with make lab, or mlsql scheduler in a shell)."))


def _run_now(workspace, store, name: str) -> Result:
    from mlsql.jobs import run_job

    spec = store.get(name)
    run = run_job(workspace, spec, trigger="manual")
    table = runs_table([run])
    took = table.column("duration_s")[0].as_py()
    if run.status != "succeeded":
        raise JobError(f"Job {name} {run.status.replace('_', ' ')} (run {run.run_id}, attempt {run.attempt})"
                       + (f": {run.error}" if run.error else ""),
                       hint=f"The executed notebook: {run.output_path}" if run.output_path else None)
    return Result(table, kind="job", message=(
        f"Job {name} succeeded in {took:.1f} s (run {run.run_id}); executed notebook {run.output_path}"))


def _check_syntax(body: str) -> None:
    import duckdb

    from mlsql.errors import ParseError
    from mlsql.language.dialect import parse_script

    for st in parse_script(body):
        if st.expression is None:  # plain SQL sqlglot could not read: ask DuckDB's own parser
            try:
                duckdb.extract_statements(st.sql)
            except duckdb.Error as exc:
                raise ParseError(f"In the job's statements, line {st.line}: {str(exc).splitlines()[0]}",
                                 sql=body) from None


def _jobs_table(store, specs=None) -> pa.Table:
    specs = store.list() if specs is None else specs
    rows = []
    for s in specs:
        last = _last(store, s.name)
        rows.append({"job": s.name, "kind": s.kind, "target": s.target if s.kind == "notebook" else _short(s.target),
                     "schedule": _schedule(s.options), "timezone": s.options.get("timezone"),
                     "paused": s.paused, "next_run": store.next_run_time(s),
                     "last_status": last.status if last else None, "last_start": last.start if last else None})
    schema = pa.schema([("job", pa.string()), ("kind", pa.string()), ("target", pa.string()),
                        ("schedule", pa.string()), ("timezone", pa.string()), ("paused", pa.bool_()),
                        ("next_run", pa.timestamp("us", tz="UTC")), ("last_status", pa.string()),
                        ("last_start", pa.timestamp("us", tz="UTC"))])
    return pa.Table.from_pylist(rows, schema=schema)


def _describe(store, name: str) -> pa.Table:
    s = store.get(name)
    props = [("job", s.name), ("kind", s.kind), ("target", s.target), ("schedule", _schedule(s.options)),
             ("paused", str(s.paused)), ("next_run", _when(store.next_run_time(s))), ("created_at", s.created_at)]
    props += [(f"option.{k}", json.dumps(v) if not isinstance(v, str) else v)
              for k, v in sorted(s.options.items()) if v is not None]
    r = _last(store, name)
    if r is not None:
        props += [("last_run", r.run_id), ("last_status", r.status), ("last_start", str(r.start)),
                  ("last_error", r.error or ""), ("last_output", r.output_path or "")]
    return pa.table({"property": [p[0] for p in props], "value": [str(p[1]) for p in props]})


def _last(store, name: str):
    """The run a user means by "last": one in progress if there is one (a schedule faster than the
    job records 'skipped' runs after it), else the newest record."""
    running = store.running(name)
    if running:
        return running[0]
    runs = store.runs(name, limit=1)
    return runs[0] if runs else None


def _schedule(options: dict) -> str:
    if options.get("schedule"):
        return f"cron '{options['schedule']}'"
    every = options.get("every")
    if every is None:
        return "manual"
    return f"every {_duration(float(every))}"


def _duration(s: float) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if s >= size and s % size == 0:
            n = int(s // size)
            return f"{n} {unit}{'s' if unit == 'day' and n > 1 else ''}"
    return f"{s:g} s"


def _when(t: datetime | None) -> str:
    return "none (paused)" if t is None else t.isoformat(sep=" ", timespec="seconds")


def _short(text: str, n: int = 60) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"

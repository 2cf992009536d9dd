"""``mlsql scheduler`` and ``mlsql jobs ...``: the shell side of scheduled jobs (argparse is in mlsql.cli)."""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from datetime import datetime

from mlsql.errors import MLSQLError


def main(args) -> int:
    try:
        if args.command == "scheduler":
            return _scheduler(args)
        if args.action is None:
            print("usage: mlsql jobs {list,show,runs,run,pause,resume,drop,export} ... (mlsql jobs --help)",
                  file=sys.stderr)
            return 2
        return _jobs(args)
    except MLSQLError as exc:
        print(f"mlsql: error: {exc}", file=sys.stderr)
        return 1


def _log_to_stderr() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    logging.getLogger("mlsql.jobs").setLevel(logging.INFO)


def _scheduler(args) -> int:
    from mlsql.jobs.scheduler import Scheduler
    from mlsql.workspace import Workspace

    _log_to_stderr()
    ws = Workspace.open(args.workspace)
    Scheduler(ws, who=f"mlsql scheduler --workspace {ws.root}").run_forever()
    return 0


def _jobs(args) -> int:
    from mlsql.jobs.store import JobStore
    from mlsql.workspace import Workspace

    ws = Workspace.open(args.workspace)
    store = JobStore(ws)
    action = args.action
    if action == "list":
        _print_list(ws, store)
    elif action == "show":
        _print_show(ws, store, store.get(args.name))
    elif action == "runs":
        _print_runs(store.runs(args.name, limit=args.limit))
    elif action == "run":
        from mlsql.jobs.runner import run_job

        _log_to_stderr()
        run = run_job(ws, args.name, trigger="manual")
        _print_runs([run])
        if run.status != "succeeded":
            print(f"mlsql: job {run.job} {run.status.replace('_', ' ')}: {run.error}", file=sys.stderr)
            return 1
    elif action in ("pause", "resume"):
        spec = store.set_paused(args.name, action == "pause")
        print(f"Job {spec.name} {'paused' if spec.paused else 'resumed'}")
    elif action == "drop":
        if store.drop(args.name, if_exists=args.if_exists):
            print(f"Dropped job {args.name}")
        else:
            print(f"No job {args.name}")
    elif action == "export":
        from mlsql.jobs.export import airflow_dag, papermill_command

        spec = store.get(args.name)
        print(airflow_dag(ws, spec) if args.format == "airflow" else papermill_command(ws, spec))
    return 0


def alerts_main(args) -> int:
    """``mlsql alerts list | check NAME | history NAME | drop NAME``."""
    from mlsql.jobs.alerts import AlertStore, check_alert, mask_url
    from mlsql.jobs.options import format_duration
    from mlsql.workspace import Workspace

    try:
        ws = Workspace.open(args.workspace)
        store = AlertStore(ws)
        if args.action == "list":
            specs = store.list()
            if not specs:
                print("No alerts in this workspace (CREATE ALERT makes one: see docs/JOBS.md)")
            else:
                rows = []
                for s in specs:
                    m = store.summary(s.name)
                    err = (m["last_error"] or "").strip().splitlines()
                    rows.append([s.name, format_duration(s.options["every"]),
                                 ", ".join(mask_url(u) for u in s.options["notify"]),
                                 f"{m['last_status']} {_when(m['last_checked'])}" if m["last_checked"] else "-",
                                 _when(m["last_fired"]), m["fired_count"], err[0][:80] if err else ""])
                _table(["name", "every", "notify", "last check", "last fired", "fired", "last error"], rows)
            _print_scheduler(ws)
        elif args.action == "check":
            _log_to_stderr()
            c = check_alert(ws, args.name, trigger="manual")
            _print_checks([c])
            if c.status == "query_failed" or (c.error and not c.notified):
                print(f"mlsql: alert {c.alert}: {c.error}", file=sys.stderr)
                return 1
        elif args.action == "history":
            _print_checks(store.checks(args.name, limit=args.limit))
        elif args.action == "drop":
            print(f"Dropped alert {args.name}" if store.drop(args.name, if_exists=args.if_exists)
                  else f"No alert {args.name}")
        return 0
    except MLSQLError as exc:
        print(f"mlsql: error: {exc}", file=sys.stderr)
        return 1


def _print_checks(checks) -> None:
    if not checks:
        print("No checks yet")
        return
    rows = []
    for c in checks:
        err = (c.error or "").strip().splitlines()
        rows.append([c.check_id, c.trigger, _when(c.checked_at), c.status, "-" if c.rows is None else c.rows,
                     "yes" if c.notified else "no", c.attempts, err[0][:80] if err else ""])
    _table(["check", "trigger", "checked", "status", "rows", "notified", "attempts", "error"], rows)


def scheduler_holder(ws) -> str | None:
    """Who schedules this workspace now ('' when its holder is unknown), or None when no one does.

    Peeks with a shared, non-blocking flock released at once, so it never waits or keeps
    a scheduler from starting for longer than the peek."""
    from mlsql.locks import FileLock

    lock = FileLock(ws.root / "scheduler.lock")
    if not lock.path.exists():
        return None
    fd = os.open(lock.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        h = lock.holder()
        return h.describe() if h else ""
    finally:
        os.close(fd)


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


def _print_list(ws, store) -> None:
    specs = store.list()
    if not specs:
        print("No jobs in this workspace (CREATE JOB makes one: see docs/JOBS.md)")
    else:
        rows = []
        for s in specs:
            last = store.runs(s.name, limit=1)
            rows.append([s.name, s.kind, s.schedule_text, "paused" if s.paused else "active",
                         _when(store.next_run_time(s)),
                         f"{last[0].status} {_when(last[0].start)}" if last else "-"])
        _table(["name", "kind", "schedule", "state", "next run", "last run"], rows)
    _print_scheduler(ws)


def _print_scheduler(ws) -> None:
    who = scheduler_holder(ws)
    if who is None:
        print("\nNo scheduler is running for this workspace: start one with `mlsql scheduler` "
              "(or JupyterLab with the mlsql.notebook.server extension).")
    else:
        print(f"\nScheduled by {who or 'another process'}.")


def _print_show(ws, store, spec) -> None:
    from mlsql.jobs.options import format_duration

    o = spec.options
    print(f"Job {spec.name}")
    fields = [
        ("kind", spec.kind),
        ("notebook" if spec.kind == "notebook" else "script", spec.target),
        ("schedule", spec.schedule_text),
        ("state", "paused" if spec.paused else "active"),
        ("next run", _when(store.next_run_time(spec))),
        ("parameters", o.get("parameters") or {}),
        ("timeout", format_duration(o.get("timeout")) if o.get("timeout") else "none"),
        ("retries", f"{o.get('retries', 0)} (backoff {format_duration(o.get('retry_backoff'))}, doubling)"),
        ("max_concurrent", o.get("max_concurrent", 1)),
        ("kernel", o.get("kernel") or "the notebook's own"),
        ("description", o.get("description") or "-"),
        ("created", spec.created_at),
    ]
    for k, v in fields:
        text = str(v)
        if "\n" in text:
            text = "\n" + "\n".join("    " + ln for ln in text.splitlines())
        print(f"  {k + ':':<16}{text}")
    _print_scheduler(ws)


def _print_runs(runs) -> None:
    if not runs:
        print("No runs yet")
        return
    rows = []
    for r in runs:
        took = "-" if r.duration_s is None else f"{r.duration_s:.1f}s"
        err = (r.error or "").strip().splitlines()
        rows.append([r.run_id, r.attempt, r.trigger, _when(r.start), took, r.status,
                     (err[0][:80] if err else "") or (r.output_path or "")])
    _table(["run", "attempt", "trigger", "start", "took", "status", "error / notebook"], rows)

"""Alerts: a query checked on a schedule that notifies when it returns rows (docs/JOBS.md, Alerts).

Definitions and check history live beside the jobs, in ``<workspace>/jobs.db``, and the job
scheduler checks them (:mod:`mlsql.jobs.scheduler`). A check runs the query through a real
MLSQL session on the workspace, in a process of its own (``python -m mlsql.runtime.alert_query``,
so a timeout can stop it and a crash cannot take the scheduler with it), then sends what it
found with apprise (https://github.com/caronc/apprise: JSON webhooks, mail, Slack, Teams and
dozens more, each named by a URL). A notification that fails is tried again, with a doubling
wait, up to ``retries`` times; every check, sent or not, is one history row with the error.

Light to import: apprise loads only when a notification is sent or a URL is checked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from mlsql.errors import AlertError, OptionError, UnknownAlertError, WorkspaceError
from mlsql.jobs.store import JobStore, _iso, _parse, utcnow
from mlsql.workspace import Workspace

log = logging.getLogger("mlsql.jobs")
POLL_S = 0.1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    query TEXT NOT NULL,
    options TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_checks (
    check_id TEXT PRIMARY KEY,
    alert TEXT NOT NULL COLLATE NOCASE,
    trigger TEXT NOT NULL,
    checked_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    rows INTEGER,
    fired INTEGER NOT NULL DEFAULT 0,
    notified INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    preview TEXT,
    pid INTEGER,
    host TEXT
);
CREATE INDEX IF NOT EXISTS alert_checks_by_alert ON alert_checks (alert, checked_at);
"""

# what a check ends as: the query returned no rows, returned rows (sent, or not sent within the
# cooldown), could not run; or did not run because another check of the alert was running
STATUSES = ("ok", "fired", "cooldown", "query_failed", "skipped", "running")


@dataclass
class AlertSpec:
    name: str
    query: str
    options: dict = field(default_factory=dict)
    paused: bool = False
    created_at: str = ""
    updated_at: str = ""

    @property
    def every_text(self) -> str:
        from mlsql.jobs.options import format_duration

        return f"every {format_duration(self.options.get('every'))}"


@dataclass
class AlertCheck:
    check_id: str
    alert: str
    trigger: str  # 'schedule' | 'manual'
    checked_at: datetime
    finished_at: datetime | None
    status: str  # one of STATUSES
    rows: int | None = None
    fired: bool = False
    notified: bool = False
    attempts: int = 0
    error: str | None = None
    preview: str | None = None  # JSON: the first max_rows rows, as objects


# -- options ---------------------------------------------------------------------------------------

def resolve_alert_options(raw: dict, *, check_urls: bool = True) -> dict:
    """Checked alert options (durations in seconds), every default filled in. With ``check_urls``,
    each notify URL must be one apprise can send to."""
    from mlsql.language.options import validate

    opts = validate("CREATE ALERT", raw, defaults=True)
    if check_urls:
        for url in opts["notify"]:
            if not _apprise_knows(url):
                err = OptionError(f"Option notify: {mask_url(url)!r} is not a URL apprise can send to",
                                  hint="Check the service's URL form in apprise's list "
                                       "(https://github.com/caronc/apprise/wiki): a JSON webhook is "
                                       "'json://host:port/path' ('jsons://' for https).")
                err.option, err.statement_kind = "notify", "CREATE ALERT"
                raise err
    return opts


def _apprise_knows(url: str) -> bool:
    import apprise

    return apprise.Apprise.instantiate(url, suppress_exceptions=True) is not None


_SECRET_KEYS = re.compile(r"(pass|token|key|secret|auth|sig|code|pw)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` fit to show: the password of ``user:password@``, query values that look like
    secrets, and (for a URL apprise knows) whatever apprise itself hides in the service's URL
    (a Slack or Discord token in the path) replaced by stars. Never the URL's secrets."""
    from urllib.parse import parse_qsl, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://****"
    query = parse_qsl(parts.query, keep_blank_values=True)
    shown = None
    try:
        import apprise

        plugin = apprise.Apprise.instantiate(url, suppress_exceptions=True)
        if plugin is not None:
            private = urlsplit(plugin.url(privacy=True))
            # apprise writes every setting out; keep only the query keys the user gave
            kept = {k for k, _ in query}
            pq = [(k, v) for k, v in parse_qsl(private.query, keep_blank_values=True) if k in kept]
            shown = private._replace(query="&".join(f"{k}={v}" for k, v in pq)).geturl()
    except ImportError:  # not installed: mask by hand below
        pass
    if shown is None:
        netloc = parts.netloc
        if "@" in netloc:
            user, host = netloc.rsplit("@", 1)
            netloc = (user.split(":", 1)[0] + ":****" if ":" in user else "****") + "@" + host
        q = "&".join(f"{k}={'****' if _SECRET_KEYS.search(k) else v}" for k, v in query)
        shown = parts._replace(netloc=netloc, query=q).geturl()
    return shown


# -- the store -------------------------------------------------------------------------------------

class AlertStore:
    """Alert definitions and check history of one workspace, in jobs.db; safe across processes.
    A change to a definition bumps the job store's counter, so the scheduler reloads."""

    def __init__(self, workspace: Workspace | str | os.PathLike | None = None):
        if not isinstance(workspace, Workspace):
            workspace = Workspace.open(workspace)
        self.workspace = workspace
        self.jobs = JobStore(workspace)  # makes jobs.db, its WAL mode and the change counter
        self.path = self.jobs.path
        with closing(self._connect()) as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return self.jobs._connect()

    def create(self, spec: AlertSpec, *, replace: bool = False, if_not_exists: bool = False) -> AlertSpec | None:
        if replace and if_not_exists:
            raise AlertError("CREATE OR REPLACE ALERT and IF NOT EXISTS cannot be used together")
        now = _iso(utcnow())
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT name FROM alerts WHERE name = ?", (spec.name,)).fetchone()
                if row is not None and not replace:
                    db.execute("ROLLBACK")
                    if if_not_exists:
                        return None
                    raise AlertError(f"Alert '{row['name']}' already exists",
                                     hint=f"Use CREATE OR REPLACE ALERT {spec.name} to change it, or "
                                          "CREATE ALERT IF NOT EXISTS to keep it.")
                db.execute("DELETE FROM alerts WHERE name = ?", (spec.name,))
                db.execute("INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?)",
                           (spec.name, spec.query, json.dumps(spec.options), int(spec.paused), now, now))
                JobStore._bump(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return self.get(spec.name)

    def get(self, name: str) -> AlertSpec:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM alerts WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownAlertError(name, [r[0] for r in db.execute("SELECT name FROM alerts")])
        return self._spec(row)

    def list(self) -> list[AlertSpec]:
        with closing(self._connect()) as db:
            return [self._spec(r) for r in db.execute("SELECT * FROM alerts ORDER BY name")]

    def drop(self, name: str, *, if_exists: bool = False) -> bool:
        """Remove the definition and its check history."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            n = db.execute("DELETE FROM alerts WHERE name = ?", (name,)).rowcount
            if n:
                db.execute("DELETE FROM alert_checks WHERE alert = ?", (name,))
                JobStore._bump(db)
            db.execute("COMMIT")
            if not n and not if_exists:
                raise UnknownAlertError(name, [r[0] for r in db.execute("SELECT name FROM alerts")])
        return bool(n)

    @staticmethod
    def _spec(row: sqlite3.Row) -> AlertSpec:
        return AlertSpec(row["name"], row["query"], json.loads(row["options"]), bool(row["paused"]),
                         row["created_at"], row["updated_at"])

    # -- history ---------------------------------------------------------------------------------

    def checks(self, name: str | None = None, limit: int = 100) -> list[AlertCheck]:
        """Check records, newest first (of one alert, or of all)."""
        if name is not None:
            self.get(name)
        self._settle_orphans()
        with closing(self._connect()) as db:
            if name is None:
                rows = db.execute("SELECT * FROM alert_checks ORDER BY checked_at DESC, rowid DESC LIMIT ?",
                                  (limit,))
            else:
                rows = db.execute("SELECT * FROM alert_checks WHERE alert = ? ORDER BY checked_at DESC, rowid DESC "
                                  "LIMIT ?", (name, limit))
            return [self._check(r) for r in rows]

    def summary(self, name: str) -> dict:
        """last_checked, last_status, last_fired, fired_count and last_error of an alert."""
        with closing(self._connect()) as db:
            last = db.execute("SELECT * FROM alert_checks WHERE alert = ? AND status != 'running' "
                              "ORDER BY checked_at DESC, rowid DESC LIMIT 1", (name,)).fetchone()
            fired = db.execute("SELECT count(*), max(checked_at) FROM alert_checks WHERE alert = ? AND fired = 1",
                               (name,)).fetchone()
            err = db.execute("SELECT error FROM alert_checks WHERE alert = ? AND error IS NOT NULL "
                             "ORDER BY checked_at DESC, rowid DESC LIMIT 1", (name,)).fetchone()
        return {"last_checked": _parse(last["checked_at"]) if last else None,
                "last_status": last["status"] if last else None,
                "last_fired": _parse(fired[1]), "fired_count": int(fired[0]),
                "last_error": err[0] if err else None}

    def last_notified(self, name: str) -> datetime | None:
        with closing(self._connect()) as db:
            return _parse(db.execute("SELECT max(checked_at) FROM alert_checks WHERE alert = ? AND notified = 1",
                                     (name,)).fetchone()[0])

    def record_start(self, c: AlertCheck) -> None:
        with closing(self._connect()) as db:
            db.execute("INSERT INTO alert_checks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (c.check_id, c.alert, c.trigger, _iso(c.checked_at), _iso(c.finished_at), c.status, c.rows,
                        int(c.fired), int(c.notified), c.attempts, c.error, c.preview, os.getpid(),
                        socket.gethostname()))

    def record_end(self, c: AlertCheck) -> None:
        with closing(self._connect()) as db:
            db.execute("UPDATE alert_checks SET finished_at = ?, status = ?, rows = ?, fired = ?, notified = ?, "
                       "attempts = ?, error = ?, preview = ? WHERE check_id = ?",
                       (_iso(c.finished_at), c.status, c.rows, int(c.fired), int(c.notified), c.attempts, c.error,
                        c.preview, c.check_id))

    def _settle_orphans(self) -> None:
        from mlsql.jobs.store import _alive

        host = socket.gethostname()
        with closing(self._connect()) as db:
            for r in db.execute("SELECT check_id, pid FROM alert_checks WHERE status = 'running' AND host = ?",
                                (host,)).fetchall():
                if r["pid"] and not _alive(r["pid"]):
                    db.execute("UPDATE alert_checks SET status = 'query_failed', finished_at = ?, error = ? "
                               "WHERE check_id = ? AND status = 'running'",
                               (_iso(utcnow()), f"The process checking it (pid {r['pid']}) ended before the "
                                                "check finished", r["check_id"]))

    @staticmethod
    def _check(row: sqlite3.Row) -> AlertCheck:
        return AlertCheck(row["check_id"], row["alert"], row["trigger"], _parse(row["checked_at"]),
                          _parse(row["finished_at"]), row["status"], row["rows"], bool(row["fired"]),
                          bool(row["notified"]), row["attempts"], row["error"], row["preview"])

    def next_check_time(self, spec: AlertSpec, now: datetime | None = None) -> datetime | None:
        return None if spec.paused else alert_trigger(spec).get_next_fire_time(None, now or utcnow())


def alert_trigger(spec: AlertSpec):
    """Every ``every`` seconds from the alert's creation (or last replacement), in every process's view."""
    from apscheduler.triggers.interval import IntervalTrigger

    start = _parse(spec.updated_at) or _parse(spec.created_at) or utcnow()
    return IntervalTrigger(seconds=float(spec.options["every"]), start_date=start, timezone="UTC")


# -- a check ---------------------------------------------------------------------------------------

def alert_dir(workspace: Workspace, name: str) -> Path:
    return Path(workspace.root) / "alerts" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def check_alert(workspace, alert: str | AlertSpec, *, trigger: str = "manual",
                cancel: threading.Event | None = None) -> AlertCheck:
    """Check an alert now, in this thread: its query, then (rows, or a query that failed) its
    notification with retries. The check is recorded whatever happens and returned."""
    from mlsql.locks import FileLock

    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    store = AlertStore(ws)
    spec = store.get(alert) if isinstance(alert, str) else alert
    if trigger not in ("manual", "schedule"):
        raise AlertError(f"Unknown trigger {trigger!r}: 'manual' or 'schedule'")
    opts = spec.options
    check = AlertCheck(uuid.uuid4().hex[:12], spec.name, trigger, utcnow(), None, "running")
    lock = FileLock(alert_dir(ws, spec.name) / "check.lock", who=f"alert {spec.name} (check {check.check_id})",
                    what=f"the check of alert {spec.name}")
    try:
        lock.acquire(timeout=0)
    except WorkspaceError:
        h = lock.holder()
        check.status, check.finished_at = "skipped", utcnow()
        check.error = f"Another check of alert {spec.name} is running: {h.describe() if h else 'another process'}"
        store.record_start(check)
        return check
    try:
        store.record_start(check)
        log.info("alert %s check %s started (%s)", spec.name, check.check_id, trigger)
        try:
            outcome = run_query(ws, spec, check.check_id, cancel)
        except Exception as exc:  # never leave a check 'running' because of our own failure
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" in outcome:
            check.status, check.error = "query_failed", outcome["error"]
        else:
            check.rows = int(outcome["rows"])
            check.preview = json.dumps(outcome["preview"], default=str)
            check.fired = check.rows > 0
            check.status = "fired" if check.fired else "ok"
        if check.fired or check.status == "query_failed":
            last = store.last_notified(spec.name)
            cooldown = float(opts.get("cooldown") or 0)
            if cooldown and last is not None and check.checked_at - last < timedelta(seconds=cooldown):
                if check.fired:
                    check.status = "cooldown"
            else:
                title, body = notification(spec, check, outcome)
                check.notified, check.attempts, err = send(opts["notify"], title, body,
                                                           retries=int(opts.get("retries") or 0),
                                                           backoff=float(opts.get("retry_backoff") or 0),
                                                           cancel=cancel)
                if err:
                    check.error = (check.error + "\n" if check.error else "") + err
        check.finished_at = utcnow()
        store.record_end(check)
    finally:
        lock.release()
    level = logging.WARNING if check.error else logging.INFO
    log.log(level, "alert %s check %s: %s%s%s", spec.name, check.check_id, check.status,
            f", {check.rows} rows" if check.rows is not None else "",
            (", notified" if check.notified else "") + (f": {check.error}" if check.error else ""))
    return check


def notification(spec: AlertSpec, check: AlertCheck, outcome: dict) -> tuple[str, str]:
    """The title and text a check sends."""
    when = check.checked_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    if check.status == "query_failed":
        return (f"MLSQL alert {spec.name}: its check failed",
                f"The query of alert {spec.name} failed at {when}:\n{check.error}")
    n = check.rows
    message = spec.options.get("message")
    head = (message.replace("{alert}", spec.name).replace("{rows}", str(n)) if message
            else f"Alert {spec.name} fired: its query returned {n} row{'s' if n != 1 else ''} at {when}.")
    preview = outcome.get("preview") or []
    lines = [json.dumps(r, default=str) for r in preview]
    if n > len(preview) and preview:
        lines.append(f"... {n - len(preview)} more")
    return (f"MLSQL alert {spec.name}: {n} row{'s' if n != 1 else ''}",
            head + ("\n\n" + "\n".join(lines) if lines else ""))


def send(urls: list[str], title: str, body: str, *, retries: int = 2, backoff: float = 1.0,
         cancel: threading.Event | None = None) -> tuple[bool, int, str | None]:
    """Send to every URL; the URLs that failed are tried again after ``backoff``, twice that, ...
    up to ``retries`` more times. Returns (every URL took it, attempts made, the errors or None)."""
    pending = list(urls)
    errors: dict[str, str] = {}
    attempt = 0
    while pending:
        attempt += 1
        for url in list(pending):
            ok, err = _send_one(url, title, body)
            if ok:
                pending.remove(url)
                errors.pop(url, None)
            else:
                errors[url] = err
        if not pending or attempt > retries:
            break
        wait = backoff * 2 ** (attempt - 1)
        log.info("alert notification failed (attempt %d), retrying in %.3g s: %s", attempt, wait,
                 "; ".join(f"{mask_url(u)}: {e}" for u, e in errors.items()))
        if cancel is not None:
            if cancel.wait(wait):
                break
        else:
            time.sleep(wait)
    if not pending:
        return True, attempt, None
    return False, attempt, (f"Notification failed after {attempt} attempt{'s' if attempt > 1 else ''}: "
                            + "; ".join(f"{mask_url(u)}: {errors[u]}" for u in pending))


def _send_one(url: str, title: str, body: str) -> tuple[bool, str]:
    import apprise

    a = apprise.Apprise()
    if not a.add(url):
        return False, "apprise cannot read this URL"
    with apprise.LogCapture(level=logging.WARNING, fmt="%(message)s") as out:
        try:
            ok = bool(a.notify(title=title, body=body))
        except Exception as exc:  # a plugin's own bug: a failure like any other
            return False, f"{type(exc).__name__}: {exc}"
        said = [ln.strip() for ln in out.getvalue().splitlines() if ln.strip()]
    return ok, ("; ".join(said[-2:]) if said else "the service did not accept it")


def run_query(ws: Workspace, spec: AlertSpec, check_id: str, cancel: threading.Event | None = None) -> dict:
    """The alert's query, run by ``python -m mlsql.runtime.alert_query`` on the workspace:
    {"rows": n, "columns": [...], "preview": [first max_rows rows]} or {"error": "..."}."""
    folder = alert_dir(ws, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    args = folder / f"{check_id}.args.json"
    result = folder / f"{check_id}.result.json"
    args.write_text(json.dumps({"workspace": str(ws.root), "query": spec.query, "result": str(result),
                                "max_rows": int(spec.options.get("max_rows", 5))}))
    env = dict(os.environ)
    env["MLSQL_HOME"] = str(ws.root)
    env["MLSQL_PROCESS"] = f"alert {spec.name} (check {check_id})"
    env.pop("JPY_SESSION_NAME", None)
    log_path = folder / f"{check_id}.log"
    try:
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "mlsql.runtime.alert_query", str(args)], env=env,
                                    cwd=str(Path(ws.root).parent), stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        timeout = float(spec.options.get("timeout") or 300)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() >= deadline or (cancel is not None and cancel.is_set()):
                from mlsql.jobs.options import format_duration
                from mlsql.jobs.runner import kill_tree

                kill_tree(proc)
                if cancel is not None and cancel.is_set():
                    return {"error": "Stopped: the scheduler checking it shut down"}
                return {"error": f"Timed out after {format_duration(timeout)} (option timeout); the query was stopped"}
            time.sleep(POLL_S)
        out = log_path.read_text(errors="replace")
        if result.exists():
            return json.loads(result.read_text())
        tail = out.strip().splitlines()[-15:]
        return {"error": f"The check's process exited with status {proc.returncode} without a result"
                         + (":\n" + "\n".join(tail) if tail else "")}
    finally:
        for p in (args, result, log_path):
            p.unlink(missing_ok=True)


__all__ = ["AlertCheck", "AlertSpec", "AlertStore", "alert_trigger", "check_alert", "mask_url",
           "resolve_alert_options", "send"]

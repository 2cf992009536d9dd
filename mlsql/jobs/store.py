"""Job definitions and run history, in ``<workspace>/jobs.db``.

SQLite in WAL mode: kernels, the CLI, the scheduler and the Jupyter server read and write it
at once, each with a connection of its own per call and a busy timeout, so a writer never
makes another process fail. Every change to a definition bumps a counter the scheduler polls,
so it reloads only when something changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mlsql.errors import JobError, UnknownJobError
from mlsql.workspace import Workspace

BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY COLLATE NOCASE,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    options TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL COLLATE NOCASE,
    attempt INTEGER NOT NULL,
    trigger TEXT NOT NULL,
    start_at TEXT NOT NULL,
    end_at TEXT,
    status TEXT NOT NULL,
    error TEXT,
    output_path TEXT,
    pid INTEGER,
    host TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, start_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('jobs_version', 0);
"""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _parse(t: str | None) -> datetime | None:
    return None if not t else datetime.fromisoformat(t)


@dataclass
class JobSpec:
    name: str
    kind: str  # 'notebook' | 'sql'
    target: str  # absolute notebook path, or the MLSQL script
    options: dict = field(default_factory=dict)
    paused: bool = False
    created_at: str = ""  # ISO UTC
    updated_at: str = ""  # ISO UTC: the last CREATE OR REPLACE, PAUSE or RESUME

    @property
    def schedule_text(self) -> str:
        from mlsql.jobs.options import format_duration

        if self.options.get("schedule"):
            return f"cron '{self.options['schedule']}' ({self.options.get('timezone') or 'UTC'})"
        return f"every {format_duration(self.options.get('every'))}"


@dataclass
class JobRun:
    run_id: str
    job: str
    attempt: int
    trigger: str  # 'schedule' | 'manual' | 'retry'
    start: datetime
    end: datetime | None
    status: str  # 'running' | 'succeeded' | 'failed' | 'timed_out' | 'skipped'
    error: str | None
    output_path: str | None

    @property
    def duration_s(self) -> float | None:
        return None if self.end is None else (self.end - self.start).total_seconds()


class JobStore:
    """Persistent job definitions and history of one workspace; safe across processes."""

    def __init__(self, workspace: Workspace | str | os.PathLike | None = None):
        if not isinstance(workspace, Workspace):
            workspace = Workspace.open(workspace)
        self.workspace = workspace
        self.path = Path(workspace.root) / "jobs.db"
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # autocommit mode; writes that must be atomic use an explicit BEGIN IMMEDIATE
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    # -- definitions ---------------------------------------------------------------------------

    def create(self, spec: JobSpec, *, replace: bool = False, if_not_exists: bool = False) -> JobSpec | None:
        if spec.kind not in ("notebook", "sql"):
            raise JobError(f"A job runs a notebook or an MLSQL script, not {spec.kind!r}")
        if spec.kind == "notebook":
            nb = Path(spec.target).expanduser()
            if not nb.is_file():
                raise JobError(f"Notebook {spec.target} does not exist",
                               hint="A notebook job names an .ipynb file, absolute or relative to the folder "
                                    "this process runs in.")
            spec = dataclasses.replace(spec, target=str(nb.resolve()))
        if replace and if_not_exists:
            raise JobError("CREATE OR REPLACE JOB and IF NOT EXISTS cannot be used together")
        now = _iso(utcnow())
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT name FROM jobs WHERE name = ?", (spec.name,)).fetchone()
                if row is not None and not replace:
                    db.execute("ROLLBACK")
                    if if_not_exists:
                        return None
                    raise JobError(f"Job '{row['name']}' already exists",
                                   hint=f"Use CREATE OR REPLACE JOB {spec.name} to change it, or "
                                        f"CREATE JOB IF NOT EXISTS to keep it.")
                if row is not None:
                    db.execute("DELETE FROM jobs WHERE name = ?", (spec.name,))
                db.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (spec.name, spec.kind, spec.target, json.dumps(spec.options), int(spec.paused),
                            now, now))
                self._bump(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return self.get(spec.name)

    def get(self, name: str) -> JobSpec:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM jobs WHERE name = ?", (name,)).fetchone()
            if row is None:
                names = [r[0] for r in db.execute("SELECT name FROM jobs")]
                raise UnknownJobError(name, names)
        return self._spec(row)

    def list(self) -> list[JobSpec]:
        with closing(self._connect()) as db:
            return [self._spec(r) for r in db.execute("SELECT * FROM jobs ORDER BY name")]

    def drop(self, name: str, *, if_exists: bool = False) -> bool:
        """Remove the definition and its history (its executed notebooks stay on disk)."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            n = db.execute("DELETE FROM jobs WHERE name = ?", (name,)).rowcount
            if n:
                db.execute("DELETE FROM runs WHERE job = ?", (name,))
                self._bump(db)
            db.execute("COMMIT")
            if not n and not if_exists:
                names = [r[0] for r in db.execute("SELECT name FROM jobs")]
                raise UnknownJobError(name, names)
        return bool(n)

    def set_paused(self, name: str, paused: bool) -> JobSpec:
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            n = db.execute("UPDATE jobs SET paused = ?, updated_at = ? WHERE name = ?",
                           (int(paused), _iso(utcnow()), name)).rowcount
            if n:
                self._bump(db)
            db.execute("COMMIT")
        if not n:
            self.get(name)  # raises UnknownJobError with the nearest name
        return self.get(name)

    def version(self) -> int:
        """A counter that changes whenever any definition changes (what the scheduler polls)."""
        with closing(self._connect()) as db:
            return int(db.execute("SELECT value FROM meta WHERE key = 'jobs_version'").fetchone()[0])

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'jobs_version'")

    @staticmethod
    def _spec(row: sqlite3.Row) -> JobSpec:
        return JobSpec(row["name"], row["kind"], row["target"], json.loads(row["options"]), bool(row["paused"]),
                       row["created_at"], row["updated_at"])

    # -- history ---------------------------------------------------------------------------------

    def runs(self, name: str | None = None, limit: int = 100) -> list[JobRun]:
        """Run records, newest first (of one job, or of all)."""
        if name is not None:
            self.get(name)
        self._settle_orphans()
        with closing(self._connect()) as db:
            if name is None:
                rows = db.execute("SELECT * FROM runs ORDER BY start_at DESC, rowid DESC LIMIT ?", (limit,))
            else:
                rows = db.execute("SELECT * FROM runs WHERE job = ? ORDER BY start_at DESC, rowid DESC LIMIT ?",
                                  (name, limit))
            return [self._run(r) for r in rows]

    def running(self, name: str) -> list[JobRun]:
        """The job's runs in progress, newest first. A schedule faster than the job records a
        'skipped' run each time it comes round, so the newest record alone can hide a run
        that is still going."""
        self._settle_orphans()
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM runs WHERE job = ? AND status = 'running' "
                              "ORDER BY start_at DESC, rowid DESC", (name,))
            return [self._run(r) for r in rows]

    def get_run(self, run_id: str) -> JobRun:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise JobError(f"No run {run_id!r} in this workspace")
        return self._run(row)

    def last_start(self, name: str, trigger: str | None = None) -> datetime | None:
        """When the newest run of a job started (of one trigger, or of any)."""
        q, args = "SELECT max(start_at) FROM runs WHERE job = ?", [name]
        if trigger:
            q += " AND trigger = ?"
            args.append(trigger)
        with closing(self._connect()) as db:
            return _parse(db.execute(q, args).fetchone()[0])

    def record_start(self, run: JobRun) -> None:
        with closing(self._connect()) as db:
            db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (run.run_id, run.job, run.attempt, run.trigger, _iso(run.start), _iso(run.end), run.status,
                        run.error, run.output_path, os.getpid(), socket.gethostname()))

    def record_end(self, run: JobRun) -> None:
        with closing(self._connect()) as db:
            db.execute("UPDATE runs SET end_at = ?, status = ?, error = ?, output_path = ? WHERE run_id = ?",
                       (_iso(run.end), run.status, run.error, run.output_path, run.run_id))

    def _settle_orphans(self) -> None:
        """A run still 'running' whose process is gone on this host ended without saying how:
        record it as failed, so history never shows a run that will not finish."""
        host = socket.gethostname()
        with closing(self._connect()) as db:
            rows = db.execute("SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?", (host,)).fetchall()
            for r in rows:
                if r["pid"] and not _alive(r["pid"]):
                    db.execute("UPDATE runs SET status = 'failed', end_at = ?, error = ? WHERE run_id = ? AND "
                               "status = 'running'",
                               (_iso(utcnow()), f"The process running it (pid {r['pid']}) ended before the run "
                                                "finished", r["run_id"]))

    @staticmethod
    def _run(row: sqlite3.Row) -> JobRun:
        return JobRun(row["run_id"], row["job"], row["attempt"], row["trigger"], _parse(row["start_at"]),
                      _parse(row["end_at"]), row["status"], row["error"], row["output_path"])

    # -- schedule --------------------------------------------------------------------------------

    def next_run_time(self, spec: JobSpec, now: datetime | None = None) -> datetime | None:
        """When the scheduler fires this job next (None when paused)."""
        if spec.paused:
            return None
        return trigger_for(spec).get_next_fire_time(None, now or utcnow())


def trigger_for(spec: JobSpec):
    """The APScheduler trigger of a job. An interval counts from the job's creation, so every
    process (and a restarted scheduler) agrees on the times."""
    if spec.options.get("schedule"):
        from apscheduler.triggers.cron import CronTrigger

        return CronTrigger.from_crontab(spec.options["schedule"], timezone=spec.options.get("timezone") or "UTC")
    from apscheduler.triggers.interval import IntervalTrigger

    every = float(spec.options["every"])
    start = _parse(spec.created_at) or utcnow()
    return IntervalTrigger(seconds=every, start_date=start, timezone=spec.options.get("timezone") or "UTC")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["JobSpec", "JobRun", "JobStore", "trigger_for", "utcnow"]

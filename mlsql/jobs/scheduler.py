"""The scheduler: fires the workspace's jobs on time, one scheduler per workspace.

Definitions and history live in the JobStore, never only here: any process may CREATE, DROP,
PAUSE or RESUME a job at any time, and a scheduler killed and started again loses nothing.
It polls the store's change counter every ``poll_s`` and reloads only the jobs that changed.

Missed runs (the scheduler was down, or the machine slept): a job whose scheduled time passed
less than ``grace_s`` (1 hour) ago without a run gets one run as soon as the scheduler is up,
however many times were missed (coalesced); older missed times are skipped, and the job goes
on at its next time. Inside a running scheduler APScheduler applies the same rule
(``misfire_grace_time`` = ``grace_s``, ``coalesce``).

Alerts (:mod:`mlsql.jobs.alerts`) are checked by the same scheduler, every ``every`` from their
creation; a check missed while no scheduler ran is not made up (the next one comes at its time).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from datetime import timedelta

from mlsql.errors import JobError, UnknownJobError, WorkspaceError
from mlsql.jobs.alerts import AlertSpec, AlertStore, alert_trigger, check_alert
from mlsql.jobs.runner import run_job
from mlsql.jobs.store import JobSpec, JobStore, _parse, trigger_for, utcnow
from mlsql.workspace import Workspace

log = logging.getLogger("mlsql.jobs")
GRACE_S = 3600.0


class Scheduler:
    """Runs the jobs of one workspace on their schedules, in worker threads of this process."""

    def __init__(self, workspace=None, *, who: str | None = None, poll_s: float = 1.0, grace_s: float = GRACE_S,
                 max_workers: int = 16):
        from mlsql.locks import FileLock, describe_process

        self.workspace = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
        self.store = JobStore(self.workspace)
        self.alerts = AlertStore(self.workspace)
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.max_workers = max_workers
        self.lock = FileLock(self.workspace.root / "scheduler.lock", who=who or describe_process(),
                             what="the workspace's scheduler")
        self._aps = None
        self._loaded: dict[str, tuple] = {}
        self._version: int | None = None
        self._reload_mutex = threading.Lock()
        self._cancel = threading.Event()  # set on shutdown: running attempts are stopped
        self._stop = threading.Event()  # asks run_forever to return

    @property
    def running(self) -> bool:
        return self._aps is not None

    def holder(self) -> str | None:
        """Who schedules this workspace now, when it is not us."""
        h = self.lock.holder()
        return h.describe() if h else None

    def scheduled(self) -> dict:
        """Job name -> next scheduled run time, for the jobs this scheduler has loaded."""
        aps = self._aps
        if aps is None:
            return {}
        return {j.name: j.next_run_time for j in aps.get_jobs() if j.id.startswith("job:")}

    def scheduled_alerts(self) -> dict:
        """Alert name -> next scheduled check time, for the alerts this scheduler has loaded."""
        aps = self._aps
        if aps is None:
            return {}
        return {j.name: j.next_run_time for j in aps.get_jobs() if j.id.startswith("alert:")}

    def start(self) -> Scheduler:
        """Start in the background. JobError when another process already schedules this workspace."""
        if self._aps is not None:
            return self
        try:
            self.lock.acquire(timeout=0)
        except WorkspaceError:
            who = self.holder() or "another process"
            raise JobError(f"Another process already schedules the jobs of workspace {self.workspace.root}: {who}",
                           hint="One scheduler per workspace runs every job, whichever process created it; "
                                "stop that one first to run the scheduler here.") from None
        try:
            from apscheduler.executors.pool import ThreadPoolExecutor
            from apscheduler.schedulers.background import BackgroundScheduler

            logging.getLogger("apscheduler").setLevel(logging.WARNING)  # not a line per fired job
            self._cancel.clear()
            self._stop.clear()
            aps = BackgroundScheduler(
                executors={"default": ThreadPoolExecutor(self.max_workers), "poll": ThreadPoolExecutor(1)},
                job_defaults={"coalesce": True, "misfire_grace_time": int(self.grace_s)}, timezone="UTC")
            aps.start()
            self._aps = aps
            self.reload(force=True)
            aps.add_job(self._poll, "interval", seconds=self.poll_s, id="__poll__", executor="poll",
                        max_instances=1, coalesce=True, misfire_grace_time=None)
        except BaseException:
            self._teardown(wait=False)
            raise
        n_alerts = sum(k.startswith("alert:") for k in self._loaded)
        n_jobs = len(self._loaded) - n_alerts
        log.info("scheduler started for workspace %s (%d job%s, %d alert%s)", self.workspace.root, n_jobs,
                 "" if n_jobs == 1 else "s", n_alerts, "" if n_alerts == 1 else "s")
        return self

    def run_forever(self) -> None:
        """Start and block until shutdown(), SIGTERM or SIGINT; then stop cleanly."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def shutdown(self, wait: bool = True) -> None:
        """Stop firing jobs, stop the runs in progress (recorded as failed), release the workspace."""
        self._stop.set()
        self._teardown(wait=wait)

    def _teardown(self, wait: bool) -> None:
        self._cancel.set()
        aps, self._aps = self._aps, None
        if aps is not None:
            try:
                aps.shutdown(wait=wait)
            except Exception:  # already stopped
                pass
            log.info("scheduler stopped for workspace %s", self.workspace.root)
        self._loaded.clear()
        self._version = None
        self.lock.release()

    # -- keeping APScheduler in step with the store -------------------------------------------------

    def _poll(self) -> None:
        try:
            self.reload()
        except Exception:  # a busy or briefly unreadable store: try again next poll
            log.exception("could not reload the job definitions")

    def reload(self, force: bool = False) -> None:
        """Apply the store's definitions: add new jobs, drop removed or paused ones, redo changed ones."""
        with self._reload_mutex:
            aps = self._aps
            if aps is None:
                return
            version = self.store.version()
            if version == self._version and not force:
                return
            self._version = version
            specs = {s.name.lower(): s for s in self.store.list()}
            for key in [k for k in self._loaded if not k.startswith("alert:")]:
                if key not in specs or specs[key].paused or self._loaded[key] != _fingerprint(specs[key]):
                    self._remove(key)
                    if key not in specs:
                        log.info("job %s dropped", key)
            for key, spec in specs.items():
                if spec.paused or key in self._loaded:
                    continue
                self._add(key, spec)
            alerts = {f"alert:{a.name.lower()}": a for a in self.alerts.list()}
            for key in [k for k in self._loaded if k.startswith("alert:")]:
                if key not in alerts or alerts[key].paused or self._loaded[key] != _alert_fingerprint(alerts[key]):
                    self._remove_alert(key)
            for key, alert in alerts.items():
                if not alert.paused and key not in self._loaded:
                    self._add_alert(key, alert)

    def _remove(self, key: str) -> None:
        for job_id in (f"job:{key}", f"catchup:{key}"):
            try:
                self._aps.remove_job(job_id)
            except Exception:  # not scheduled (a catch-up that already ran)
                pass
        self._loaded.pop(key, None)

    def _remove_alert(self, key: str) -> None:
        try:
            self._aps.remove_job(key)
        except Exception:  # not scheduled
            pass
        self._loaded.pop(key, None)
        log.info("alert %s unscheduled", key.split(":", 1)[1])

    def _add_alert(self, key: str, alert: AlertSpec) -> None:
        try:
            trigger = alert_trigger(alert)
        except Exception as exc:  # a definition this version cannot read: say so, keep the others
            log.error("alert %s cannot be scheduled: %s", alert.name, exc)
            return
        # a second instance reaches check_alert, which records it as skipped when the previous check still runs
        self._aps.add_job(self._fire_alert, trigger, args=[alert.name], id=key, name=alert.name, max_instances=2)
        self._loaded[key] = _alert_fingerprint(alert)
        nxt = self._aps.get_job(key)
        log.info("alert %s scheduled (%s), next check %s", alert.name, alert.every_text,
                 nxt.next_run_time.isoformat(timespec="seconds") if nxt and nxt.next_run_time else "-")

    def _fire_alert(self, name: str) -> None:
        from mlsql.errors import UnknownAlertError

        if self._cancel.is_set():
            return
        try:
            check_alert(self.workspace, self.alerts.get(name), trigger="schedule", cancel=self._cancel)
        except UnknownAlertError:
            pass  # dropped since it was scheduled
        except Exception:
            log.exception("alert %s could not be checked", name)

    def _add(self, key: str, spec: JobSpec) -> None:
        try:
            trigger = trigger_for(spec)
        except Exception as exc:  # a definition this version cannot read: say so, keep the others
            log.error("job %s cannot be scheduled: %s", spec.name, exc)
            return
        n = max(1, int(spec.options.get("max_concurrent") or 1))
        # one more instance than allowed reaches run_job, which records it as skipped with the reason
        self._aps.add_job(self._fire, trigger, args=[spec.name], id=f"job:{key}", name=spec.name,
                          max_instances=n + 1)
        self._loaded[key] = _fingerprint(spec)
        missed = self._missed(spec, trigger)
        if missed is not None:
            log.info("job %s missed its run at %s: running it now", spec.name, missed.isoformat(timespec="seconds"))
            self._aps.add_job(self._fire, "date", run_date=utcnow(), args=[spec.name], id=f"catchup:{key}",
                              name=f"{spec.name} (missed run)", replace_existing=True)
        nxt = self._aps.get_job(f"job:{key}")
        log.info("job %s scheduled (%s), next run %s", spec.name, spec.schedule_text,
                 nxt.next_run_time.isoformat(timespec="seconds") if nxt and nxt.next_run_time else "-")

    def _missed(self, spec: JobSpec, trigger):
        """The newest scheduled time within the grace period that passed without a run, or None."""
        now = utcnow()
        anchor = max(t for t in (self.store.last_start(spec.name, "schedule"), _parse(spec.updated_at),
                                 _parse(spec.created_at)) if t is not None)
        since = max(anchor + timedelta(milliseconds=1), now - timedelta(seconds=self.grace_s))
        if since >= now:
            return None
        t = trigger.get_next_fire_time(None, since)
        if t is None or t >= now:
            return None
        latest = t
        for _ in range(10000):  # the newest missed time, for the log
            nxt = trigger.get_next_fire_time(latest, latest + timedelta(microseconds=1))
            if nxt is None or nxt >= now:
                break
            latest = nxt
        return latest

    def _fire(self, name: str) -> None:
        if self._cancel.is_set():
            return
        try:
            spec = self.store.get(name)
            if spec.paused:
                return
            run_job(self.workspace, spec, trigger="schedule", cancel=self._cancel)
        except UnknownJobError:
            pass  # dropped since it was scheduled
        except Exception:
            log.exception("job %s could not run", name)


def _alert_fingerprint(alert: AlertSpec) -> tuple:
    return (alert.query, json.dumps(alert.options, sort_keys=True), alert.created_at, alert.updated_at)


def _fingerprint(spec: JobSpec) -> tuple:
    return (spec.kind, spec.target, json.dumps(spec.options, sort_keys=True), spec.created_at, spec.updated_at)

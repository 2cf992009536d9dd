"""Running a job now: slots, attempts, the child process that runs papermill, the clock.

Each attempt runs ``python -m mlsql.jobs._child`` (papermill and its kernel under it), so a
timeout or a shutdown can kill the attempt with its kernel and every process they started,
whatever the notebook is doing. Concurrency is counted with ``max_concurrent`` slot locks
(flock files under ``<workspace>/jobs/<name>/slots/``), which every process sees and the
operating system frees when a holder dies.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from mlsql.errors import JobError, MLSQLError, WorkspaceError
from mlsql.jobs.store import JobRun, JobSpec, JobStore, utcnow
from mlsql.workspace import Workspace

log = logging.getLogger("mlsql.jobs")
POLL_S = 0.1


def job_dir(workspace: Workspace, name: str) -> Path:
    """Where a job's executed notebooks live: <workspace>/jobs/<name>/."""
    return Path(workspace.root) / "jobs" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def source_notebook(spec: JobSpec, kernel: str | None = None) -> dict:
    """The notebook (nbformat 4, as a dict) an MLSQL-script job runs: %load_ext mlsql, a
    parameters cell, the script in one %%mlsql cell."""
    kernel = kernel or spec.options.get("kernel") or "python3"
    in_mlsql_kernel = _kernel_language(kernel) == "sql"

    def cell(source: str, tags: list[str] | None = None) -> dict:
        return {"cell_type": "code", "execution_count": None, "id": uuid.uuid4().hex[:8],
                "metadata": {"tags": tags or []}, "outputs": [], "source": source}

    params = ("%%python\n" if in_mlsql_kernel else "") + "# parameters (papermill sets the job's values below)"
    return {"nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": kernel, "display_name": kernel,
                                        "language": "sql" if in_mlsql_kernel else "python"},
                         "mlsql_job": spec.name},
            "cells": [cell("%load_ext mlsql"), cell(params, ["parameters"]), cell("%%mlsql\n" + spec.target)]}


def _kernel_language(kernel: str) -> str:
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        return KernelSpecManager().get_kernel_spec(kernel).language
    except Exception:
        return "python"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_job(workspace, job: str | JobSpec, *, trigger: str = "manual",
            cancel: threading.Event | None = None) -> JobRun:
    """Run a job now, in this thread, with its retries; returns the last attempt's record.

    ``cancel`` (set by a scheduler shutting down) kills the attempt in progress, which is
    recorded as failed, and stops the retries.
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    store = JobStore(ws)
    spec = store.get(job) if isinstance(job, str) else job
    if trigger not in ("manual", "schedule", "retry"):
        raise JobError(f"Unknown trigger {trigger!r}: 'manual', 'schedule' or 'retry'")
    opts = spec.options
    first_id = new_run_id()
    slot = _take_slot(ws, spec, first_id)
    if isinstance(slot, str):
        now = utcnow()
        run = JobRun(first_id, spec.name, 1, trigger, now, now, "skipped", slot, None)
        store.record_start(run)
        log.info("job %s run %s skipped: %s", spec.name, run.run_id, slot)
        return run
    try:
        retries = int(opts.get("retries") or 0)
        backoff = float(opts.get("retry_backoff") if opts.get("retry_backoff") is not None else 10.0)
        attempt = 1
        while True:
            run = _attempt(ws, store, spec, first_id if attempt == 1 else new_run_id(), attempt,
                           trigger if attempt == 1 else "retry", cancel)
            if run.status == "succeeded" or attempt > retries or (cancel is not None and cancel.is_set()):
                return run
            wait = backoff * 2 ** (attempt - 1)
            log.info("job %s: attempt %d %s, retrying in %.3g s", spec.name, attempt, run.status, wait)
            if cancel is not None:
                if cancel.wait(wait):
                    return run
            else:
                time.sleep(wait)
            attempt += 1
    finally:
        slot.release()


def _take_slot(ws: Workspace, spec: JobSpec, run_id: str):
    """A held slot lock, or (when all max_concurrent are taken) the reason, naming the holders."""
    from mlsql.locks import FileLock

    n = max(1, int(spec.options.get("max_concurrent") or 1))
    holders = []
    for i in range(n):
        lock = FileLock(job_dir(ws, spec.name) / "slots" / f"{i}.lock",
                        who=f"job {spec.name} (run {run_id})", what=f"a run slot of job {spec.name}")
        try:
            lock.acquire(timeout=0)
            return lock
        except WorkspaceError:
            h = lock.holder()
            holders.append(h.describe() if h else "another process")
    return (f"{n} run{'s' if n > 1 else ''} of job {spec.name} already running (max_concurrent = {n}): "
            + "; ".join(holders))


def _attempt(ws: Workspace, store: JobStore, spec: JobSpec, run_id: str, attempt: int, trigger: str,
             cancel: threading.Event | None) -> JobRun:
    start = utcnow()
    folder = job_dir(ws, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    output = folder / f"{start.strftime('%Y%m%dT%H%M%SZ')}_{run_id}.ipynb"
    run = JobRun(run_id, spec.name, attempt, trigger, start, None, "running", None, str(output))
    store.record_start(run)
    log.info("job %s run %s started (%s, attempt %d)", spec.name, run_id, trigger, attempt)
    try:
        run.status, run.error = _execute(ws, spec, run, output, cancel)
    except MLSQLError as exc:
        run.status, run.error = "failed", str(exc)
    except Exception as exc:  # never leave a run 'running' because of our own failure
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
    run.end = utcnow()
    if not output.exists():
        run.output_path = None
    store.record_end(run)
    took = run.duration_s or 0.0
    if run.status == "succeeded":
        log.info("job %s run %s succeeded in %.1f s: %s", spec.name, run_id, took, output)
    else:
        log.warning("job %s run %s %s after %.1f s: %s", spec.name, run_id, run.status.replace("_", " "), took,
                    run.error)
    return run


def _execute(ws: Workspace, spec: JobSpec, run: JobRun, output: Path,
             cancel: threading.Event | None) -> tuple[str, str | None]:
    opts = spec.options
    work = output.with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    try:
        if spec.kind == "sql":
            source = work / "source.ipynb"
            source.write_text(json.dumps(source_notebook(spec), indent=1))
            cwd = Path(ws.root).parent
        else:
            source = Path(spec.target)
            if not source.is_file():
                return "failed", f"Notebook {source} does not exist"
            cwd = source.parent
        result = work / "result.json"
        args = work / "args.json"
        args.write_text(json.dumps({"input": str(source), "output": str(output),
                                    "parameters": opts.get("parameters") or {}, "kernel": opts.get("kernel"),
                                    "cwd": str(cwd), "result": str(result)}))
        env = dict(os.environ)
        env.pop("JPY_SESSION_NAME", None)  # the job's kernel is not the notebook that started it
        env["MLSQL_HOME"] = str(ws.root)
        env["MLSQL_PROCESS"] = f"job {spec.name} (run {run.run_id})"
        env.setdefault("PYTHONUNBUFFERED", "1")
        log_path = work / "child.log"
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "mlsql.jobs._child", str(args)], env=env,
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        timeout = opts.get("timeout")
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        while proc.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                kill_tree(proc)
                from mlsql.jobs.options import format_duration

                return "timed_out", f"Timed out after {format_duration(float(timeout))} (option timeout); " \
                                    "the run and its kernel were stopped"
            if cancel is not None and cancel.is_set():
                kill_tree(proc)
                return "failed", "Stopped: the scheduler running it shut down"
            time.sleep(POLL_S)
        if result.exists():
            outcome = json.loads(result.read_text())
            return outcome["status"], outcome.get("error")
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return "failed", (f"The run's process exited with status {proc.returncode} without a result"
                          + (":\n" + "\n".join(tail) if tail else ""))
    finally:
        _remove_tree(work)


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a process and everything under it, the kernel (in a session of its own) included."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            if os.getpgid(p.pid) == p.pid and p.pid != os.getpgid(0):
                os.killpg(p.pid, signal.SIGKILL)  # a kernel's own children share its group
            else:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    psutil.wait_procs(procs, timeout=5)
    proc.wait(timeout=5)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)

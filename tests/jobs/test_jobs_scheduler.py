"""The scheduler as a real process next to a kernel with an open session, restarts, the one-per-
workspace rule, the missed-run policy, and the Jupyter server extension."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from jobhelpers import mlsql_cli, wait_for

from mlsql.jobs import JobSpec, resolve_job_options


def _scheduler(ws, log_path):
    env = {k: v for k, v in os.environ.items() if k != "MLSQL_HOME"}
    return subprocess.Popen([sys.executable, "-m", "mlsql.cli", "scheduler", "--workspace", str(ws.root)],
                            stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), env=env)


@pytest.fixture
def kernel_with_session(ws):
    """A python3 kernel that opened an MLSQL session on the workspace and ran a query."""
    from jupyter_client.manager import start_new_kernel

    env = dict(os.environ, MLSQL_HOME=str(ws.root))
    km, kc = start_new_kernel(kernel_name="python3", env=env)

    def execute(code: str) -> None:
        reply = kc.execute_interactive(code, timeout=60, output_hook=lambda msg: None)
        assert reply["content"]["status"] == "ok", reply["content"]

    execute("import mlsql\ns = mlsql.connect()\nassert s.sql('SELECT 42 AS x').to_pandas().x[0] == 42")
    yield execute
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def test_scheduler_process_runs_jobs_survives_restart_and_is_alone(tmp_path, ws, store, kernel_with_session):
    store.create(JobSpec("tick", "sql", "CREATE TABLE IF NOT EXISTS ticks (t TIMESTAMP);\n"
                                        "INSERT INTO ticks SELECT now()", resolve_job_options({"every": "2s"})))
    first = _scheduler(ws, tmp_path / "first.log")
    try:
        wait_for(lambda: len([r for r in store.runs("tick") if r.status == "succeeded"]) >= 2, 45, "two runs")
        # a second scheduler on the same workspace refuses and names the first
        second = mlsql_cli("scheduler", "--workspace", ws.root, timeout=60)
        assert second.returncode == 1
        assert "already schedules" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "mlsql scheduler" in second.stderr and "Traceback" not in second.stderr
        # the kernel's session sees what the job wrote, and still works
        kernel_with_session("assert s.sql('SELECT count(*) AS n FROM ticks').to_pandas().n[0] >= 2")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
    log = (tmp_path / "first.log").read_text()
    assert "job tick run" in log and "started (schedule, attempt 1)" in log and "succeeded in" in log
    assert "scheduler stopped" in log and "Traceback" not in log
    before = {r.run_id: r.status for r in store.runs("tick")}
    assert "running" not in before.values()
    spec = store.get("tick")

    again = _scheduler(ws, tmp_path / "again.log")
    try:
        wait_for(lambda: any(r.run_id not in before and r.status == "succeeded" for r in store.runs("tick")), 45,
              "a run after the restart")
    finally:
        again.send_signal(signal.SIGINT)
        assert again.wait(30) == 0
    after = {r.run_id: r.status for r in store.runs("tick")}
    assert store.get("tick") == spec
    assert all(after[k] == v for k, v in before.items())  # history kept as it was
    kernel_with_session("assert s.sql('SELECT count(*) AS n FROM ticks').to_pandas().n[0] >= 3")


def test_missed_run_policy_and_live_changes(ws, store, caplog):
    """A time missed within the grace period gets one run at start; an older one is skipped.
    Pausing in another process unschedules the job within a poll."""
    import sqlite3

    from mlsql.jobs.scheduler import Scheduler

    store.create(JobSpec("minutely", "sql", "SELECT 1", resolve_job_options({"schedule": "* * * * *"})))
    store.create(JobSpec("hourly", "sql", "SELECT 1", resolve_job_options({"every": "1h"})))
    with sqlite3.connect(store.path) as db:  # as if both were made while no scheduler ran
        db.execute("UPDATE jobs SET created_at = ?, updated_at = ? WHERE name = 'minutely'",
                   ("2020-01-01T00:00:00+00:00", "2020-01-01T00:00:00+00:00"))
        ago = time.time() - 2.5 * 3600
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(ago))
        db.execute("UPDATE jobs SET created_at = ?, updated_at = ? WHERE name = 'hourly'", (stamp, stamp))
    caplog.set_level(logging.INFO, logger="mlsql.jobs")
    sched = Scheduler(ws, grace_s=300, poll_s=0.5).start()
    try:
        assert set(sched.scheduled()) == {"minutely", "hourly"}
        # hourly: its last time was 30 min ago, beyond the 5 min grace, so it waits for its next time
        assert sched.scheduled()["hourly"].timestamp() == pytest.approx(ago + 3 * 3600, abs=1)
        wait_for(lambda: store.runs("minutely"), 10, "the catch-up run of minutely")
        assert store.runs("minutely")[0].trigger == "schedule"
        assert "job minutely missed its run" in caplog.text and "hourly missed" not in caplog.text
        assert store.runs("hourly") == []
        out = mlsql_cli("jobs", "pause", "hourly", "--workspace", ws.root)
        assert out.returncode == 0 and "paused" in out.stdout
        wait_for(lambda: "hourly" not in sched.scheduled(), 5, "hourly to be unscheduled")
        mlsql_cli("jobs", "resume", "hourly", "--workspace", ws.root)
        wait_for(lambda: "hourly" in sched.scheduled(), 5, "hourly to be scheduled again")
    finally:
        sched.shutdown()
    assert not sched.running and all(r.status != "running" for r in store.runs())


def test_jupyter_server_extension_runs_the_scheduler(tmp_path):
    from mlsql.jobs.cli import scheduler_holder
    from mlsql.workspace import Workspace

    root = tmp_path / "lab"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLSQL_HOME"}

    def server(name):
        return subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--allow-root", "--no-browser", "--port=0",
             "--ServerApp.token=t", f"--ServerApp.root_dir={root}",
             "--ServerApp.jpserver_extensions={'mlsql.notebook.server': True}"],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / name, "w"))

    first = server("first.log")
    second = None
    try:
        ws = Workspace(root / ".mlsql")
        wait_for(lambda: (root / ".mlsql" / "scheduler.lock").exists() and scheduler_holder(ws), 60,
              "the server's scheduler")
        assert "the Jupyter server" in scheduler_holder(ws) and f"pid {first.pid}" in scheduler_holder(ws)
        out = mlsql_cli("scheduler", "--workspace", root / ".mlsql", timeout=60)
        assert out.returncode == 1 and "the Jupyter server" in out.stderr
        second = server("second.log")  # another server on the same workspace comes up without one
        wait_for(lambda: "not scheduling jobs" in (tmp_path / "second.log").read_text(), 60, "the second server")
        assert second.poll() is None and "Traceback" not in (tmp_path / "second.log").read_text()
    finally:
        for p in (first, second):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    assert "MLSQL: job scheduler stopped" in (tmp_path / "first.log").read_text()
    assert scheduler_holder(ws) is None

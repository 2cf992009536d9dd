"""run_job on real notebooks, in real kernels: parameters, %%mlsql, failures, timeouts, retries, slots."""

from __future__ import annotations

import json
import time

import psutil
import pytest
from jobhelpers import write_notebook

import mlsql
from mlsql.jobs import JobSpec, job_dir, resolve_job_options, run_job


def _job(store, name, kind, target, **options):
    options.setdefault("every", "1h")
    return store.create(JobSpec(name, kind, str(target), resolve_job_options(options)))


def test_notebook_with_a_parameter_writes_a_table(tmp_path, ws, store):
    nb = write_notebook(
        tmp_path / "load.ipynb",
        "import json, os\n"
        "json.dump({k: os.environ.get(k) for k in ('MLSQL_HOME', 'MLSQL_PROCESS')}, open('env.json', 'w'))",
        "%load_ext mlsql",
        "%%mlsql\nCREATE TABLE answers AS SELECT {p} AS p, {region} AS region",
        parameters="p = 1\nregion = 'us'")
    _job(store, "load", "notebook", nb, parameters={"p": 42, "region": "eu"})
    run = run_job(ws, "load")
    assert run.status == "succeeded", run.error
    assert run.trigger == "manual" and run.attempt == 1 and run.error is None and run.end > run.start
    out = run.output_path
    assert out and out.startswith(str(job_dir(ws, "load"))) and out.endswith(f"_{run.run_id}.ipynb")
    import nbformat

    executed = nbformat.read(out, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    with mlsql.connect(ws.root) as s:
        assert s.sql("SELECT p, region FROM answers").to_pandas().to_dict("records") == [{"p": 42, "region": "eu"}]
    env = json.loads((tmp_path / "env.json").read_text())  # the kernel ran in the notebook's folder
    assert env == {"MLSQL_HOME": str(ws.root), "MLSQL_PROCESS": f"job load (run {run.run_id})"}
    assert [r.run_id for r in store.runs("load")] == [run.run_id]
    assert list(job_dir(ws, "load").glob("*.work")) == []


def test_failing_mlsql_cell_is_recorded_failed(tmp_path, ws, store):
    nb = write_notebook(tmp_path / "bad.ipynb", "%load_ext mlsql", "%%mlsql\nSELEC 1", "print('never')")
    _job(store, "bad", "notebook", nb)
    run = run_job(ws, "bad")
    assert run.status == "failed"
    assert "UsageError" in run.error and "syntax error" in run.error and "SELEC" in run.error
    assert store.runs("bad")[0].status == "failed" and store.runs("bad")[0].error == run.error
    assert run.output_path and (tmp_path / "bad.ipynb").exists()


def test_timeout_kills_the_run_and_its_kernel(tmp_path, ws, store):
    pid_file = tmp_path / "kernel.pid"
    nb = write_notebook(tmp_path / "slow.ipynb",
                        f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(30)")
    _job(store, "slow", "notebook", nb, timeout="3s")
    t0 = time.monotonic()
    run = run_job(ws, "slow")
    took = time.monotonic() - t0
    assert run.status == "timed_out" and took < 15, (run, took)
    assert "Timed out after 3s" in run.error
    kernel = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while psutil.pid_exists(kernel) and psutil.Process(kernel).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"kernel {kernel} still running"
        time.sleep(0.1)


def test_retries_leave_one_row_per_attempt(ws, store):
    _job(store, "flaky", "sql", "SELECT * FROM no_such_table", retries=2, retry_backoff="0.2s")
    run = run_job(ws, "flaky", trigger="schedule")
    runs = store.runs("flaky")
    assert run.status == "failed" and run.attempt == 3
    assert [r.attempt for r in runs] == [3, 2, 1]  # newest first
    assert [r.trigger for r in runs] == ["retry", "retry", "schedule"]
    assert all(r.status == "failed" and "no_such_table" in r.error for r in runs)
    assert len({r.run_id for r in runs}) == 3 and all(r.output_path for r in runs)
    # doubling backoff: 0.2 s, then 0.4 s between attempts
    assert (runs[1].start - runs[2].end).total_seconds() >= 0.2
    assert (runs[0].start - runs[1].end).total_seconds() >= 0.4


def test_a_run_over_max_concurrent_is_skipped_with_the_reason(ws, store):
    from mlsql.locks import FileLock

    _job(store, "busy", "sql", "SELECT 1")
    other = FileLock(job_dir(ws, "busy") / "slots" / "0.lock", who="job busy (run elsewhere)")
    other.acquire(timeout=1)
    try:
        run = run_job(ws, "busy")
    finally:
        other.release()
    assert run.status == "skipped" and run.output_path is None
    assert "max_concurrent = 1" in run.error and "job busy (run elsewhere)" in run.error
    assert store.runs("busy")[0].status == "skipped"


def test_unknown_job_and_trigger(ws, store):
    from mlsql.errors import JobError, UnknownJobError

    with pytest.raises(UnknownJobError):
        run_job(ws, "ghost")
    _job(store, "x", "sql", "SELECT 1")
    with pytest.raises(JobError, match="Unknown trigger"):
        run_job(ws, "x", trigger="cron")

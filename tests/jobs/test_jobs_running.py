"""A run in progress is history too: while a scheduled job's first run is still going (its
notebook sleeps in a real kernel started by the real scheduler and runner), ML.JOB_RUNS and the
store list it with status 'running', no end and no duration yet."""

from __future__ import annotations

from jobhelpers import wait_for, write_notebook

import mlsql
from mlsql.jobs.scheduler import Scheduler


def test_a_running_first_run_is_listed_as_running(tmp_path, ws, store):
    started = tmp_path / "started"
    nb = write_notebook(tmp_path / "slow.ipynb",
                        f"import time\nopen({str(started)!r}, 'w').write('x')\ntime.sleep(60)")
    s = mlsql.connect(ws.root)
    scheduler = Scheduler(ws, poll_s=0.2)
    try:
        s.sql(f"CREATE JOB slow OPTIONS (every = '2s') AS NOTEBOOK '{nb}'")
        assert s.sql("SELECT * FROM ML.JOB_RUNS('slow')").to_arrow().num_rows == 0  # not run yet
        scheduler.start()
        # the notebook's first cell has run: the run is mid-way, in its kernel
        wait_for(started.exists, 60, "the job's kernel to start the notebook")
        runs = s.sql("SELECT * FROM ML.JOB_RUNS('slow')").to_arrow().to_pylist()
        first = runs[-1]  # newest first: the oldest row is the first run (later ones may be 'skipped')
        assert first["status"] == "running", runs
        assert first["trigger"] == "schedule" and first["attempt"] == 1
        assert first["start"] is not None and first["end"] is None and first["duration_s"] is None
        assert first["error"] is None and first["output_path"].endswith(f"_{first['run_id']}.ipynb")
        assert [r["status"] for r in runs[:-1]] == ["skipped"] * (len(runs) - 1)  # max_concurrent = 1
        # the store's view of runs in progress, whatever 'skipped' rows came after (the panel's "last")
        assert [r.run_id for r in store.running("slow")] == [first["run_id"]]
        # SHOW JOBS and DESCRIBE JOB call it the last run too, not the newest 'skipped' record
        wait_for(lambda: len(store.runs("slow")) > 1, 30, "a skipped run after the running one")
        shown = s.sql("SHOW JOBS").to_arrow().to_pylist()
        assert [(j["job"], j["last_status"]) for j in shown] == [("slow", "running")]
        props = s.sql("DESCRIBE JOB slow").to_arrow().to_pydict()
        described = dict(zip(props["property"], props["value"]))
        assert described["last_status"] == "running" and described["last_run"] == first["run_id"]
    finally:
        scheduler.shutdown()
        s.close()
    # the scheduler stopped the run it had started: recorded failed, with the reason and an end
    last = store.runs("slow")[-1]
    assert last.status == "failed" and "scheduler running it shut down" in last.error and last.end is not None

"""The job statements from SQL: CREATE / SHOW / DESCRIBE / RUN / ALTER / DROP JOB and ML.JOB_RUNS."""

from __future__ import annotations

import pytest

from mlsql.errors import JobError, MLSQLError, ParseError, UnknownJobError


def test_a_job_of_statements_from_create_to_drop(session):
    s = session
    r = s.sql("""CREATE JOB refresh OPTIONS (every = '1h', parameters = {'n': 3}, retries = 1)
                 AS (CREATE OR REPLACE TABLE counts AS SELECT 42 AS n; INSERT INTO counts VALUES (43))""")
    assert "Created job refresh (every 1 h); next run" in r.message
    shown = s.sql("SHOW JOBS").to_arrow().to_pylist()
    assert [(j["job"], j["kind"], j["schedule"], j["paused"]) for j in shown] == [("refresh", "sql", "every 1 h", False)]
    assert shown[0]["next_run"] is not None and shown[0]["last_status"] is None
    props = dict(s.sql("DESCRIBE JOB refresh").fetchall())
    assert props["kind"] == "sql" and props["option.retries"] == "1" and "INSERT INTO counts" in props["target"]
    run = s.sql("RUN JOB refresh")
    assert "Job refresh succeeded" in run.message
    assert s.sql("SELECT list(n ORDER BY n) FROM counts").scalar() == [42, 43]  # the job wrote the shared workspace
    runs = s.sql("SELECT status, trigger, output_path FROM ML.JOB_RUNS('refresh')").to_arrow().to_pylist()
    assert [(r["status"], r["trigger"]) for r in runs] == [("succeeded", "manual")]
    assert runs[0]["output_path"].endswith(".ipynb")
    assert "paused" in s.sql("ALTER JOB refresh PAUSE").message
    assert s.sql("SHOW JOBS").to_arrow().column("paused").to_pylist() == [True]
    assert "resumed" in s.sql("ALTER JOB refresh RESUME").message
    assert "already exists" in s.sql("CREATE JOB IF NOT EXISTS refresh OPTIONS (every = '2h') AS (SELECT 1)").message
    with pytest.raises(JobError, match="CREATE OR REPLACE JOB"):
        s.sql("CREATE JOB refresh OPTIONS (every = '2h') AS (SELECT 1)")
    s.sql("DROP JOB refresh")
    assert s.sql("SHOW JOBS").to_arrow().num_rows == 0
    assert "nothing dropped" in s.sql("DROP JOB IF EXISTS refresh").message


def test_a_failing_job_fails_its_run_with_the_statements_error(session):
    s = session
    s.sql("CREATE JOB broken OPTIONS (every = '1 day') AS (SELECT * FROM no_such_table)")
    with pytest.raises(JobError) as info:
        s.sql("RUN JOB broken")
    assert "Job broken failed" in str(info.value) and "no_such_table" in str(info.value)
    runs = s.sql("SELECT status, error FROM ML.JOB_RUNS('broken')").to_arrow().to_pylist()
    assert runs[0]["status"] == "failed" and "no_such_table" in runs[0]["error"]


def test_job_statement_errors_say_what_is_wrong(session, tmp_path):
    s = session
    with pytest.raises(JobError, match="does not exist"):
        s.sql(f"CREATE JOB j OPTIONS (every = '1h') AS NOTEBOOK '{tmp_path / 'missing.ipynb'}'")
    with pytest.raises(ParseError, match="SELEC"):
        s.sql("CREATE JOB j OPTIONS (every = '1h') AS (SELEC 1)")
    with pytest.raises(MLSQLError, match="schedul"):
        s.sql("CREATE JOB j OPTIONS (shedule = '0 3 * * *') AS (SELECT 1)")
    s.sql("CREATE JOB nightly OPTIONS (schedule = '0 3 * * *') AS (SELECT 1)")
    with pytest.raises(UnknownJobError, match="Did you mean 'nightly'"):
        s.sql("RUN JOB nighty")
    with pytest.raises(ParseError, match="PAUSE or RESUME"):
        s.sql("ALTER JOB nightly STOP")

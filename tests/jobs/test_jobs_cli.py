"""mlsql jobs ...: listing, inspecting, changing and exporting jobs from a shell."""

from __future__ import annotations

import json
import shlex

from jobhelpers import mlsql_cli, write_notebook

from mlsql.jobs import JobSpec, resolve_job_options


def test_export_papermill_and_airflow(tmp_path, ws, store):
    nb = write_notebook(tmp_path / "etl.ipynb", "print(n, region)", parameters="n = 1\nregion = 'us'")
    store.create(JobSpec("etl", "notebook", str(nb), resolve_job_options(
        {"schedule": "0 3 * * *", "timezone": "Europe/Paris", "parameters": {"n": 7, "region": "eu"},
         "timeout": "30m", "retries": 2, "kernel": "python3", "description": "nightly load"})))
    out = mlsql_cli("jobs", "export", "etl", "--format", "papermill", "--workspace", ws.root)
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.strip().splitlines()[-1]
    assert "papermill" in cmd and str(nb) in cmd and f"MLSQL_HOME={ws.root}" in cmd
    words = shlex.split(cmd.replace('"$(date', '"DATE').replace(')_papermill', '_papermill'))
    assert json.loads(words[words.index("-y") + 1]) == {"n": 7, "region": "eu"}
    assert words[words.index("-k") + 1] == "python3" and "timeout" in words and "1800" in words

    dag = mlsql_cli("jobs", "export", "etl", "--format", "airflow", "--workspace", ws.root)
    assert dag.returncode == 0, dag.stderr
    compile(dag.stdout, "mlsql_etl_dag.py", "exec")
    assert "BashOperator" in dag.stdout and "papermill" in dag.stdout and "'0 3 * * *'" in dag.stdout
    assert "Europe/Paris" in dag.stdout and '{"n": 7, "region": "eu"}' in dag.stdout
    assert "'retries': 2" in dag.stdout and "timedelta(seconds=1800.0)" in dag.stdout

    store.create(JobSpec("script", "sql", "SELECT 1 AS one", resolve_job_options({"every": "90s"})))
    dag = mlsql_cli("jobs", "export", "script", "--format", "airflow", "--workspace", ws.root)
    compile(dag.stdout, "mlsql_script_dag.py", "exec")
    assert "timedelta(seconds=90.0)" in dag.stdout
    source = ws.root / "jobs" / "script" / "source.ipynb"
    assert source.exists() and "%%mlsql\\nSELECT 1 AS one" in source.read_text()


def test_list_show_runs_pause_drop(tmp_path, ws, store):
    store.create(JobSpec("a", "sql", "SELECT 1", resolve_job_options({"every": "5 minutes"})))
    out = mlsql_cli("jobs", "list", "--workspace", ws.root)
    assert out.returncode == 0 and "every 5m" in out.stdout and "active" in out.stdout
    assert "No scheduler is running" in out.stdout
    assert "paused" in mlsql_cli("jobs", "pause", "a", "--workspace", ws.root).stdout
    show = mlsql_cli("jobs", "show", "a", "--workspace", ws.root)
    assert show.returncode == 0 and "state:          paused" in show.stdout and "SELECT 1" in show.stdout
    assert "No runs yet" in mlsql_cli("jobs", "runs", "a", "--workspace", ws.root).stdout
    bad = mlsql_cli("jobs", "show", "b", "--workspace", ws.root)
    assert bad.returncode == 1 and "Unknown job 'b'" in bad.stderr and "Traceback" not in bad.stderr
    assert mlsql_cli("jobs", "drop", "a", "--workspace", ws.root).returncode == 0
    assert store.list() == []
    assert mlsql_cli("jobs", "drop", "a", "--if-exists", "--workspace", ws.root).returncode == 0
    assert mlsql_cli("jobs", "drop", "a", "--workspace", ws.root).returncode == 1


def test_jobs_run_runs_now_and_reports(tmp_path, ws, store):
    store.create(JobSpec("oops", "sql", "SELEC 1", resolve_job_options({"every": "1h"})))
    out = mlsql_cli("jobs", "run", "oops", "--workspace", ws.root)
    assert out.returncode == 1
    assert "manual" in out.stdout and "failed" in out.stdout
    assert "job oops failed" in out.stderr and "syntax error" in out.stderr and "Traceback" not in out.stderr
    assert store.runs("oops")[0].status == "failed"

"""Handing a job to an existing orchestrator: a papermill command line or an Airflow DAG file.

Both run the same notebook with the same parameters, kernel, working folder and workspace
(MLSQL_HOME) as the MLSQL scheduler would, and keep executed notebooks in the same folder.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from mlsql.jobs.runner import job_dir, source_notebook
from mlsql.jobs.store import JobSpec
from mlsql.workspace import Workspace


def _notebook_and_cwd(ws: Workspace, spec: JobSpec) -> tuple[Path, Path]:
    """The notebook to run: the job's own, or (an MLSQL script job) its generated notebook,
    written once to <workspace>/jobs/<name>/source.ipynb so the orchestrator can read it."""
    if spec.kind == "notebook":
        nb = Path(spec.target)
        return nb, nb.parent
    folder = job_dir(ws, spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    nb = folder / "source.ipynb"
    nb.write_text(json.dumps(source_notebook(spec), indent=1))
    return nb, Path(ws.root).parent


def _papermill_args(ws: Workspace, spec: JobSpec, output: str) -> list[str]:
    nb, cwd = _notebook_and_cwd(ws, spec)
    args = ["papermill", str(nb), output, "--cwd", str(cwd), "--no-progress-bar"]
    if spec.options.get("kernel"):
        args += ["-k", spec.options["kernel"]]
    if spec.options.get("parameters"):
        args += ["-y", json.dumps(spec.options["parameters"])]  # JSON is YAML: types survive exactly
    return args


def papermill_command(ws: Workspace, spec: JobSpec) -> str:
    """A shell command that runs one attempt of the job like the scheduler does."""
    out = f"{job_dir(ws, spec.name)}/$(date -u +%Y%m%dT%H%M%SZ)_papermill.ipynb"
    args = _papermill_args(ws, spec, "@OUT@")
    cmd = " ".join(shlex.quote(a) for a in args).replace("@OUT@", f'"{out}"')
    if spec.options.get("timeout"):
        # papermill's own --execution-timeout is per cell; the job's limit is for the whole run
        cmd = f"timeout --kill-after=10 {int(-(-float(spec.options['timeout']) // 1))} {cmd}"
    env = (f"MLSQL_HOME={shlex.quote(str(ws.root))} "
           f"MLSQL_PROCESS={shlex.quote(f'job {spec.name} (papermill)')}")
    lines = [f"# MLSQL job {spec.name}: {spec.schedule_text}"
             + (f", {spec.options['description']}" if spec.options.get("description") else ""),
             f"mkdir -p {shlex.quote(str(job_dir(ws, spec.name)))}",
             f"{env} {cmd}"]
    return "\n".join(lines)


def airflow_dag(ws: Workspace, spec: JobSpec) -> str:
    """A DAG file running the job with a BashOperator calling papermill, on the same schedule."""
    from datetime import datetime

    opts = spec.options
    out = f"{job_dir(ws, spec.name)}/{{{{ ts_nodash }}}}_airflow.ipynb"
    cmd = " ".join(shlex.quote(a) for a in _papermill_args(ws, spec, "@OUT@")).replace("@OUT@", shlex.quote(out))
    if opts.get("schedule"):
        schedule = repr(opts["schedule"])
    else:
        schedule = f"timedelta(seconds={float(opts['every'])!r})"
    created = datetime.fromisoformat(spec.created_at) if spec.created_at else datetime(2024, 1, 1)
    tz = opts.get("timezone") or "UTC"
    default_args = {"owner": "mlsql", "retries": int(opts.get("retries") or 0)}
    dag_id = "mlsql_" + re.sub(r"[^A-Za-z0-9_]", "_", spec.name)
    lines = [
        f'"""MLSQL job {spec.name}, exported by `mlsql jobs export {spec.name} --format airflow`.',
        "",
        f"{spec.schedule_text}. Runs the notebook with papermill as the MLSQL scheduler does,",
        f"with MLSQL_HOME={ws.root}. Do not run the MLSQL scheduler for this job as well:",
        f"pause it there (mlsql jobs pause {spec.name}).",
        '"""',
        "from datetime import timedelta",
        "",
        "import pendulum",
        "from airflow import DAG",
        "",
        "try:",
        "    from airflow.providers.standard.operators.bash import BashOperator",
        "except ImportError:  # Airflow 2",
        "    from airflow.operators.bash import BashOperator",
        "",
        f"default_args = {default_args!r}",
        f"default_args['retry_delay'] = timedelta(seconds={float(opts.get('retry_backoff') or 0)!r})",
        "default_args['retry_exponential_backoff'] = True",
    ]
    if opts.get("timeout"):
        lines.append(f"default_args['execution_timeout'] = timedelta(seconds={float(opts['timeout'])!r})")
    lines += [
        "",
        "with DAG(",
        f"    dag_id={dag_id!r},",
        f"    description={(opts.get('description') or f'MLSQL job {spec.name}')!r},",
        f"    schedule={schedule},",
        f"    start_date=pendulum.datetime({created.year}, {created.month}, {created.day}, tz={tz!r}),",
        "    catchup=False,  # like the MLSQL scheduler, no backfill of old missed runs",
        f"    max_active_runs={int(opts.get('max_concurrent') or 1)},",
        "    default_args=default_args,",
        "    tags=['mlsql'],",
        ") as dag:",
        "    BashOperator(",
        "        task_id='run_notebook',",
        f"        bash_command={('mkdir -p ' + shlex.quote(str(job_dir(ws, spec.name))) + ' && ' + cmd)!r},",
        f"        env={{'MLSQL_HOME': {str(ws.root)!r}, 'MLSQL_PROCESS': {f'job {spec.name} (airflow)'!r}}},",
        "        append_env=True,",
        "    )",
        "",
    ]
    return "\n".join(lines)

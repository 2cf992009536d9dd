"""The job store across processes, and the checks on CREATE JOB options."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest

from mlsql.errors import JobError, OptionError, UnknownJobError, UnknownOptionError
from mlsql.jobs import JOB_OPTIONS, JobSpec, resolve_job_options


def _in_other_process(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_store_round_trip_across_processes(tmp_path, ws, store):
    (tmp_path / "etl.ipynb").write_text("{}")
    _in_other_process(
        "from mlsql.jobs import JobSpec, JobStore, resolve_job_options\n"
        f"st = JobStore({str(ws.root)!r})\n"
        "opts = resolve_job_options({'every': '5 minutes', 'parameters': {'n': 3, 'tags': ['a', 'b']}, "
        "'retries': 2, 'description': 'nightly load'})\n"
        f"st.create(JobSpec('Nightly', 'notebook', {str(tmp_path / 'etl.ipynb')!r}, opts))\n")
    spec = store.get("nightly")  # names are case-insensitive, kept as written
    assert spec.name == "Nightly" and spec.kind == "notebook" and spec.target == str(tmp_path / "etl.ipynb")
    assert spec.options["every"] == 300.0 and spec.options["parameters"] == {"n": 3, "tags": ["a", "b"]}
    assert spec.options["retries"] == 2 and spec.options["retry_backoff"] == 10.0 and not spec.paused
    assert datetime.fromisoformat(spec.created_at).tzinfo is not None
    # a change here is seen there, and the change counter moved (what a scheduler polls)
    v = store.version()
    store.set_paused("Nightly", True)
    assert store.version() > v
    out = _in_other_process(
        f"from mlsql.jobs import JobStore\ns = JobStore({str(ws.root)!r}).get('Nightly')\n"
        "print(s.paused, s.options['description'])")
    assert out.strip() == "True nightly load"
    assert store.next_run_time(store.get("Nightly")) is None
    store.set_paused("Nightly", False)
    nxt = store.next_run_time(store.get("Nightly"))
    assert nxt is not None and timedelta(0) < nxt - datetime.now(timezone.utc) <= timedelta(minutes=5)
    assert [s.name for s in store.list()] == ["Nightly"] and store.runs("Nightly") == []


def test_create_replace_drop_and_unknown_names(store):
    opts = resolve_job_options({"schedule": "0 3 * * *"})
    store.create(JobSpec("etl", "sql", "SELECT 1", opts))
    with pytest.raises(JobError, match="already exists") as e:
        store.create(JobSpec("etl", "sql", "SELECT 2", opts))
    assert "CREATE OR REPLACE JOB" in str(e.value)
    assert store.create(JobSpec("etl", "sql", "SELECT 2", opts), if_not_exists=True) is None
    assert store.get("etl").target == "SELECT 1"
    assert store.create(JobSpec("etl", "sql", "SELECT 3", opts), replace=True).target == "SELECT 3"
    with pytest.raises(UnknownJobError) as e:
        store.get("elt")
    assert "Did you mean 'etl'?" in str(e.value)
    with pytest.raises(UnknownJobError):
        store.runs("nope")
    assert store.drop("nope", if_exists=True) is False
    assert store.drop("etl") is True and store.list() == []
    with pytest.raises(UnknownJobError):
        store.drop("etl")
    with pytest.raises(JobError, match="Notebook /no/such.ipynb does not exist"):
        store.create(JobSpec("nb", "notebook", "/no/such.ipynb", opts))


def test_option_messages():
    assert JOB_OPTIONS[:2] == ("schedule", "every")
    with pytest.raises(UnknownOptionError) as e:
        resolve_job_options({"every": "1h", "schedul": "x"})
    assert "Unknown option 'schedul' in CREATE JOB OPTIONS" in str(e.value)
    assert "Did you mean 'schedule'?" in str(e.value)
    with pytest.raises(UnknownOptionError, match="Did you mean 'retries'"):
        resolve_job_options({"every": "1h", "retry": 3})
    with pytest.raises(OptionError, match="schedule = '61 \\* \\* \\* \\*' is not a valid cron") as e:
        resolve_job_options({"schedule": "61 * * * *"})
    assert "minute (0-59)" in str(e.value)
    with pytest.raises(OptionError, match="5 fields"):
        resolve_job_options({"schedule": "every day"})
    with pytest.raises(OptionError, match="schedule and every were both given"):
        resolve_job_options({"schedule": "0 3 * * *", "every": "1h"})
    with pytest.raises(OptionError, match="needs OPTIONS"):
        resolve_job_options({"retries": 1})
    with pytest.raises(OptionError, match=r"every = '5 parsecs' is not a duration") as e:
        resolve_job_options({"every": "5 parsecs"})
    assert "'90 seconds'" in str(e.value)
    with pytest.raises(OptionError, match="retries = -1 must be a whole number >= 0"):
        resolve_job_options({"every": "1h", "retries": -1})
    with pytest.raises(OptionError, match="max_concurrent = 0"):
        resolve_job_options({"every": "1h", "max_concurrent": 0})
    with pytest.raises(OptionError, match="Did you mean 'Europe/Paris'"):
        resolve_job_options({"every": "1h", "timezone": "Europe/Pariss"})
    with pytest.raises(OptionError, match="not a valid Python variable name"):
        resolve_job_options({"every": "1h", "parameters": {"not valid": 1}})
    with pytest.raises(OptionError, match="is not an installed Jupyter kernel"):
        resolve_job_options({"every": "1h", "kernel": "no_such_kernel_here"})


def test_option_values_are_normalized():
    o = resolve_job_options({"EVERY": "90 seconds", "timeout": "30m", "retry_backoff": "0.2s", "retries": 2,
                             "max_concurrent": 3, "kernel": "python3", "timezone": "Europe/Paris"})
    assert (o["every"], o["timeout"], o["retry_backoff"], o["retries"], o["max_concurrent"]) == (90.0, 1800.0, 0.2,
                                                                                                2, 3)
    assert o["schedule"] is None and o["kernel"] == "python3" and o["timezone"] == "Europe/Paris"
    assert resolve_job_options({"every": 2})["every"] == 2.0
    assert resolve_job_options({"every": "1 day"})["every"] == 86400.0
    assert resolve_job_options({"every": "1h"})["every"] == 3600.0
    d = resolve_job_options({"schedule": "*/15  * * * mon-fri"})
    assert d["schedule"] == "*/15 * * * mon-fri" and d["timezone"] == "UTC" and d["parameters"] == {}
    assert d["timeout"] is None and d["retries"] == 0 and d["max_concurrent"] == 1 and d["kernel"] is None


def test_cron_next_run_time_uses_the_time_zone(store):
    spec = store.create(JobSpec("daily", "sql", "SELECT 1",
                                resolve_job_options({"schedule": "30 3 * * *", "timezone": "America/New_York"})))
    nxt = store.next_run_time(spec)
    local = nxt.astimezone(__import__("zoneinfo").ZoneInfo("America/New_York"))
    assert (local.hour, local.minute) == (3, 30)


def test_import_mlsql_stays_light():
    out = _in_other_process("import sys, mlsql, mlsql.jobs\n"
                            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                            "('papermill', 'apscheduler', 'nbformat', 'jupyter_client')))")
    assert out.strip() == "[]"

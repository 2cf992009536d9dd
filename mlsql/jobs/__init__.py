"""Scheduled notebook jobs and alerts: definitions and history in the workspace, runs through papermill.

Light to import: papermill and APScheduler load when a job runs or is scheduled.
See docs/JOBS.md.
"""

from __future__ import annotations

from mlsql.jobs.alerts import AlertCheck, AlertSpec, AlertStore, check_alert, resolve_alert_options
from mlsql.jobs.options import JOB_OPTIONS, parse_duration, resolve_job_options
from mlsql.jobs.runner import job_dir, run_job
from mlsql.jobs.store import JobRun, JobSpec, JobStore

__all__ = ["AlertCheck", "AlertSpec", "AlertStore", "check_alert", "resolve_alert_options", "JOB_OPTIONS", "JobRun", "JobSpec", "JobStore", "job_dir", "parse_duration", "resolve_job_options",
           "run_job"]

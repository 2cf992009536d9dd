"""The OPTIONS of CREATE JOB: names, defaults, and checks with messages that say what is allowed.

Everything here is light (no APScheduler at import): ``import mlsql`` pulls it in through the
parser. A cron string is only checked with APScheduler when a job is created.
"""

from __future__ import annotations

from mlsql.errors import OptionError
from mlsql.language.options import defaults, options_of, parse_duration, validate

# names, types, ranges and defaults are declared in mlsql.language.options' table, with every other statement's
JOB_OPTIONS: tuple[str, ...] = tuple(o.name for o in options_of("CREATE JOB"))
DEFAULTS: dict = defaults("CREATE JOB")
__all__ = ["DEFAULTS", "JOB_OPTIONS", "check_cron", "format_duration", "parse_duration", "resolve_job_options"]


def format_duration(seconds: float | None) -> str:
    """'2s', '5m', '1h30m': the shortest readable form of a number of seconds."""
    if seconds is None:
        return "-"
    if seconds < 60 or seconds != int(seconds):
        return f"{seconds:g}s"
    out, rest = [], int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out)


def check_cron(expr, timezone: str = "UTC"):
    """The APScheduler trigger of a 5-field crontab string, or an OptionError saying what is wrong."""
    if not isinstance(expr, str) or len(expr.split()) != 5:
        raise OptionError(f"Option schedule = {expr!r} is not a cron schedule",
                          hint="Use 5 fields: minute hour day-of-month month day-of-week, e.g. "
                               "'0 3 * * *' (03:00 every day) or '*/15 * * * mon-fri'.")
    from apscheduler.triggers.cron import CronTrigger

    try:
        return CronTrigger.from_crontab(expr, timezone=timezone)
    except (ValueError, TypeError) as exc:
        raise OptionError(f"Option schedule = {expr!r} is not a valid cron schedule: {exc}",
                          hint="Fields: minute (0-59) hour (0-23) day-of-month (1-31) month (1-12) "
                               "day-of-week (0-6 or mon-sun); '*', '*/n', 'a-b' and 'a,b' work in each.") from None


def _check_timezone(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"Option timezone = {value!r} is not a time zone name",
                          hint="Use an IANA name such as 'UTC', 'Europe/Paris' or 'America/New_York'.")
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        from mlsql.errors import did_you_mean

        near = did_you_mean(value, available_timezones())
        raise OptionError(f"Option timezone = {value!r} is not a known time zone",
                          hint=(f"Did you mean '{near}'? " if near else "")
                          + "Use an IANA name such as 'UTC', 'Europe/Paris' or 'America/New_York'.") from None
    return value


def _check_kernel(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise OptionError(f"Option kernel = {value!r} must be a kernel name such as 'python3' or 'mlsql'")
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        installed = sorted(KernelSpecManager().find_kernel_specs())
    except Exception:  # no jupyter_client here: the run will say it if the kernel is missing
        return value
    if installed and value not in installed:
        from mlsql.errors import did_you_mean

        near = did_you_mean(value, installed)
        raise OptionError(f"Option kernel = {value!r} is not an installed Jupyter kernel",
                          hint=(f"Did you mean '{near}'? " if near else "")
                          + f"Installed kernels: {', '.join(installed)} (jupyter kernelspec list).")
    return value


def resolve_job_options(raw: dict) -> dict:
    """Checked, normalized job options (durations in seconds) with every default filled in."""
    given = validate("CREATE JOB", raw)  # names, types and ranges
    opts = defaults("CREATE JOB")
    has_schedule = given.get("schedule") is not None
    has_every = given.get("every") is not None
    if has_schedule and has_every:
        raise OptionError("Options schedule and every were both given; a job has one of them",
                          hint="schedule = '0 3 * * *' runs on a cron schedule; every = '10 minutes' runs "
                               "at a fixed interval.")
    if not has_schedule and not has_every:
        raise OptionError("A job needs OPTIONS (schedule = '<cron>') or OPTIONS (every = '<duration>')",
                          hint="For example schedule = '0 3 * * *' (03:00 every day) or every = '15 minutes'.")
    if given.get("timezone") is not None:
        opts["timezone"] = _check_timezone(given["timezone"])
    if has_schedule:
        check_cron(given["schedule"], opts["timezone"])
        opts["schedule"] = " ".join(given["schedule"].split())
    if "kernel" in given:
        opts["kernel"] = _check_kernel(given["kernel"])
    for name in ("every", "parameters", "timeout", "retries", "retry_backoff", "max_concurrent", "description"):
        if name in given:
            opts[name] = given[name]
    return opts

"""The OPTIONS of CREATE JOB: names, defaults, and checks with messages that say what is allowed.

Everything here is light (no APScheduler at import): ``import mlsql`` pulls it in through the
parser. A cron string is only checked with APScheduler when a job is created.
"""

from __future__ import annotations

import json
import math
import re

from ..errors import OptionError, UnknownOptionError

JOB_OPTIONS: tuple[str, ...] = ("schedule", "every", "timezone", "parameters", "timeout", "retries",
                                "retry_backoff", "max_concurrent", "kernel", "description")

DEFAULTS: dict = {"schedule": None, "every": None, "timezone": "UTC", "parameters": {}, "timeout": None,
                  "retries": 0, "retry_backoff": 10.0, "max_concurrent": 1, "kernel": None, "description": None}

_UNITS = {
    "ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
DURATION_HELP = "a duration such as '2s', '90 seconds', '5 minutes', '1h', '1 day', or a number of seconds"


def parse_duration(option: str, value, *, allow_zero: bool = False) -> float:
    """Seconds in ``value`` ('90 seconds', '1h', 2.5); an OptionError naming ``option`` otherwise."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m and m.group(2).lower() in _UNITS | {"": 1.0}:
            seconds = float(m.group(1)) * (_UNITS.get(m.group(2).lower(), 1.0))
    if seconds is None or not math.isfinite(seconds):
        raise OptionError(f"Option {option} = {value!r} is not a duration", hint=f"Use {DURATION_HELP}.")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise OptionError(f"Option {option} = {value!r} must be {'0 or more' if allow_zero else 'more than 0'} "
                          "seconds", hint=f"Use {DURATION_HELP}.")
    return seconds


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
        from ..errors import did_you_mean

        near = did_you_mean(value, available_timezones())
        raise OptionError(f"Option timezone = {value!r} is not a known time zone",
                          hint=(f"Did you mean '{near}'? " if near else "")
                          + "Use an IANA name such as 'UTC', 'Europe/Paris' or 'America/New_York'.") from None
    return value


def _check_int(option: str, value, minimum: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise OptionError(f"Option {option} = {value!r} must be a whole number >= {minimum}")
    return value


def _check_parameters(value) -> dict:
    if not isinstance(value, dict):
        raise OptionError(f"Option parameters = {value!r} must be a STRUCT of name = value",
                          hint="For example: parameters = STRUCT(10 AS n, 'eu' AS region), "
                               "or parameters = {'n': 10, 'region': 'eu'}.")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise OptionError(f"Option parameters: {k!r} is not a valid Python variable name",
                              hint="Each parameter becomes a variable assigned in the notebook.")
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise OptionError(f"Option parameters: {k} = {v!r} is not a plain value",
                              hint="Use numbers, strings, booleans, NULL, lists and structs of those.") from None
        out[k] = v
    return out


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
        from ..errors import did_you_mean

        near = did_you_mean(value, installed)
        raise OptionError(f"Option kernel = {value!r} is not an installed Jupyter kernel",
                          hint=(f"Did you mean '{near}'? " if near else "")
                          + f"Installed kernels: {', '.join(installed)} (jupyter kernelspec list).")
    return value


def resolve_job_options(raw: dict) -> dict:
    """Checked, normalized job options (durations in seconds) with every default filled in."""
    opts = dict(DEFAULTS)
    opts["parameters"] = {}
    given = {}
    for key, value in (raw or {}).items():
        name = str(key).lower()
        if name not in JOB_OPTIONS:
            raise UnknownOptionError(name, JOB_OPTIONS, where="in CREATE JOB OPTIONS")
        given[name] = value
    has_schedule = given.get("schedule") is not None
    has_every = given.get("every") is not None
    if has_schedule and has_every:
        raise OptionError("Options schedule and every were both given; a job has one of them",
                          hint="schedule = '0 3 * * *' runs on a cron schedule; every = '10 minutes' runs "
                               "at a fixed interval.")
    if not has_schedule and not has_every:
        raise OptionError("A job needs OPTIONS (schedule = '<cron>') or OPTIONS (every = '<duration>')",
                          hint="For example schedule = '0 3 * * *' (03:00 every day) or every = '15 minutes'.")
    if "timezone" in given and given["timezone"] is not None:
        opts["timezone"] = _check_timezone(given["timezone"])
    if has_schedule:
        check_cron(given["schedule"], opts["timezone"])
        opts["schedule"] = " ".join(given["schedule"].split())
    else:
        opts["every"] = parse_duration("every", given["every"])
    if given.get("parameters") is not None:
        opts["parameters"] = _check_parameters(given["parameters"])
    if given.get("timeout") is not None:
        opts["timeout"] = parse_duration("timeout", given["timeout"])
    if given.get("retries") is not None:
        opts["retries"] = _check_int("retries", given["retries"], 0)
    if given.get("retry_backoff") is not None:
        opts["retry_backoff"] = parse_duration("retry_backoff", given["retry_backoff"], allow_zero=True)
    if given.get("max_concurrent") is not None:
        opts["max_concurrent"] = _check_int("max_concurrent", given["max_concurrent"], 1)
    if "kernel" in given:
        opts["kernel"] = _check_kernel(given["kernel"])
    if given.get("description") is not None:
        if not isinstance(given["description"], str):
            raise OptionError(f"Option description = {given['description']!r} must be a string")
        opts["description"] = given["description"]
    return opts

"""``POST /v1/models/<name>/profile``: ML.PROFILE on the device. The installed version's model run
with ONNX Runtime's profiler (device_bridge.profiling) on synthetic inputs of its input schema
(timing, not answers: no caller data is needed or kept). Bounded: at most MAX_RUNS runs of at most
MAX_BATCH_SIZES batch sizes of at most MAX_BATCH rows, and one profile at a time on the agent (a
second caller gets 429), so profiling cannot take the device from the models it serves for long."""

from __future__ import annotations

import threading
from typing import Any

from device_bridge import package as pkg
from device_bridge import profiling
from device_bridge.agent.core import AgentError

FIELDS = ("version", "batch_sizes", "runs", "provider")
_one_at_a_time = threading.Lock()


def check_body(body: Any) -> dict:
    """The request's settings, checked before any work: a 400 naming what is wrong."""
    if not isinstance(body, dict):
        raise AgentError(400, "body must be a JSON object", "request")
    extra = sorted(set(body) - set(FIELDS))
    if extra:
        raise AgentError(400, f"unknown field {extra[0]!r} in profile: it takes {', '.join(FIELDS)}", "request")
    version = body.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise AgentError(400, f"version must be a positive integer, got {version!r}", "request")
    try:
        batch_sizes, runs, provider = profiling.check_settings(body.get("batch_sizes", [1, 32]), body.get("runs", 50),
                                                                body.get("provider", "cpu"))
    except profiling.ProfileError as exc:
        raise AgentError(400, str(exc), "request") from None
    return {"version": version, "batch_sizes": batch_sizes, "runs": runs, "provider": provider}


def run_profile(core, name: str, settings: dict) -> dict:
    """The profile's rows of model ``name`` (its active version, or ``settings['version']``)."""
    lv = core.resolve(name, settings["version"])
    if not _one_at_a_time.acquire(blocking=False):
        raise AgentError(429, "a profile is running on this agent; try again when it is done", "busy")
    try:
        data = (lv.folder / pkg.MODEL_FILE).read_bytes()
        inputs = [c.to_dict() for c in lv.manifest.inputs]
        short = next(k for k, v in profiling._PROVIDERS.items() if v == settings["provider"])
        rows = profiling.profile(data, lambda b: profiling.synthetic_feeds(inputs, b), settings["batch_sizes"],
                                 settings["runs"], short)
    finally:
        _one_at_a_time.release()
    core.telemetry.event("profile", model=name, version=lv.manifest.version, runs=settings["runs"])
    return {"name": name, "version": lv.manifest.version, "rows": rows}

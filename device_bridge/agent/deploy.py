"""A deployment's settings for sharing the device: priority class, concurrency, queue, deadline,
memory budget and isolation.

They come, per field, from (last wins): the class defaults below, the signed manifest's ``deploy``
field (the package's deploy settings), and the install or activate request (query parameters of a
binary install, fields of a JSON install or of an activate body, the hub's desired state), which
the agent keeps per version in ``state.json`` as it keeps a deploy's providers. ``/v1/info`` shows
the effective settings of each model's active version under ``deploy``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from device_bridge.errors import ApiError

PRIORITIES = ("realtime", "normal", "batch")
ISOLATIONS = ("thread", "process")
FIELDS = ("priority", "max_concurrency", "max_queue", "timeout_ms", "memory_mb", "isolation",
          "sample_rate", "sample_max_mb", "sample_exclude", "sample_hash", "sample_salt", "max_keys", "max_state_mb", "trigger")
SAMPLE_FIELDS = ("sample_rate", "sample_max_mb", "sample_exclude", "sample_hash", "sample_salt")
MAX_SAMPLE_MB = 4096
MAX_FEATURE_KEYS = 1 << 31
MAX_STATE_MB = 1 << 16
MAX_TRIGGER = 16 * 1024
MAX_SAMPLE_COLUMNS = 1024  # names in sample_exclude / sample_hash
MAX_SALT = 1024
MAX_CONCURRENCY = 64
MAX_QUEUE = 4096
MAX_TIMEOUT_MS = 600_000
MAX_MEMORY_MB = 1 << 20
PROCESS_OK = os.name == "posix"  # worker processes need fd passing, rlimits and signals


@dataclass(frozen=True)
class DeploySettings:
    priority: str = "normal"
    max_concurrency: int = 2     # runs of this deployment at once
    max_queue: int = 64          # requests waiting for a run; one more is answered 429
    timeout_ms: int = 10_000     # from the request's arrival to its answer; later: 504
    memory_mb: int = 256         # the budget: enforced for a worker process, counted for a thread
    isolation: str = "thread"    # "process": its own worker process; "thread": in the agent
    # sampling (sampling.py): nothing is kept unless a deploy asks (sample_rate > 0)
    sample_rate: float = 0.0     # share of predict requests whose rows are kept
    sample_max_mb: int = 64      # bytes of samples + outcomes kept on the device for this model
    sample_exclude: tuple = ()   # input columns never stored
    sample_hash: tuple = ()      # input columns stored as HMAC-SHA256(sample_salt, str(value))[:32]
    sample_salt: str | None = None  # the workspace's salt: never shown (to_dict says "set")
    # feature views (features.py): the bounds of the views the package carries; None: the store's defaults
    max_keys: int | None = None      # keys kept per view; over it the keys with the oldest events go first
    max_state_mb: int | None = None  # bytes of a view's state columns
    trigger: dict | None = None      # {"on_table", "when"}: run the model for an event's key (triggers.py)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sample_exclude"] = list(self.sample_exclude)
        d["sample_hash"] = list(self.sample_hash)
        d["sample_salt"] = "set" if self.sample_salt else None
        return d


def class_defaults(priority: str, cores: int) -> dict[str, Any]:
    """Each class's defaults on a device with ``cores`` cores in the agent's budget."""
    cores = max(1, cores)
    if priority == "realtime":
        return {"priority": priority, "max_concurrency": cores, "max_queue": 16, "timeout_ms": 100,
                "memory_mb": 256, "isolation": "thread"}
    if priority == "batch":
        return {"priority": priority, "max_concurrency": 2, "max_queue": 16, "timeout_ms": 60_000,
                "memory_mb": 1024, "isolation": "process" if PROCESS_OK else "thread"}
    return {"priority": "normal", "max_concurrency": cores, "max_queue": 64, "timeout_ms": 10_000,
            "memory_mb": 256, "isolation": "thread"}


def parse(raw: Any, where: str = "request", status: int = 400, kind: str = "request") -> dict[str, Any] | None:
    """Check deploy settings given as a dict (values may be strings, as query parameters are);
    returns the fields that were given, typed, or None when none were. A bad one is an ApiError
    (400 ``request`` by default) naming the field and ``where`` it came from."""

    def bad(msg: str) -> ApiError:
        return ApiError(status, f"{msg} ({where})", kind)

    def integer(field: str, v: Any, lo: int, hi: int) -> int:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise bad(f"deploy setting {field} must be an integer from {lo} to {hi}, got {v!r}")
        return v

    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad(f"deploy settings must be an object of {', '.join(FIELDS)}")
    unknown = sorted(str(k) for k in raw if k not in FIELDS)
    if unknown:
        raise bad(f"unknown deploy setting {unknown[0]!r}; known: {', '.join(FIELDS)}")
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if v is None:
            continue
        if k == "priority":
            if not isinstance(v, str) or v.lower() not in PRIORITIES:
                raise bad(f"deploy setting priority must be one of {', '.join(PRIORITIES)}, got {v!r}")
            out[k] = v.lower()
        elif k == "isolation":
            if not isinstance(v, str) or v.lower() not in ISOLATIONS:
                raise bad(f"deploy setting isolation must be one of {', '.join(ISOLATIONS)}, got {v!r}")
            if v.lower() == "process" and not PROCESS_OK:
                raise bad("deploy setting isolation = 'process' needs a POSIX system (Linux, Android, macOS)")
            out[k] = v.lower()
        elif k == "max_concurrency":
            out[k] = integer(k, v, 1, MAX_CONCURRENCY)
        elif k == "max_queue":
            out[k] = integer(k, v, 0, MAX_QUEUE)
        elif k == "timeout_ms":
            out[k] = integer(k, v, 1, MAX_TIMEOUT_MS)
        elif k == "memory_mb":
            out[k] = integer(k, v, 16, MAX_MEMORY_MB)
        elif k == "sample_rate":
            if isinstance(v, str):
                try:
                    v = float(v.strip())
                except ValueError:
                    raise bad(f"deploy setting sample_rate must be a number from 0 to 1, got {v!r}") from None
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise bad(f"deploy setting sample_rate must be a number from 0 to 1, got {v!r}")
            out[k] = float(v)
        elif k == "sample_max_mb":
            out[k] = integer(k, v, 1, MAX_SAMPLE_MB)
        elif k == "max_keys":
            out[k] = integer(k, v, 1, MAX_FEATURE_KEYS)
        elif k == "max_state_mb":
            out[k] = integer(k, v, 1, MAX_STATE_MB)
        elif k == "trigger":
            if isinstance(v, str):  # the query-parameter form: JSON
                try:
                    v = json.loads(v)
                except ValueError:
                    raise bad("deploy setting trigger must be a JSON object {on_table, when}") from None
            if not isinstance(v, dict) or set(v) - {"on_table", "when"} or not isinstance(v.get("on_table"), str) \
                    or not (v.get("when") is None or isinstance(v["when"], dict)) or len(json.dumps(v)) > MAX_TRIGGER:
                raise bad("deploy setting trigger must be {\"on_table\": TABLE, \"when\": <expression> or null} "
                          f"of at most {MAX_TRIGGER} bytes")
            out[k] = {"on_table": v["on_table"], "when": v.get("when")}
        elif k in ("sample_exclude", "sample_hash"):
            if isinstance(v, str):  # the query-parameter form: comma-separated
                v = [c.strip() for c in v.split(",") if c.strip()]
            if not isinstance(v, list | tuple) or len(v) > MAX_SAMPLE_COLUMNS \
                    or not all(isinstance(c, str) and 0 < len(c) <= 256 for c in v):
                raise bad(f"deploy setting {k} must be a list of column names, got {str(v)[:80]!r}")
            out[k] = sorted(set(v))
        elif k == "sample_salt":
            if not isinstance(v, str) or not 0 < len(v) <= MAX_SALT:
                raise bad(f"deploy setting sample_salt must be a non-empty string of at most {MAX_SALT} characters")
            out[k] = v
    if out.get("sample_hash") and set(out["sample_hash"]) & set(out.get("sample_exclude") or ()):
        both = sorted(set(out["sample_hash"]) & set(out["sample_exclude"]))
        raise bad(f"deploy setting sample_hash and sample_exclude both name {both[0]!r}: a column is either "
                  "excluded or hashed")
    return out or None


def from_query(params) -> dict[str, Any] | None:
    """The deploy settings among a binary install's query parameters."""
    return parse({k: params[k] for k in FIELDS if k in params}, "query")


def effective(manifest_deploy: Any, requested: dict | None, cores: int,
              inputs: list[str] | None = None) -> DeploySettings:
    """Class defaults <- the manifest's signed ``deploy`` field <- the request's settings. The class
    (priority) is chosen first, so that its defaults fill the fields no one gave. ``inputs``: the
    model's input columns, which every name in sample_exclude / sample_hash must be (a typo would
    leave the column it meant stored as it is)."""
    from_manifest = parse(manifest_deploy, "the package's deploy field", 422, "package") or {}
    given = {**from_manifest, **(requested or {})}
    merged = {**class_defaults(given.get("priority", "normal"), cores), **given}
    for k in ("sample_exclude", "sample_hash"):
        if k in merged:
            merged[k] = tuple(merged[k])
    s = DeploySettings(**merged)
    if inputs is not None:
        known = set(inputs)
        for k in ("sample_exclude", "sample_hash"):
            odd = [c for c in getattr(s, k) if c not in known]
            if odd:
                shown = ", ".join(inputs[:30]) + (f", ... ({len(inputs) - 30} more)" if len(inputs) > 30 else "")
                raise ApiError(400, f"deploy setting {k} names {odd[0]!r}, which is not an input of the model "
                                    f"(its inputs: {shown})", "request")
    if s.sample_rate > 0 and s.sample_hash and not s.sample_salt:
        raise ApiError(400, "deploy setting sample_hash needs sample_salt (the workspace's salt): without one a "
                            "hashed column could be reversed by hashing guesses", "request")
    return s

"""Experiment assignment, the same on the hub, the agent and the notebook: standard library only.

A unit (a device's name, a request id, or an input column's value) is assigned to an arm by
``position(experiment, unit)``: the first 8 bytes of sha256(experiment id, NUL, unit) as a number
in [0, 1), compared with the arms' cumulative shares. Deterministic and sticky: the same
experiment and unit give the same arm on every machine, after restarts and reinstalls, and
nothing needs storing. The experiment id is part of the hash, so two experiments on one fleet
split it independently.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

UNITS = ("device", "request")  # besides these, an input column's name
MAX_UNIT = 128
MAX_ARMS = 16
MAX_ID = 200


def position(experiment: str, unit: Any) -> float:
    """The unit's place in [0, 1) for this experiment."""
    h = hashlib.sha256(f"{experiment}\x00{unit}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def arm_index(experiment: str, unit: Any, shares: list[float]) -> int:
    """The arm (its index in ``shares``) the unit is assigned to."""
    x = position(experiment, unit)
    total = 0.0
    for i, s in enumerate(shares):
        total += s
        if x < total:
            return i
    return len(shares) - 1  # float rounding of a sum of shares just under 1


def column_arms(experiment: str, values, shares: list[float]):
    """The arm of each row for a column unit: ``values`` a numpy array of the column (one value per
    row); each distinct value hashed once (its text, ``str(value)``). Returns an int array."""
    import numpy as np

    flat = np.asarray(values).reshape(len(values), -1)[:, 0]
    uniq, inverse = np.unique(flat, return_inverse=True)
    arms = np.fromiter((arm_index(experiment, _text(v), shares) for v in uniq.tolist()), np.int64, len(uniq))
    return arms[inverse.reshape(-1)]


def _text(v: Any) -> str:
    """A column value's text as the hash reads it: a string as is, a bytes value decoded, a whole
    float as an integer (so 7 and 7.0 are one unit), anything else str()."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def check(raw: Any) -> dict:
    """An experiment's settings as the agent keeps them: ``{"id", "unit", "arms": [{"version",
    "share"}]}``; raises ValueError naming the field."""
    if not isinstance(raw, dict):
        raise ValueError("experiment must be an object with id, unit and arms")
    unknown = sorted(str(k) for k in raw if k not in ("id", "unit", "arms"))
    if unknown:
        raise ValueError(f"unknown experiment field {unknown[0]!r}; known: id, unit, arms")
    eid = raw.get("id")
    if not isinstance(eid, str) or not 0 < len(eid) <= MAX_ID:
        raise ValueError(f"experiment.id must be a string of 1 to {MAX_ID} characters")
    unit = raw.get("unit", "device")
    if not isinstance(unit, str) or not 0 < len(unit) <= MAX_UNIT:
        raise ValueError(
            f"experiment.unit must be {', '.join(UNITS)} or an input column's name, got {unit!r}"
        )
    arms = raw.get("arms")
    if not isinstance(arms, list) or not 2 <= len(arms) <= MAX_ARMS:
        raise ValueError(f"experiment.arms must be a list of 2 to {MAX_ARMS} arms")
    out = []
    for i, a in enumerate(arms):
        if not isinstance(a, dict) or set(a) != {"version", "share"}:
            raise ValueError(f"experiment.arms[{i}] must be an object of version and share")
        v, s = a["version"], a["share"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"experiment.arms[{i}].version must be a positive integer, got {v!r}")
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s <= 1 or not math.isfinite(s):
            raise ValueError(f"experiment.arms[{i}].share must be a number in (0, 1], got {s!r}")
        out.append({"version": v, "share": float(s)})
    if abs(sum(a["share"] for a in out) - 1.0) > 1e-9:
        raise ValueError("experiment.arms' shares must sum to 1")
    if len({a["version"] for a in out}) != len(out):
        raise ValueError("experiment.arms must name distinct versions")
    return {"id": eid, "unit": unit, "arms": out}

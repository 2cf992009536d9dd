"""Which wave of a staged rollout a device is in: a fixed point in [0, 100) from the hash of the
model's and the device's names, so that every hub replica, and a device that joins the group in the
middle of a rollout, agree on it without asking anyone. A rollout to ``percent`` % of a group covers
the devices whose point is below ``percent``; the same devices go first for every version of a model
(the canaries stay the canaries)."""

from __future__ import annotations

import hashlib


def bucket(device: str, model: str) -> float:
    """``int(sha256(model + NUL + device)[:8]) / 2**64 * 100``: uniform over [0, 100)."""
    h = hashlib.sha256(f"{model}\0{device}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 * 100

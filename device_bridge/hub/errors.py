"""The hub's errors and the checks of names and digests its stores and routes share."""

from __future__ import annotations

import re

from device_bridge.errors import ApiError

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")



class HubError(ApiError):
    """An error the hub answers with (status, message, kind)."""

    def __init__(self, status: int, message: str, kind: str | None = None):
        if kind is None:
            kind = {401: "auth", 403: "forbidden", 404: "not_found", 409: "conflict", 413: "too_large"}.get(status, "request")
        super().__init__(status, message, kind)


def names_of(v, what: str) -> list[str]:
    if not isinstance(v, list) or len(v) > 100_000 or not all(isinstance(d, str) and NAME_RE.match(d) for d in v):
        raise HubError(400, f"{what} must be a list of names (letters, digits, '_', '.', '-')")
    return v


def name_or_none(v, what: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise HubError(400, f"{what} must be a name (letters, digits, '_', '.', '-'), got {type(v).__name__}")
    return v



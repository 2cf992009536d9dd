"""Errors raised by the device client, hub client and rollout.

Every error carries the server's message (the JSON ``{"error": ...}`` body) and
the HTTP status when there was one. The mlsql side wraps these in its own
``MLSQLError`` classes.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Base class: something went wrong talking to a device or the hub."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.url = url

    def __str__(self) -> str:
        return self.message


class DeviceUnreachableError(DeviceError):
    """No answer: connection refused, timeout, TLS failure."""


class DeviceAuthError(DeviceError):
    """401/403: missing or wrong token."""


class DeviceNotFoundError(DeviceError):
    """404: unknown model, version or route."""


class DeviceRequestError(DeviceError):
    """400/409/413/415/422: the device refused the request (bad input, bad package...)."""


class PackageRejectedError(DeviceRequestError):
    """The device refused a package: unsigned, tampered, untrusted key, too large..."""


class DeviceUnavailableError(DeviceError):
    """503: model suspended by the circuit breaker, or not loaded."""


class DeviceServerError(DeviceError):
    """Any other 5xx."""


class RolloutError(DeviceError):
    """A staged rollout could not run (not a gate failure: those are in the report)."""


def error_for_status(status: int, message: str, url: str | None = None, kind: str | None = None) -> DeviceError:
    if status in (401, 403):
        return DeviceAuthError(message, status, url)
    if status == 404:
        return DeviceNotFoundError(message, status, url)
    if status == 503:
        return DeviceUnavailableError(message, status, url)
    if 400 <= status < 500:
        if kind == "package":
            return PackageRejectedError(message, status, url)
        return DeviceRequestError(message, status, url)
    return DeviceServerError(message, status, url)

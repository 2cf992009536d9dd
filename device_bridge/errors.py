"""One error hierarchy for the agent, the hub, their clients and the notebook side.

Servers raise :class:`ApiError` (status, message, ``kind``); every JSON error answer is
``{"error": message, "kind": kind}``. Clients turn an answer back into the
:class:`DeviceError` subclass of its kind (``error_for_status``), so callers (rollout,
``mlsql.deploy.remote.wrap``) branch on the type or on ``.kind``, never on the message text.

Kinds: ``auth`` (no or wrong credential), ``forbidden`` (a valid credential that may not make
this call: an agent's hub credential outside its own ``/v1/agents/{name}/...``), ``not_found``, ``method``, ``request`` (malformed call), ``invalid_input``
(data that does not fit the model), ``model_input`` (the model failed on this request's
data), ``package``, ``untrusted`` (no trusted key / key not trusted), ``version`` (an
older version refused by the anti-rollback policy), ``conflict``, ``too_large``,
``content_type``, ``timeout``, ``busy``, ``suspended``, ``load``, ``providers``,
``download``, ``store``, ``internal``; sharing the device (docs/DEVICE.md): ``overloaded`` (429, the
model's queue is full; ``retry_after_s``), ``deadline`` (504, not started or finished within the
deployment's ``timeout_ms``), ``worker`` (503, its worker process crashed or restarts), ``memory``
(503, the worker passed its ``memory_mb``; 422 when the model does not even load within it),
``memory_budget`` (409, the install would pass the device's ``--memory-budget-mb``).
"""

from __future__ import annotations


class ApiError(Exception):
    """Raised inside the agent and the hub: answered as ``{"error", "kind"}`` with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "request"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


class DeviceError(Exception):
    """Base class: something went wrong talking to a device or the hub."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.url = url
        self.kind = kind

    def __str__(self) -> str:
        return self.message


class DeviceUnreachableError(DeviceError):
    """No answer: connection refused, timeout, TLS failure."""


class DeviceAuthError(DeviceError):
    """401/403: missing or wrong token."""


class DeviceForbiddenError(DeviceAuthError):
    """403 ``forbidden``: the credential is valid but not for this call (an agent acting for another)."""


class DeviceNotFoundError(DeviceError):
    """404: unknown model, version or route."""


class DeviceRequestError(DeviceError):
    """400/409/413/415/422: the device refused the request (bad input, bad package...)."""


class InvalidInputError(DeviceRequestError):
    """Predict input that does not fit the model (kind ``invalid_input`` or ``model_input``)."""


class RequestTooLargeError(DeviceRequestError):
    """413: body, rows or elements over a limit."""


class PackageRejectedError(DeviceRequestError):
    """The device refused a package: unsigned, tampered, untrusted key, too large..."""


class UntrustedKeyError(PackageRejectedError):
    """The device trusts no key, or not the key that signed the package."""


class VersionRefusedError(DeviceRequestError):
    """Anti-rollback: a package older than the model's newest version; use activate/rollback."""


class DeviceUnavailableError(DeviceError):
    """503: model suspended by the circuit breaker, or not loaded."""


class DeviceOverloadedError(DeviceUnavailableError):
    """429 ``overloaded``: the model's queue is full; ``retry_after`` seconds is the agent's estimate."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None, kind: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message, status, url, kind)
        self.retry_after = retry_after


class DeviceDeadlineError(DeviceUnavailableError):
    """504 ``deadline``: the prediction did not start or finish within the deployment's timeout_ms."""


class DeviceServerError(DeviceError):
    """Any other 5xx."""


class RolloutError(DeviceError):
    """A staged rollout could not run (not a gate failure: those are in the report)."""


_BY_KIND: dict[str, type[DeviceError]] = {
    "auth": DeviceAuthError, "forbidden": DeviceForbiddenError, "not_found": DeviceNotFoundError,
    "invalid_input": InvalidInputError, "model_input": InvalidInputError,
    "too_large": RequestTooLargeError, "package": PackageRejectedError, "untrusted": UntrustedKeyError,
    "version": VersionRefusedError, "suspended": DeviceUnavailableError, "busy": DeviceUnavailableError,
    "overloaded": DeviceOverloadedError, "deadline": DeviceDeadlineError, "worker": DeviceUnavailableError,
    "memory_budget": DeviceRequestError,
}


def error_for_status(status: int, message: str, url: str | None = None, kind: str | None = None) -> DeviceError:
    """The client-side error for an HTTP error answer: by ``kind`` first, then by status."""
    cls = _BY_KIND.get(kind or "")
    if kind == "memory":  # 503 from a running worker, 422 from a load
        cls = DeviceUnavailableError if status >= 500 else DeviceRequestError
    if cls is None or (status >= 500 and not issubclass(cls, DeviceUnavailableError)):
        if status in (401, 403):
            cls = DeviceAuthError
        elif status == 404:
            cls = DeviceNotFoundError
        elif status == 413:
            cls = RequestTooLargeError
        elif status == 503:
            cls = DeviceUnavailableError
        elif 400 <= status < 500:
            cls = DeviceRequestError
        else:
            cls = DeviceServerError
    return cls(message, status, url, kind)

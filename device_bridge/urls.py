"""Outgoing HTTP from the agent (hub polls, install from a URL): stdlib only, no credential leaks.

A bearer token goes only to the exact origin (scheme, host, port) it belongs to, and
redirects are never followed: urllib would forward ``Authorization`` to wherever a
redirect points (another host, even ``ftp://``), so a 3xx is an error instead.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request


class RedirectRefused(urllib.error.URLError):
    pass


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise RedirectRefused(f"redirect ({code}) to {newurl!r} not followed")


_OPENER = urllib.request.build_opener(_NoRedirect())


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, None for anything else."""
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname:
        return None
    return u.scheme, u.hostname.lower(), port or (443 if u.scheme == "https" else 80)


def same_origin(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    oa, ob = origin(a), origin(b)
    return oa is not None and oa == ob


def open_url(req: urllib.request.Request, timeout: float):
    """urlopen without redirects."""
    return _OPENER.open(req, timeout=timeout)

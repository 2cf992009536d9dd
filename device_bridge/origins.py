"""Packages from any origin: the agent's download of a package named by its sha256 from a list of URLs.

The hub's desired state names each package by sha256 and a list of URLs (the hub's own blob store,
``/v1/blobs/SHA``, and any static origin: ``BASE/SHA`` on a plain HTTP server, a CDN or an
S3-compatible bucket, as ``mlsql-device hub publish DIR`` lays them out). ``fetch`` tries them in
order and trusts none of them: the bytes count only once their sha256 is the one asked for (and the
agent then checks the package's signature at install).

An interrupted download is kept as ``STORE/downloads/SHA.part`` and resumed with an HTTP Range
request (``Range: bytes=N-``), from the same origin or the next (the bytes are content-addressed,
so any origin's tail fits any origin's head; the hash at the end decides). An origin that ignores
Range (200) starts the file over; a Content-Range that does not start at N is not trusted and the
file starts over. At most ``MAX_PARTIALS`` part files are kept (the oldest go), each at most the
agent's package limit, so a device never fills its disk with half downloads.
"""

from __future__ import annotations

import hashlib
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from device_bridge import urls

MAX_PARTIALS = 2  # part files kept under STORE/downloads (the oldest go first)
RESUMES_PER_ORIGIN = 3  # resumed requests to one origin after a cut, before the next origin
CHUNK = 1 << 16
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class FetchError(OSError):
    """No origin gave the package: the message names each URL and what went wrong there."""


@dataclass
class Attempt:
    url: str
    start: int  # the byte asked from (Range: bytes=start-; 0: the whole file)
    status: int | None = None
    received: int = 0
    error: str | None = None


@dataclass
class Fetched:
    data: bytes
    url: str  # the origin whose answer completed it
    attempts: list[Attempt] = field(default_factory=list)


def part_path(folder: Path, sha: str) -> Path:
    return folder / f"{sha}.part"


def _trim_partials(folder: Path, keep: str) -> None:
    """At most MAX_PARTIALS part files, ``keep``'s among them: the oldest others go."""
    parts = sorted(
        (p for p in folder.glob("*.part") if p.name != f"{keep}.part"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for p in parts[MAX_PARTIALS - 1 :]:
        p.unlink(missing_ok=True)


def _get(url: str, part: Path, limit: int, headers: dict, timeout: float, attempt: Attempt) -> None:
    """One request appending to ``part`` from its current size. Raises on any error or a cut
    answer; what arrived before the cut stays in ``part``."""
    have = part.stat().st_size if part.exists() else 0
    attempt.start = have
    req = urllib.request.Request(url, headers=dict(headers))
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urls.open_url(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        attempt.status = exc.code
        if exc.code == 416 and have:  # the part is no prefix of this file (or all of it): start over
            part.unlink(missing_ok=True)
        raise
    with resp:
        attempt.status = resp.status
        mode = "ab"
        if have and resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                part.unlink(missing_ok=True)
                raise OSError(
                    f"Content-Range {resp.headers.get('Content-Range')!r} does not start at byte {have}"
                )
        elif resp.status == 200:
            mode, have = "wb", 0  # the whole file (an origin without Range): from the start
        else:
            raise OSError(f"unexpected answer {resp.status}")
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if have + (expected or 0) > limit:
            raise OSError(f"package is {have + expected} bytes, over the limit of {limit}")
        got = 0
        with open(part, mode) as f:
            while True:
                chunk = resp.read1(CHUNK)  # what has arrived: a stalled answer leaves it on disk
                if not chunk:
                    break
                got += len(chunk)
                if have + got > limit:
                    f.flush()
                    part.unlink(missing_ok=True)
                    raise OSError(f"package is over the limit of {limit} bytes")
                f.write(chunk)
                f.flush()  # in the OS's hands: a killed agent resumes from here
                attempt.received = got
        if expected is not None and got < expected:
            raise OSError(f"answer cut after {got} of {expected} bytes")


def fetch(
    candidates: list[str],
    sha: str,
    folder: Path,
    limit: int,
    headers_for: Callable[[str], dict] | None = None,
    timeout: float = 60.0,
    attempts: list[Attempt] | None = None,
) -> Fetched:
    """The package ``sha`` from the first of ``candidates`` that gives bytes with that sha256.
    ``headers_for(url)``: extra headers per URL (the hub credential, for the hub's own URL only)."""
    folder.mkdir(parents=True, exist_ok=True)
    _trim_partials(folder, sha)
    part = part_path(folder, sha)
    if part.exists() and hashlib.sha256(part.read_bytes()).hexdigest() == sha:  # complete before a crash
        data = part.read_bytes()
        part.unlink()
        return Fetched(data, str(part), [])
    tried: list[Attempt] = [] if attempts is None else attempts
    for url in candidates:
        if urls.origin(url) is None:
            tried.append(Attempt(url, 0, error="not an http(s) URL"))
            continue
        headers = (headers_for or (lambda u: {}))(url)
        resumes = 0
        restarted = False
        while True:
            a = Attempt(url, 0)
            tried.append(a)
            try:
                _get(url, part, limit, headers, timeout, a)
            except (
                OSError,
                ValueError,
            ) as exc:  # urllib's errors, a cut answer, http.client's IncompleteRead
                a.error = f"{type(exc).__name__}: {exc}"[:300]
                if a.status == 416 and a.start and not restarted:  # a part this origin does not continue
                    restarted = True
                    continue
                if a.received and resumes < RESUMES_PER_ORIGIN:  # it made progress: ask for the rest
                    resumes += 1
                    continue
                break  # this origin is down or refuses: the next one (the part stays for it)
            data = part.read_bytes() if part.exists() else b""
            if hashlib.sha256(data).hexdigest() == sha:
                part.unlink(missing_ok=True)
                return Fetched(data, url, tried)
            part.unlink(missing_ok=True)  # not the package: never kept, never resumed
            a.error = f"sha256 mismatch: {len(data)} bytes from {url} are not package {sha[:12]}"
            if a.start and not restarted:  # the head came from another answer: this origin, whole, once
                restarted = True
                continue
            break
    detail = "; ".join(f"{a.url}: {a.error or a.status}" for a in tried[-8:]) or "no URL"
    raise FetchError(f"no origin gave package {sha[:12]} ({detail})")


def resolve(hub: str, entry_urls, sha: str) -> list[str]:
    """The desired entry's URLs as absolute ones: a path (``/v1/blobs/SHA``) is the hub's own; without
    a list (a hub before origins), the hub's blob URL alone."""
    if not isinstance(entry_urls, list) or not entry_urls:
        return [f"{hub}/v1/blobs/{sha}"]
    out = []
    for u in entry_urls[:16]:
        if isinstance(u, str) and len(u) <= 2048:
            out.append(hub + u if u.startswith("/") else u)
    return out

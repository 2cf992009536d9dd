"""Agent credentials at the hub: one per enrolled agent, kept only as a sha256 in
``STORE/credentials.json``, revocable, and read again by a running hub when ``hub enroll`` or
``hub revoke`` changes the file."""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from pathlib import Path

from device_bridge.hub.errors import NAME_RE, HubError


def _digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


class Credentials:
    """The agents' hub credentials: ``STORE/credentials.json`` maps a name to the sha256 of its
    token (random, 256 bits, so an unsalted hash is enough) or to a revocation. The file is read
    again whenever it changes, so ``mlsql-device hub enroll/revoke`` works on a running hub;
    writers (hub and CLI) hold ``credentials.lock``."""

    def __init__(self, store: str | Path):
        self.path = Path(store) / "credentials.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sig: tuple | None = None
        self._entries: dict[str, dict] = {}
        self._by_hash: dict[str, str] = {}
        self._mu = threading.Lock()

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # never start open because the file is damaged
            raise HubError(500, f"cannot read {self.path}: {exc}", "store") from None
        return data if isinstance(data, dict) else {}

    def _fresh(self) -> dict[str, dict]:
        try:
            st = os.stat(self.path)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            sig = None
        with self._mu:
            if sig != self._sig or (sig is None and self._entries):
                entries = self._read()
                self._entries = entries
                self._by_hash = {e["sha256"]: n for n, e in entries.items()
                                 if isinstance(e, dict) and isinstance(e.get("sha256"), str)}
                self._sig = sig
            return self._entries

    def who(self, token: bytes) -> str | None:
        """The agent this token belongs to (None: no enrolled agent holds it)."""
        self._fresh()
        name = self._by_hash.get(_digest(token))
        entry = self._entries.get(name) if name else None
        if entry and hmac.compare_digest(entry.get("sha256", ""), _digest(token)):
            return name
        return None

    def state(self, name: str) -> str | None:
        """``enrolled``, ``revoked`` or None (never enrolled)."""
        e = self._fresh().get(name)
        if not isinstance(e, dict):
            return None
        return "enrolled" if e.get("sha256") else "revoked"

    def _update(self, fn):
        lock = self.path.with_suffix(".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            entries = self._read()
            out = fn(entries)
            data = json.dumps(entries, sort_keys=True, indent=1).encode()
            tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
            wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(wfd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            os.close(fd)  # closing releases the lock
        self._fresh()
        return out

    def enroll(self, name: str, *, only_new: bool = False) -> str:
        """A fresh token for ``name`` (replacing any earlier one). ``only_new``: refuse a name that
        holds or held a credential (open enrollment must not take over, or undo a revocation)."""
        if not NAME_RE.match(name or ""):
            raise HubError(400, f"bad agent name {name!r}")
        token = "mlsqlhub_" + secrets.token_urlsafe(32)

        def put(entries):
            if only_new and name in entries:
                raise HubError(409, f"agent {name!r} is already enrolled (or was revoked); open enrollment "
                                    "takes only new names: the operator enrolls it again", "conflict")
            entries[name] = {"sha256": _digest(token.encode()), "enrolled_at": time.time()}
        self._update(put)
        return token

    def revoke(self, name: str) -> bool:
        """Refuse ``name``'s credential from now on; False when it had none."""
        def drop(entries):
            had = isinstance(entries.get(name), dict) and bool(entries[name].get("sha256"))
            entries[name] = {"revoked_at": time.time()}
            return had
        return self._update(drop)



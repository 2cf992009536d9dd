"""Agent credentials at the hub: one per enrolled agent, kept only as a sha256 in the hub's database
(table ``credentials``), revocable; ``hub enroll`` / ``hub revoke`` write the same database, and a
running hub, which keeps the credentials it has checked in memory (hub/cache.py), drops them within
``--recheck-s`` of either."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

from device_bridge.hub.cache import bump_key
from device_bridge.hub.db import Database
from device_bridge.hub.errors import NAME_RE, HubError


def _digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


class Credentials:
    """The agents' hub credentials: a name and the sha256 of its token (random, 256 bits, so an
    unsalted hash is enough), or a revocation."""

    def __init__(self, store: str | Path, db: Database | None = None):
        self.db = db or Database(store)

    def who(self, token: bytes) -> str | None:
        """The agent this token belongs to (None: no enrolled agent holds it)."""
        digest = _digest(token)
        with self.db.read() as t:
            row = t.one("SELECT name, sha256 FROM credentials WHERE sha256 = ?", (digest,))
        if row and hmac.compare_digest(row[1] or "", digest):
            return row[0]
        return None

    def state(self, name: str) -> str | None:
        """``enrolled``, ``revoked`` or None (never enrolled)."""
        with self.db.read() as t:
            row = t.one("SELECT sha256 FROM credentials WHERE name = ?", (name,))
        if row is None:
            return None
        return "enrolled" if row[0] else "revoked"

    def enroll(self, name: str, *, only_new: bool = False) -> str:
        """A fresh token for ``name`` (replacing any earlier one). ``only_new``: refuse a name that
        holds or held a credential (open enrollment must not take over, or undo a revocation)."""
        if not NAME_RE.match(name or ""):
            raise HubError(400, f"bad agent name {name!r}")
        token = "mlsqlhub_" + secrets.token_urlsafe(32)
        with self.db.tx(lock=True) as t:
            if only_new and t.one("SELECT 1 FROM credentials WHERE name = ?", (name,)) is not None:
                raise HubError(409, f"agent {name!r} is already enrolled (or was revoked); open enrollment "
                                    "takes only new names: the operator enrolls it again", "conflict")
            t.run("INSERT INTO credentials (name, sha256, enrolled_at, revoked_at) VALUES (?, ?, ?, NULL) "
                  "ON CONFLICT (name) DO UPDATE SET sha256 = excluded.sha256, enrolled_at = excluded.enrolled_at, "
                  "revoked_at = NULL", (name, _digest(token.encode()), time.time()))
            bump_key(t, "creds_gen")  # an earlier token of this name: dropped from every hub's memory
        return token

    def revoke(self, name: str) -> bool:
        """Refuse ``name``'s credential from now on; False when it had none."""
        with self.db.tx(lock=True) as t:
            row = t.one("SELECT sha256 FROM credentials WHERE name = ?", (name,))
            t.run("INSERT INTO credentials (name, sha256, enrolled_at, revoked_at) VALUES (?, NULL, NULL, ?) "
                  "ON CONFLICT (name) DO UPDATE SET sha256 = NULL, revoked_at = excluded.revoked_at",
                  (name, time.time()))
            bump_key(t, "creds_gen")  # every hub process drops the credentials it keeps (hub/cache.py)
        return bool(row and row[0])

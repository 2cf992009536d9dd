"""The poll cycle from memory: each agent's desired-state answer (its encoded body and ETag) and each
agent credential's name, kept in this hub process and dropped when the database says they may have
changed.

Three rows of the ``meta`` table say so, each rewritten (a fresh random value) in the transaction of
the change it stands for: ``desired_gen`` (a desired state, a group, a rollout's wave, a published
delta: hub/longpoll.py's ``bump``), ``agents_gen`` (an agent registered with another group than the
one it had) and ``creds_gen`` (a credential enrolled or revoked, also by ``hub enroll``/``hub revoke``
on the store). ``watch`` reads the three in one statement every ``recheck_s`` seconds; a new value
drops what it stands for (and a new ``desired_gen`` wakes every held long-poll). A change made
through this process drops its entries at once. So a change made through another replica, or by the
CLI, reaches this process's answers at most ``recheck_s`` (plus one read) after it commits; a
revoked credential is refused by every replica within the same bound.

Entries are stored only under the epoch they were read in: a read that started before a drop is not
kept (it may hold the state from before the change), and nothing is kept before the first read of
the three rows, nor while that read fails (the database away: every request goes to the database,
as without this cache, and is answered 503 there). At most ``max_entries`` agents are kept (the
oldest go first)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading

log = logging.getLogger("device_bridge.hub")
GENS = ("desired_gen", "agents_gen", "creds_gen")
MAX_ENTRIES = 200_000  # agents per hub process (about 1 KB each with their credential)


def bump_key(t, key: str) -> None:
    """In a change's transaction: a new value of one of GENS."""
    import uuid

    t.run(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, uuid.uuid4().hex),
    )


def read_gens(db) -> dict:
    with db.read() as t:
        rows = t.all("SELECT key, value FROM meta WHERE key IN (?, ?, ?)", GENS)
    return dict(rows)


def digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


class PollCache:
    """``docs``: agent name -> (ETag, encoded body); ``creds``: token sha256 -> agent name. Read and
    written on the hub's event loop, except the credential look-ups a PostgreSQL hub makes in worker
    threads (``creds_mu``)."""

    def __init__(self, read_gens, on_desired_change, recheck_s: float, max_entries: int = MAX_ENTRIES):
        self.read_gens = read_gens  # async () -> {key: value}
        self.on_desired_change = on_desired_change  # wake every held long-poll
        self.recheck_s = recheck_s
        self.max_entries = max_entries
        self.docs: dict[str, tuple[bytes, bytes]] = {}
        self.creds: dict[str, str] = {}
        self.creds_mu = threading.Lock()
        self.epoch = 0  # of docs: a drop starts a new one
        self.creds_epoch = 0
        self.seen: dict | None = None  # the values last read
        self.ready = False  # the last read succeeded: answers may be kept
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.reads = 0  # reads of the three rows (the tests count them)

    # -- the watch ---------------------------------------------------------------------------

    def ensure_watching(self) -> None:
        """Start ``watch`` on the running loop (at the first request: uvicorn's loop)."""
        loop = asyncio.get_running_loop()
        if self.task is not None and self.loop is loop and not self.task.done():
            return
        self.loop = loop
        self.ready = False
        self.drop_docs()
        self.drop_creds()
        self.task = loop.create_task(self.watch())

    async def watch(self) -> None:
        while True:
            await self.look()
            await asyncio.sleep(self.recheck_s)

    async def look(self) -> None:
        """One read of the three rows; what changed since the last read is dropped."""
        try:
            gens = await self.read_gens()
            self.reads += 1
        except Exception as exc:  # noqa: BLE001 - the database away: nothing answered from memory
            if self.ready:
                log.warning(
                    "hub: cannot read the change markers (%s): answering from the database",
                    getattr(exc, "message", exc),
                )
            self.ready = False
            self.drop_docs()
            self.drop_creds()
            return
        prev, self.seen = self.seen, gens
        self.ready = True
        if prev is None:  # the first read: nothing was kept before it
            return
        desired = gens.get("desired_gen") != prev.get("desired_gen")
        if desired or gens.get("agents_gen") != prev.get("agents_gen"):
            self.drop_docs()
        if gens.get("creds_gen") != prev.get("creds_gen"):
            self.drop_creds()
        if desired:
            self.on_desired_change()

    # -- docs --------------------------------------------------------------------------------

    def drop_docs(self, name: str | None = None) -> None:
        """Everything (a change here: before the change's answer), or one agent's answer."""
        if name is not None:
            self.docs.pop(name, None)
            return
        self.epoch += 1
        self.docs.clear()

    def ticket(self) -> int | None:
        """Taken before a read from the database: what that read may keep (None: nothing)."""
        return self.epoch if self.ready else None

    def keep_doc(self, name: str, ticket: int | None, entry: tuple[bytes, bytes]) -> None:
        if ticket is None or ticket != self.epoch or self.max_entries <= 0:
            return
        if len(self.docs) >= self.max_entries:
            del self.docs[next(iter(self.docs))]
        self.docs[name] = entry

    # -- credentials -------------------------------------------------------------------------

    def drop_creds(self) -> None:
        with self.creds_mu:
            self.creds_epoch += 1
            self.creds.clear()

    def who(self, token: bytes, look_up) -> str | None:
        """The agent a token belongs to: from memory, else ``look_up(token)`` (the database), kept."""
        d = digest(token)
        name = self.creds.get(d)
        if name is not None:
            return name
        epoch, ready = self.creds_epoch, self.ready
        name = look_up(token)
        if name is not None and ready and self.max_entries > 0:
            with self.creds_mu:
                if epoch == self.creds_epoch:
                    if len(self.creds) >= self.max_entries:
                        del self.creds[next(iter(self.creds))]
                    self.creds[d] = name
        return name

    def known(self, auth: bytes | None) -> str | None:
        """The agent of an ``Authorization: Bearer`` header, if its credential is in memory."""
        if not auth or auth[:7].lower() != b"bearer ":
            return None
        return self.creds.get(digest(auth[7:].strip()))

"""Long-poll of an agent's desired state: ``GET /v1/agents/{name}/desired?wait=S`` with the ETag of
the state the agent has (``If-None-Match``). The hub answers at once when the desired state differs;
otherwise it holds the request until the state changes or ``S`` seconds pass (304). A request is
woken by a change made in this process (the agents it names, at once) or in another replica on the
same database: every ``recheck_s`` one read of the ``desired_gen`` row, which each desired-state
change rewrites in its own transaction, and on a new value every held request looks again. At most
``max_held`` requests are held per process: past it a request is answered at once, as a timed poll
would be."""

from __future__ import annotations

import asyncio
import uuid

MAX_WAIT_S = 60.0  # the longest a request is held by default (--max-wait-s); the agent asks for less
MAX_HELD = 20_000  # held requests per hub process (each is an open connection and a coroutine)
RECHECK_S = 1.0  # how often a replica looks for another replica's changes
GEN_KEY = "desired_gen"


def bump(t) -> None:
    """In a desired-state change's transaction: a new ``desired_gen`` for the other replicas to see."""
    t.run("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
          (GEN_KEY, uuid.uuid4().hex))


def read_gen(db) -> str | None:
    with db.read() as t:
        row = t.one("SELECT value FROM meta WHERE key = ?", (GEN_KEY,))
    return row[0] if row else None


class Waiters:
    """The requests held in this process, by agent name. Runs on the hub's event loop, except
    ``wake_threadsafe``."""

    def __init__(self, read_gen, max_held: int = MAX_HELD, recheck_s: float = RECHECK_S):
        self.read_gen = read_gen  # async () -> the database's desired_gen
        self.max_held, self.recheck_s = max_held, recheck_s
        self.events: dict[str, set[asyncio.Event]] = {}
        self.held = 0
        self.version = 0  # counts wake-ups: a request that registers after one looks again
        self.refused = 0  # answered at once because max_held were held
        self.loop: asyncio.AbstractEventLoop | None = None
        self._watch: asyncio.Task | None = None
        self._gen: str | None = None

    def wake(self, names=None) -> None:
        self.version += 1
        groups = self.events.values() if names is None else [self.events.get(n, ()) for n in names]
        for evs in list(groups):
            for ev in list(evs):
                ev.set()

    def wake_threadsafe(self, names=None) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.wake, None if names is None else list(names))

    async def hold(self, name: str, wait_s: float, changed) -> bool:
        """Hold until ``await changed()`` is true (returns True) or ``wait_s`` passes (False).
        Over ``max_held``: one look, at once."""
        if self.held >= self.max_held:
            self.refused += 1
            return await changed()
        self.loop = asyncio.get_running_loop()
        if self._watch is None:
            self._gen = await self.read_gen()
            self._watch = self.loop.create_task(self._watcher())
        deadline = self.loop.time() + wait_s
        ev = asyncio.Event()
        self.held += 1
        self.events.setdefault(name, set()).add(ev)
        try:
            while True:
                seen = self.version
                if await changed():
                    return True
                if self.version != seen:  # a wake-up while we looked: look again
                    continue
                remaining = deadline - self.loop.time()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(ev.wait(), remaining)
                except TimeoutError:
                    return False
                ev.clear()
        finally:
            self.held -= 1
            evs = self.events.get(name)
            if evs is not None:
                evs.discard(ev)
                if not evs:
                    del self.events[name]

    async def _watcher(self) -> None:
        """Another replica's changes: one read per ``recheck_s`` while requests are held."""
        while True:
            await asyncio.sleep(self.recheck_s)
            if not self.held:
                continue
            try:
                gen = await self.read_gen()
            except Exception:  # noqa: BLE001 - the database away: held requests end at their wait
                continue
            if gen != self._gen:
                self._gen = gen
                self.wake(None)

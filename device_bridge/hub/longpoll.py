"""Long-poll of an agent's desired state: ``GET /v1/agents/{name}/desired?wait=S`` with the ETag of
the state the agent has (``If-None-Match``). The hub answers at once when the desired state differs;
otherwise it holds the request until the state changes or ``S`` seconds pass (304). A request is
woken by a change made in this process (the agents it names, at once) or in another replica on the
same database: every ``recheck_s`` one read of the ``desired_gen`` row, which each desired-state
change rewrites in its own transaction, and on a new value every held request looks again (that read
is hub/cache.py's, which also drops the answers kept in memory). At most
``max_held`` requests are held per process: past it a request is answered at once, as a timed poll
would be."""

from __future__ import annotations

import asyncio

from device_bridge.hub.cache import bump_key

MAX_WAIT_S = 60.0  # the longest a request is held by default (--max-wait-s); the agent asks for less
MAX_HELD = 20_000  # held requests per hub process (each is an open connection and a coroutine)
RECHECK_S = 1.0  # how often a replica looks for another replica's changes
GEN_KEY = "desired_gen"


def bump(t) -> None:
    """In a desired-state change's transaction: a new ``desired_gen`` for the other replicas to see."""
    bump_key(t, GEN_KEY)


class Waiters:
    """The requests held in this process, by agent name. Runs on the hub's event loop (another
    thread's change comes through hub/app.py's ``changed_threadsafe``)."""

    def __init__(self, max_held: int = MAX_HELD):
        self.max_held = max_held
        self.events: dict[str, set[asyncio.Event]] = {}
        self.held = 0
        self.version = 0  # counts wake-ups: a request that registers after one looks again
        self.refused = 0  # answered at once because max_held were held

    def wake(self, names=None) -> None:
        self.version += 1
        groups = self.events.values() if names is None else [self.events.get(n, ()) for n in names]
        for evs in list(groups):
            for ev in list(evs):
                ev.set()

    async def hold(self, name: str, wait_s: float, changed) -> bool:
        """Hold until ``await changed()`` is true (returns True) or ``wait_s`` passes (False).
        Over ``max_held``: one look, at once."""
        if self.held >= self.max_held:
            self.refused += 1
            return await changed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
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
                remaining = deadline - loop.time()
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

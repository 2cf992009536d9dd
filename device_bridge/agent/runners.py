"""Threads that run in-process predictions (isolation = 'thread'), one pool per priority class.

A pool hands work to its threads with a plain queue and answers on the event loop with one
``call_soon_threadsafe``: less than a third of what anyio's ``to_thread`` costs per call. The
scheduler (scheduler.py) decides how many runs go at once; a pool only needs as many threads.

The agent's own threads all keep the agent's CPU priority. A lower one (``nice``) for the batch
pool was tried and made realtime latency worse: a low-priority thread that the kernel preempts
while it holds the interpreter lock (parsing a batch) makes the event loop wait for it, up to
several milliseconds (priority inversion). Batch work gets a lower CPU priority where it holds no
lock the agent needs: in its worker process (isolation = 'process', the batch default).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("device_bridge.agent")


class Inbox:
    """Callbacks from other threads to run on the event loop, with one wake-up for a burst of them:
    ``call_soon_threadsafe`` writes to the loop's self-pipe every time (a system call, and a wake-up
    of the loop and of the writer's interpreter lock), where here only the first of a burst does."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque = deque()
        self.armed = False

    def post(self, fn: Callable, *args: Any) -> None:
        self.items.append((fn, args))
        if not self.armed:
            self.armed = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # disarm first: a post that sees armed=True has appended before this line, so the loop below
        # takes it; one that sees False wakes the loop again
        self.armed = False
        items = self.items
        while items:
            fn, args = items.popleft()
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - one callback must not strand the others
                log.exception("callback on the event loop failed")


_inboxes: dict[int, Inbox] = {}


def inbox(loop: asyncio.AbstractEventLoop | None = None) -> Inbox:
    """The inbox of ``loop`` (default: the running one)."""
    loop = loop or asyncio.get_running_loop()
    box = _inboxes.get(id(loop))
    if box is None or box.loop is not loop:
        box = _inboxes[id(loop)] = Inbox(loop)
    return box


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class ClassPool:
    def __init__(self, name: str, threads: int):
        self.name = name
        self.size = max(1, threads)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def _start(self) -> None:
        with self.lock:
            while len(self.threads) < self.size:
                t = threading.Thread(target=self._loop, name=f"{self.name}-{len(self.threads)}", daemon=True)
                t.start()
                self.threads.append(t)

    def _loop(self) -> None:
        while True:
            fn, box, done = self.q.get()
            try:
                value = fn()
                ok = True
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                value, ok = exc, False
            try:
                box.post(done, ok, value)
            except RuntimeError:  # the loop is closed: the agent is stopping
                return

    def submit(self, fn: Callable[[], Any], done: Callable[[bool, Any], None]) -> None:
        """Run ``fn`` in a thread; ``done(ok, value_or_exception)`` is then called on the loop."""
        if len(self.threads) < self.size:
            self._start()
        self.q.put((fn, inbox(), done))

    async def run(self, fn: Callable[[], Any]) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.submit(fn, lambda ok, v: _settle(fut, ok, v))
        return await fut


class Pools:
    """One pool per class, and ``io`` for the agent's side of runs in worker processes (parsing,
    writing to the worker, encoding big answers)."""

    def __init__(self, threads: int):
        self.pools = {c: ClassPool(c, threads) for c in ("realtime", "normal", "batch", "io")}

    def __getitem__(self, cls: str) -> ClassPool:
        return self.pools.get(cls) or self.pools["normal"]

"""Threads that run in-process predictions (isolation = 'thread'), one pool per priority class.

A pool hands work to its threads with a plain queue and answers on the event loop with one
``call_soon_threadsafe``: less than a third of what anyio's ``to_thread`` costs per call. The
scheduler (scheduler.py) decides how many runs go at once; a pool only needs as many threads.

On Linux the threads of the batch pool lower their own CPU priority (``nice``, per thread), so
that an in-process batch model yields the cores to realtime and normal work as a batch worker
process does (workers.py).
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def lower_thread_priority(nice: int) -> bool:
    """Raise this thread's nice value (Linux: per thread). False where that is not possible."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        return True
    except (OSError, AttributeError):
        return False


class ClassPool:
    def __init__(self, name: str, threads: int, nice: int = 0):
        self.name = name
        self.size = max(1, threads)
        self.nice = nice
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
        lower_thread_priority(self.nice)
        while True:
            fn, loop, done = self.q.get()
            try:
                value = fn()
                ok = True
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                value, ok = exc, False
            try:
                loop.call_soon_threadsafe(done, ok, value)
            except RuntimeError:  # the loop is closed: the agent is stopping
                return

    def submit(self, fn: Callable[[], Any], done: Callable[[bool, Any], None]) -> None:
        """Run ``fn`` in a thread; ``done(ok, value_or_exception)`` is then called on the loop."""
        if len(self.threads) < self.size:
            self._start()
        self.q.put((fn, asyncio.get_running_loop(), done))

    async def run(self, fn: Callable[[], Any]) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.submit(fn, lambda ok, v: _settle(fut, ok, v))
        return await fut


class Pools:
    """One pool per class; ``batch_nice`` applies to the batch pool's threads."""

    def __init__(self, threads: int, batch_nice: int = 0):
        self.pools = {"realtime": ClassPool("realtime", threads), "normal": ClassPool("normal", threads),
                      "batch": ClassPool("batch", threads, batch_nice)}

    def __getitem__(self, cls: str) -> ClassPool:
        return self.pools.get(cls) or self.pools["normal"]

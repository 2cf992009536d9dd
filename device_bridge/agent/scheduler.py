"""Who runs next: per-class queues, admission control and deadlines for the agent's predictions.

Every deployment (model version) is a :class:`Lane` with its class (``realtime``, ``normal``,
``batch``), its limit of runs at once (``max_concurrency``) and of requests waiting
(``max_queue``). The device has ``slots`` run slots (its budget of cores):

- **realtime** runs start as soon as their own lane has room: they never wait for a slot another
  class holds (those runs are at a lower OS priority, see runners.py and workers.py, so the kernel
  gives a realtime run the core it needs);
- **normal** and **batch** runs share the slots left over (slots minus the realtime runs in
  progress). When a slot frees, the next run is chosen by weighted shares (stride scheduling:
  normal 4, batch 1), and a batch request that has waited ``aging_s`` (default 0.2 s) goes first
  whatever the shares say, so batch never starves;
- a request that finds its lane's queue full is answered 429 with ``Retry-After``; one that is
  still waiting when its deadline (``timeout_ms`` after arrival) passes is answered 504.

With ``priorities=False`` (``--priorities off``) every lane is one class served first come, first
served, realtime included: the agent as it was before, for comparison.

Everything here runs on the event loop's thread, so plain integers need no lock; other threads
only read the counters (metrics).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable

from device_bridge.errors import ApiError
from device_bridge.telemetry import LatencyHistogram

CLASSES = ("realtime", "normal", "batch")
WEIGHTS = {"normal": 4.0, "batch": 1.0}
AGING_S = 0.2


class Timers:
    """Many deadlines on one asyncio timer: adding one is a heap push, cancelling one a flag (an
    asyncio timer per request costs a tenth of a single-row prediction)."""

    def __init__(self) -> None:
        self.heap: list[list] = []
        self.seq = itertools.count()
        self.handle: asyncio.TimerHandle | None = None
        self.handle_when = math.inf
        self.dead = 0

    def add(self, when: float, callback: Callable[[], None]) -> list:
        entry = [when, next(self.seq), callback]
        heapq.heappush(self.heap, entry)
        if when < self.handle_when:
            self._arm(when)
        return entry

    def cancel(self, entry: list | None) -> None:
        if entry is not None and entry[2] is not None:
            entry[2] = None
            self.dead += 1
            if self.dead > 256 and self.dead > len(self.heap) // 2:  # compact
                self.heap = [e for e in self.heap if e[2] is not None]
                heapq.heapify(self.heap)
                self.dead = 0

    def _arm(self, when: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        loop = asyncio.get_running_loop()
        self.handle = loop.call_at(loop.time() + max(0.0, when - time.monotonic()), self._fire)
        self.handle_when = when

    def _fire(self) -> None:
        self.handle, self.handle_when = None, math.inf
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now:
            entry = heapq.heappop(self.heap)
            cb = entry[2]
            if cb is None:
                self.dead = max(0, self.dead - 1)
                continue
            entry[2] = None
            try:
                cb()
            except Exception:  # noqa: BLE001 - one callback's failure must not stop the others
                pass
        while self.heap and self.heap[0][2] is None:
            heapq.heappop(self.heap)
            self.dead = max(0, self.dead - 1)
        if self.heap:
            self._arm(self.heap[0][0])


class LaneStats:
    """What /v1/metrics shows of a lane (per model version)."""

    def __init__(self) -> None:
        self.wait = LatencyHistogram()   # ms from arrival to the start of the run
        self.rejected = 0                # 429: queue full
        self.deadline_queue = 0          # 504 while waiting for a run
        self.deadline_run = 0            # 504 while running

    def started_at_once(self) -> None:
        w = self.wait  # a zero wait, without a search for its bucket
        w.counts[0] += 1
        w.total += 1

    def snapshot(self) -> dict:
        w = self.wait.snapshot()
        w.pop("buckets", None)
        return {"wait_ms": w, "rejected": self.rejected,
                "deadline_misses": self.deadline_queue + self.deadline_run,
                "deadline_misses_queue": self.deadline_queue, "deadline_misses_run": self.deadline_run}


class Waiter:
    __slots__ = ("lane", "future", "since", "timer")

    def __init__(self, lane: Lane, future: asyncio.Future, since: float):
        self.lane = lane
        self.future = future
        self.since = since
        self.timer: list | None = None


class Lane:
    """One deployment's place in the scheduler."""

    def __init__(self, key: tuple[str, int], cls: str, max_concurrency: int, max_queue: int, timeout_ms: int):
        self.key = key
        self.cls = cls
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.timeout_ms = timeout_ms
        self.running = 0
        self.waiters: deque[Waiter] = deque()
        self.stats = LaneStats()
        self.run_ms = 0.0  # moving average of a run, for Retry-After

    @property
    def queued(self) -> int:
        return len(self.waiters)

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: whole seconds, at least 1 (HTTP's form)."""
        per = max(self.run_ms, 1.0) / 1000.0
        return max(1, math.ceil((self.queued + self.running) * per / max(1, self.max_concurrency)))

    def ran(self, ms: float) -> None:
        self.run_ms = ms if self.run_ms == 0.0 else 0.9 * self.run_ms + 0.1 * ms


class Scheduler:
    def __init__(self, slots: int, priorities: bool = True, aging_s: float = AGING_S,
                 weights: dict[str, float] | None = None):
        self.slots = max(1, slots)
        self.priorities = priorities
        self.aging_s = aging_s
        self.weights = dict(weights or WEIGHTS)
        self.lanes: dict[tuple[str, int], Lane] = {}
        self._all: tuple[Lane, ...] = ()    # the lanes, replaced (never changed in place) by other threads
        self.busy = 0                        # runs holding a slot (every class)
        self.waiting = 0                     # requests in all queues
        self.passes = {"normal": 0.0, "batch": 0.0}
        self.timers = Timers()

    # ------------------------------------------------------------------ lanes

    def lane(self, key: tuple[str, int], cls: str, max_concurrency: int, max_queue: int, timeout_ms: int) -> Lane:
        """The lane of a deployment, created or given its (new) settings. Called from any thread
        (a load); a lane's settings are plain attributes, read by the loop at the next request."""
        if not self.priorities:  # one class: first come, first served (_pick takes the oldest head)
            cls = "normal"
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane(key, cls, max_concurrency, max_queue, timeout_ms)
            self._all = tuple(self.lanes.values())
        else:
            lane.cls, lane.max_concurrency, lane.max_queue, lane.timeout_ms = cls, max_concurrency, max_queue, timeout_ms
        return lane

    def drop(self, key: tuple[str, int]) -> None:
        self.lanes.pop(key, None)
        self._all = tuple(self.lanes.values())

    # ------------------------------------------------------------------ admission

    def _may_run(self, lane: Lane) -> bool:
        if lane.running >= lane.max_concurrency:
            return False
        if self.priorities and lane.cls == "realtime":
            return True
        return self.busy < self.slots

    def try_start(self, lane: Lane) -> bool:
        """Start a run now if the lane and the device have room and no one of the lane waits."""
        if lane.waiters or not self._may_run(lane):
            return False
        lane.running += 1
        self.busy += 1
        lane.stats.started_at_once()
        return True

    async def start(self, lane: Lane, deadline: float, arrived: float) -> None:
        """Wait for a run. 429 when the lane's queue is full; 504 when ``deadline`` (monotonic)
        passes first."""
        if self.try_start(lane):
            return
        if lane.queued >= lane.max_queue:
            lane.stats.rejected += 1
            raise Overloaded(lane)
        loop = asyncio.get_running_loop()
        w = Waiter(lane, loop.create_future(), arrived)
        lane.waiters.append(w)
        self.waiting += 1
        w.timer = self.timers.add(deadline, lambda: self._expire(w))
        try:
            await w.future
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                self.done(lane)  # granted, then cancelled (the client went away): give the slot back
            else:
                self._forget(w)
            raise
        finally:
            self.timers.cancel(w.timer)

    def _expire(self, w: Waiter) -> None:
        if w.future.done():
            return
        self._forget(w)
        w.lane.stats.deadline_queue += 1
        w.future.set_exception(DeadlineMissed(w.lane, "queue", w.lane.timeout_ms))

    def _forget(self, w: Waiter) -> None:
        try:
            w.lane.waiters.remove(w)
            self.waiting -= 1
        except ValueError:
            pass

    def done(self, lane: Lane) -> None:
        """A run ended: free its slot and start whoever is next."""
        lane.running -= 1
        self.busy -= 1
        self._dispatch()

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self) -> None:
        while self.waiting:
            w = self._pick()
            if w is None:
                return
            w.lane.waiters.popleft()
            self.waiting -= 1
            w.lane.running += 1
            self.busy += 1
            w.lane.stats.wait.add((time.monotonic() - w.since) * 1000.0)
            w.future.set_result(None)

    def _pick(self) -> Waiter | None:
        heads = [lane.waiters[0] for lane in self._all if lane.waiters and self._may_run(lane)]
        if not heads:
            return None
        rt = [w for w in heads if w.lane.cls == "realtime"]
        if rt:
            return min(rt, key=lambda w: w.since)
        now = time.monotonic()
        aged = [w for w in heads if w.lane.cls == "batch" and now - w.since >= self.aging_s]
        if aged:
            w = min(aged, key=lambda w: w.since)
        else:
            by_cls = {}
            for w in heads:
                if w.lane.cls not in by_cls or w.since < by_cls[w.lane.cls].since:
                    by_cls[w.lane.cls] = w
            if len(by_cls) == 1:
                w = next(iter(by_cls.values()))
            else:  # stride scheduling: the class that has had least of its share goes
                w = by_cls[min(by_cls, key=lambda c: (self.passes[c], c))]
        cls = w.lane.cls
        others = [self.passes[c] for c in self.passes if c != cls]
        # a class that was idle does not bank its share: it starts from where the other one is
        self.passes[cls] = max(self.passes[cls], min(others, default=0.0) - 1.0) + 1.0 / self.weights[cls]
        return w

    def describe(self) -> dict:
        return {"priorities": self.priorities, "slots": self.slots, "busy": self.busy,
                "weights": self.weights if self.priorities else None,
                "aging_ms": round(self.aging_s * 1000) if self.priorities else None}


class Overloaded(ApiError):
    """429: the lane's queue is full."""

    def __init__(self, lane: Lane):
        super().__init__(429, f"model {lane.key[0]} version {lane.key[1]} is busy: {lane.queued} requests wait "
                              f"(max_queue {lane.max_queue}); retry after {lane.retry_after_s()} s", "overloaded")
        self.retry_after = lane.retry_after_s()


class DeadlineMissed(ApiError):
    """504: the request could not start (``where`` = queue) or finish (run) within its timeout_ms."""

    def __init__(self, lane: Lane | None, where: str, timeout_ms: int | None = None, key=None):
        key = lane.key if lane is not None else key
        what = "start" if where == "queue" else "finish"
        limit = f" of {timeout_ms} ms" if timeout_ms else ""
        super().__init__(504, f"model {key[0]} version {key[1]} could not {what} this request within its "
                              f"deadline{limit} (timeout_ms)", "deadline")
        self.where = where

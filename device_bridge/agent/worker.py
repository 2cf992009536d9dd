"""A model worker process: one model version's ONNX Runtime session, away from the agent.

Started by the agent (workers.py) as ``python -m device_bridge.agent.worker CONFIG_JSON`` with one
end of a Unix socket pair; it loads the session, answers ``ready`` (or ``failed``), then runs
``run`` messages, ``max_concurrency`` at a time (each thread reads one message, runs it, writes the
answer: no hand-off between threads). It never outlives the agent: the socket's end (EOF) or the
agent's death (``PR_SET_PDEATHSIG`` on Linux) ends it.

Limits it sets on itself before loading the model:

- memory, where the agent gave it a cgroup (memlimit.py): it moves itself into it first thing, and
  once numpy and onnxruntime are imported sets the cgroup's limit to what it holds then plus
  ``memory_mb``; past it the kernel stops it (SIGKILL), and the agent says why;
- memory otherwise (POSIX): ``RLIMIT_AS`` = the address space it has with numpy and onnxruntime
  imported, plus ``memory_mb``, plus 8 MB per thread (stacks). An allocation beyond fails; the
  worker answers that request with kind ``memory`` and exits (status 75), and the agent starts a
  fresh one;
- CPU priority: ``nice`` (batch-class workers, when the agent runs with priorities on), so that the
  kernel gives realtime work the cores first.

Test hooks, only with ``MLSQL_DEVICE_TEST_HOOKS=1`` in the agent's environment: a file
``.test_crash`` in the version's folder holding ``{"column": C, "value": V, "action": A}`` makes a
request whose column C holds V do A: ``segfault`` (a real SIGSEGV), ``abort`` (SIGABRT), ``hang``
(sleeps an hour), ``memory`` (allocates past any budget). ``.test_broken`` fails every run (as in
the agent).
"""

from __future__ import annotations

import heapq
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

MEMORY_EXIT = 75       # exit status: an allocation failed against the memory budget
LOAD_FAILED_EXIT = 3
THREAD_STACK = 8 << 20


def _vsz_rss_mb() -> tuple[float, float] | tuple[None, None]:
    try:
        with open("/proc/self/statm") as f:
            vsz, rss = f.read().split()[:2]
        page = os.sysconf("SC_PAGE_SIZE")
        return int(vsz) * page / 2**20, int(rss) * page / 2**20
    except (OSError, ValueError):
        return None, None


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort; the socket's EOF ends it too
            pass


def _memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("bad_alloc", "bad allocation", "failed to allocate", "cannot allocate"))


class Deadlines:
    """Terminate runs at their deadline (ONNX Runtime's RunOptions.terminate): one thread, a heap.
    The thread is woken only for a deadline earlier than the one it sleeps until (deadlines of one
    deployment come in order), never once per run."""

    def __init__(self) -> None:
        self.heap: list = []
        self.cond = threading.Condition()
        self.seq = 0
        self.sleeping_until = float("inf")
        threading.Thread(target=self._loop, name="deadlines", daemon=True).start()

    def add(self, when: float, ro) -> list:
        with self.cond:
            self.seq += 1
            entry = [when, self.seq, ro]
            heapq.heappush(self.heap, entry)
            if when < self.sleeping_until:
                self.cond.notify()
            return entry

    def cancel(self, entry: list) -> None:
        entry[2] = None  # left in the heap; dropped when due

    def _loop(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                while self.heap and (self.heap[0][2] is None or self.heap[0][0] <= now):
                    _, _, ro = heapq.heappop(self.heap)
                    if ro is not None:
                        ro.terminate = True
                self.sleeping_until = self.heap[0][0] if self.heap else float("inf")
                self.cond.wait(self.heap[0][0] - now if self.heap else None)
                self.sleeping_until = 0.0  # awake: add() need not wake it


class Worker:
    def __init__(self, cfg: dict, sock: socket.socket):
        import numpy as np
        import onnxruntime as ort

        from device_bridge import providers as prov
        from device_bridge.agent import ipc
        from device_bridge.agent.inputs import outputs_to_json

        self.np, self.ort, self.prov, self.ipc, self.outputs_to_json = np, ort, prov, ipc, outputs_to_json
        self.cfg = cfg
        self.sock = sock
        self.rlock = threading.Lock()
        self.wlock = threading.Lock()
        self.frames = ipc.Frames(ipc.TO_WORKER[1])  # what was read and not yet taken (under rlock)
        self.pending: list = []
        self.chunk = bytearray(256 << 10)
        self.folder = Path(cfg["folder"])
        self.hooks = os.environ.get("MLSQL_DEVICE_TEST_HOOKS") == "1"
        self.deadlines = Deadlines()
        self.canary = None
        self.since_canary = 64
        self.session = None

    def send(self, header: dict, arrays=None) -> None:
        parts = self.ipc.pack(header, arrays)
        with self.wlock:
            self.ipc.send(self.sock, parts)

    # ------------------------------------------------------------------ start

    def load(self) -> dict:
        prov = self.prov
        c = self.cfg
        plan = prov.ProviderPlan(c["preference"], c["available"], c["candidates"], {}, c["strict"])
        res = prov.create_session(c["model_path"], plan, threads=c["threads"], profile=c["profile"])
        self.session = res.session
        self.output_names = [o.name for o in res.session.get_outputs()]
        # a first run on a dummy row: the known-good input until a request gives one, and the proof
        # that the session runs at all (a model that crashes here fails for everyone)
        self.canary = prov.dummy_feed(res.session)
        try:
            res.session.run(None, self.canary)
        except Exception as exc:  # noqa: BLE001 - reported; the agent decides
            if _memory_error(exc):
                raise
        vsz, rss = _vsz_rss_mb()
        return {"op": "ready", "pid": os.getpid(), "providers": res.providers, "requested": res.requested,
                "attempts": res.attempts, "node_providers": res.node_providers,
                "inputs": {i.name: i.shape for i in res.session.get_inputs()}, "outputs": self.output_names,
                "vsz_mb": vsz, "rss_mb": rss}

    # ------------------------------------------------------------------ runs

    def serve(self) -> None:
        threads = [threading.Thread(target=self._serve_one, name=f"run-{i}", daemon=True)
                   for i in range(max(1, int(self.cfg["concurrency"])) - 1)]
        for t in threads:
            t.start()
        self._serve_one()

    def _serve_one(self) -> None:
        while True:
            try:
                with self.rlock:
                    header, arrays = self._next()
            except (self.ipc.Closed, OSError, ValueError):
                os._exit(0)  # the agent is gone (or closed us): nothing to answer to
            if header.get("op") == "stop":
                os._exit(0)
            try:
                self._run(header, arrays)
            except Exception as exc:  # noqa: BLE001 - a bug here answers the request, never hangs it
                self.send({"id": header.get("id"), "error": "runtime", "message": f"{type(exc).__name__}: {exc}"})

    def _next(self):
        """The next message: one read of what the socket has (not a read for its length, then
        another for the rest), shared by the threads under rlock."""
        while not self.pending:
            n = self.sock.recv_into(self.chunk)
            if not n:
                raise self.ipc.Closed("the agent closed the socket")
            self.pending.extend(self.frames.feed(memoryview(self.chunk)[:n]))
        return self.pending.pop(0)

    def _hook(self, feed: dict) -> None:
        if (self.folder / ".test_broken").exists():
            raise RuntimeError("simulated execution provider failure (test hook)")
        path = self.folder / ".test_crash"
        if not path.exists():
            return
        spec = json.loads(path.read_text())
        col = feed.get(spec.get("column"))
        if col is None or not (col == spec.get("value")).any():
            return
        action = spec.get("action", "segfault")
        if action == "segfault":
            import ctypes

            ctypes.string_at(0)  # a real segmentation fault
        elif action == "abort":
            os.abort()
        elif action == "hang":
            time.sleep(3600)
        elif action == "memory":
            blocks = []
            while True:  # until the address-space limit refuses
                blocks.append(bytearray(64 << 20))

    def _run_once(self, feed: dict, timeout_s: float | None):
        ro = self.ort.RunOptions()
        entry = self.deadlines.add(time.monotonic() + timeout_s, ro) if timeout_s else None
        try:
            return self.session.run(None, feed, ro), ro
        except Exception:
            if ro.terminate:
                raise TimeoutError from None
            raise
        finally:
            if entry is not None:
                self.deadlines.cancel(entry)

    def _run(self, header: dict, arrays: dict) -> None:
        np = self.np
        rid = header["id"]
        feed = {k: (a.astype(object) if a.dtype.kind in "US" else a) for k, a in arrays.items()}
        timeout_s = header.get("timeout_s")
        c0 = time.thread_time()
        t0 = time.perf_counter()
        try:
            if self.hooks:
                self._hook(feed)
            values, _ = self._run_once(feed, timeout_s)
        except TimeoutError:
            # counts for the circuit breaker only when the model is too slow for everyone: a known-good
            # row overruns the same deadline too (a big batch overrunning is the request's doing)
            try:
                self._run_once(self.canary, timeout_s)
                slow = False
            except TimeoutError:
                slow = True
            except Exception:  # noqa: BLE001
                slow = True
            self.send({"id": rid, "error": "deadline", "counts": slow})
            return
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).splitlines()[0][:400] if str(exc) else type(exc).__name__
            if _memory_error(exc):
                self.send({"id": rid, "error": "memory", "message": msg})
                os._exit(MEMORY_EXIT)  # a fresh process, not a fragmented heap
            try:
                if self.hooks:
                    self._hook(self.canary)
                self._run_once(self.canary, None)
                kind = "model_input"
            except Exception:  # noqa: BLE001
                kind = "runtime"
            self.send({"id": rid, "error": kind, "message": msg})
            return
        ms = (time.perf_counter() - t0) * 1000.0
        cpu_ms = (time.thread_time() - c0) * 1000.0
        n = header.get("rows", 0)
        self.since_canary += 1
        if n <= 8 and self.since_canary >= 64:  # a recent row that ran: the known-good input
            self.canary = {k: np.array(a[:1]) for k, a in feed.items()}
            self.since_canary = 0
        if all(isinstance(v, np.ndarray) for v in values):
            self.send({"id": rid, "ms": ms, "cpu_ms": cpu_ms}, dict(zip(self.output_names, values)))
        else:  # a ZipMap's list of maps: as JSON
            self.send({"id": rid, "ms": ms, "cpu_ms": cpu_ms, "json": self.outputs_to_json(self.output_names, values)})


def lower_cpu_priority(policy: str | None, nice: int) -> str | None:
    """``idle``: Linux's SCHED_IDLE, which any other runnable task preempts at once (a realtime
    request never waits for a batch run's time slice); ``nice``: a higher nice value. Both inherited
    by the threads started after (ONNX Runtime's included). What was applied, or None."""
    if policy == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError:
            pass
    if policy in ("idle", "nice") and nice > 0:
        try:
            os.nice(nice)
            return "nice"
        except OSError:
            pass
    return None


def _limit_memory(memory_mb: int | None, threads: int) -> float | None:
    """RLIMIT_AS = what the interpreter maps now + memory_mb + the stacks of the threads to come."""
    if not memory_mb:
        return None
    try:
        import resource
    except ImportError:  # not POSIX: not enforced (docs/DEVICE.md)
        return None
    vsz, _ = _vsz_rss_mb()
    if vsz is None:  # no /proc (macOS): the kernel does not enforce RLIMIT_AS there either
        return None
    limit = int((vsz + memory_mb) * 2**20) + threads * THREAD_STACK
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit / 2**20


def main(argv: list[str] | None = None) -> int:
    cfg = json.loads((argv or sys.argv[1:])[0])
    _die_with_parent()
    sock = socket.socket(fileno=int(cfg["fd"]))
    cgroup = cfg.get("cgroup")
    joined = None
    if cgroup and cfg.get("memory_mb"):
        from device_bridge.agent import memlimit

        try:
            memlimit.join(cgroup)  # before anything is mapped: all of it is charged there
            joined = memlimit
        except OSError as exc:
            print(f"worker: cannot join cgroup {cgroup['path']}: {exc}; RLIMIT_AS instead", file=sys.stderr)
    lower_cpu_priority(cfg.get("cpu_policy"), int(cfg.get("nice") or 0))
    import numpy  # noqa: F401 - mapped before the limit is measured
    import onnxruntime  # noqa: F401

    from device_bridge.agent import ipc

    threading.stack_size(THREAD_STACK)
    threads = int(cfg["concurrency"]) + max(0, int(cfg["threads"]) - 1) + 2
    limit, memory_limit = None, None
    if joined is not None:
        try:
            memory_limit = {"mechanism": cgroup["mechanism"], "cgroup": cgroup["path"],
                            "limit_mb": round(joined.limit(cgroup, int(cfg["memory_mb"])), 1)}
        except (OSError, ValueError) as exc:
            print(f"worker: cannot set the limit of cgroup {cgroup['path']}: {exc}; RLIMIT_AS instead",
                  file=sys.stderr)
    if memory_limit is None:
        limit = _limit_memory(cfg.get("memory_mb"), threads)
        if limit is not None:
            memory_limit = {"mechanism": "rlimit_as", "cgroup": None, "limit_mb": round(limit, 1)}
    try:
        worker = Worker(cfg, sock)
        ready = worker.load()
    except BaseException as exc:  # noqa: BLE001 - say why, then go
        kind = "memory" if _memory_error(exc) else "load"
        ipc.send(sock, ipc.pack({"op": "failed", "kind": kind, "error": f"{type(exc).__name__}: {exc}"[:500]}))
        return MEMORY_EXIT if kind == "memory" else LOAD_FAILED_EXIT
    ready["limit_mb"] = limit
    ready["memory_limit"] = memory_limit
    worker.send(ready)
    worker.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The agent's side of model worker processes (deploy setting ``isolation = 'process'``).

Each such model version runs in its own process (worker.py), fed over a Unix socket pair
(ipc.py). When a worker dies (a segfault or abort in a native kernel, its memory budget, a kill
because a run overran its deadline by far), the requests it had answer 503 with the reason
(kind ``worker``, or ``memory`` for the budget), the agent and its other models go on, and the
worker is started again after a backoff: 0.1 s, doubling up to 10 s, back to 0.1 s once a worker
has lived 30 s. Requests that arrive while it restarts answer 503 at once, saying when the next
start is due.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_bridge.agent import ipc
from device_bridge.agent.memlimit import Cgroup, MemoryLimits
from device_bridge.agent.worker import LOAD_FAILED_EXIT, MEMORY_EXIT
from device_bridge.errors import ApiError

log = logging.getLogger("device_bridge.agent.workers")

RESTART_MIN_S = 0.1
RESTART_MAX_S = 10.0
STABLE_S = 30.0
START_TIMEOUT_S = 120.0
SOCKET_BUFFER = 4 << 20
READ_CHUNK = 256 << 10  # what the event loop reads from a worker's socket at a time
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)  # where `device_bridge` is importable


class _Spawner:
    """Starts every worker process from one thread that lives as long as the agent: a worker asks
    the kernel to kill it when its parent goes (PR_SET_PDEATHSIG), and for Linux that parent is
    the thread that forked it, so a short-lived thread (a restart timer, a pool thread that
    retires) would take its workers with it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: list = []
        self.cond = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        done = threading.Event()
        box: list = []
        with self.cond:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="worker-spawner", daemon=True)
                self.thread.start()
            self.jobs.append((args, kwargs, box, done))
            self.cond.notify()
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.jobs:
                    self.cond.wait()
                args, kwargs, box, done = self.jobs.pop(0)
            try:
                box.append(subprocess.Popen(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.append(exc)
            done.set()


_spawner = _Spawner()


def agent_cpus() -> set[int]:
    """The cores the agent may run on (all of them where affinity is not supported)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def set_process_cpus(pid: int, cpus: set[int]) -> bool:
    """Set the CPU affinity of every thread of process ``pid`` (Linux applies it per thread; threads
    started later inherit their creator's). False where the platform cannot (macOS) or it failed."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    ok = True
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that just ended, or a set the kernel refuses
            ok = False
    return ok


class WorkerDown(ApiError):
    """503: the model's worker process is not there (crashed, restarting, over its memory budget)."""

    def __init__(self, message: str, kind: str = "worker"):
        super().__init__(503, message, kind)


@dataclass
class WorkerSpec:
    name: str
    version: int
    folder: Path
    model_path: str
    preference: list[str]
    available: list[str]
    candidates: list[list[str]]
    strict: bool
    threads: int        # ONNX Runtime intra-op threads of the session
    concurrency: int    # runs at once (max_concurrency)
    memory_mb: int | None
    nice: int
    cpu_policy: str | None  # "idle" (SCHED_IDLE), "nice", or None: the agent's own priority
    profile: bool       # measure node placement on the first run
    limits: MemoryLimits | None = None  # how memory_mb is enforced (memlimit.py); None: RLIMIT_AS


def describe_exit(status: int | None, memory_mb: int | None, oom_killed: bool = False) -> tuple[str, str]:
    """(reason, kind) for a worker's exit status; ``oom_killed``: its cgroup counted a kill for its
    limit since it started."""
    if status is None:
        return "stopped answering", "worker"
    if oom_killed and status == -signal.SIGKILL:
        return (f"exceeded its memory budget of {memory_mb} MB (memory_mb) and was stopped by the kernel "
                "(its cgroup's memory limit)", "memory")
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        what = {"SIGSEGV": "segmentation fault", "SIGABRT": "abort", "SIGKILL": "killed",
                "SIGBUS": "bus error", "SIGILL": "illegal instruction", "SIGFPE": "arithmetic fault"}.get(name)
        return f"crashed ({name}{', ' + what if what else ''})", "worker"
    if status == MEMORY_EXIT:
        return f"exceeded its memory budget of {memory_mb} MB (memory_mb) and was stopped", "memory"
    if status == LOAD_FAILED_EXIT:
        return "could not load the model", "worker"
    return f"exited with status {status}", "worker"


class WorkerProcess:
    """One model version's worker: start, submit runs, restart after a death, stop."""

    def __init__(self, spec: WorkerSpec, on_event: Callable[..., None] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        """``loop``: the agent's event loop, which then reads the worker's answers itself (one thread
        hand-off less per request); until one is known (attach()), a thread reads them."""
        self.spec = spec
        self.loop = loop
        self.on_event = on_event or (lambda what, **f: None)
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.pending: dict[int, Callable[[dict, dict], None]] = {}
        self.state = "starting"
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.sender: ipc.Sender | None = None
        self.gen = 0
        self.ready: dict[str, Any] = {}
        self.started_at = 0.0
        self.restarts = 0
        self.deaths = 0
        self.backoff = RESTART_MIN_S
        self.next_start: float | None = None
        self.last_exit: dict | None = None
        self.kill_reason: tuple[str, str] | None = None
        self.stopping = False
        self.cpus: set[int] | None = None  # the cores its threads may use (None: the agent's own)
        self.cgroup: Cgroup | None = None  # its memory cgroup (memlimit.py), made at its first start
        self.oom_base = 0                  # the cgroup's oom_kill count when the process started

    @property
    def label(self) -> str:
        return f"model {self.spec.name} version {self.spec.version}"

    # ------------------------------------------------------------------ start

    def start(self) -> dict:
        """Spawn the process and wait for its ``ready`` (blocking). Raises ApiError when it fails
        to load (kind ``load``, or ``memory`` when the model does not fit its budget)."""
        s = self.spec
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sk in (parent, child):
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                try:
                    sk.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass
        cg = self._cgroup()
        cfg = {"fd": child.fileno(), "folder": str(s.folder), "model_path": s.model_path,
               "preference": s.preference, "available": s.available, "candidates": s.candidates,
               "strict": s.strict, "threads": s.threads, "concurrency": s.concurrency,
               "memory_mb": s.memory_mb, "nice": s.nice, "cpu_policy": s.cpu_policy, "profile": s.profile,
               "cgroup": cg.spec() if cg is not None else None}
        env = dict(os.environ)
        # numpy's BLAS threads are not needed (ORT has its own); fewer malloc arenas keep the address
        # space, and so the memory budget, about the model
        env.update(MALLOC_ARENA_MAX="2", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p))
        try:
            proc = _spawner.popen([sys.executable, "-m", "device_bridge.agent.worker", json.dumps(cfg)],
                                  pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            parent.close()
            child.close()
            self._remove_cgroup()
            raise ApiError(503, f"{self.label}: cannot start its worker process: {exc}", "worker") from None
        child.close()
        parent.settimeout(START_TIMEOUT_S)
        try:
            header, _ = ipc.recv(parent)
        except (ipc.Closed, OSError) as exc:
            try:
                status = proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                status = proc.wait()
            parent.close()
            reason, kind = describe_exit(status, s.memory_mb, self._oom_killed()) \
                if not isinstance(exc, TimeoutError) else (f"did not load within {START_TIMEOUT_S:g} s", "load")
            self._remove_cgroup()  # a next start makes a fresh one
            raise ApiError(503 if kind == "worker" else 422, f"{self.label}: its worker process {reason} while "
                                                             "loading the model", kind) from None
        parent.settimeout(None)
        if header.get("op") != "ready":
            proc.wait()
            parent.close()
            self._remove_cgroup()
            kind = header.get("kind", "load")
            msg = header.get("error", "unknown error")
            if kind == "memory":
                raise ApiError(422, f"{self.label} does not fit its memory budget of {s.memory_mb} MB (memory_mb) "
                                    f"while loading: {msg}", "memory")
            raise ApiError(422, f"{self.label} cannot be loaded: {msg}", "load")
        with self.lock:
            if self.stopping:  # stopped while this one started (a restart racing an unload)
                proc.kill()
                proc.wait()
                parent.close()
                self._remove_cgroup()
                raise ApiError(503, f"{self.label}: its worker process was stopped", "worker")
            self.gen += 1
            gen = self.gen
            self.proc, self.sock, self.ready = proc, parent, header
            self.sender = ipc.Sender(parent)
            self.state = "ready"
            self.started_at = time.monotonic()
            self.next_start = None
            self.kill_reason = None
        if self.cpus is not None:
            set_process_cpus(proc.pid, self.cpus)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._watch, gen, proc, parent)
        else:
            threading.Thread(target=self._read, args=(gen, proc, parent), name=f"worker-{s.name}-{s.version}",
                             daemon=True).start()
        return header

    def _cgroup(self) -> Cgroup | None:
        """A fresh memory cgroup for the process about to start (None: RLIMIT_AS). Fresh, not the
        previous process's: what that one left charged there (its page cache) would count against
        the new one's baseline."""
        s = self.spec
        self._remove_cgroup()  # the previous process's, if one is left: it has been waited for
        if s.limits is None or not s.memory_mb:
            return None
        cg = s.limits.child(s.name, s.version)
        if cg is None:
            return None
        try:
            cg.create()
        except OSError as exc:
            log.warning("%s: cannot create its cgroup %s (%s): RLIMIT_AS instead", self.label, cg.path, exc)
            return None
        self.cgroup = cg
        self.oom_base = cg.oom_kills()
        return cg

    def _oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_kills() > self.oom_base

    def _remove_cgroup(self) -> None:
        """Once no process of it is left (the worker has been waited for)."""
        cg, self.cgroup = self.cgroup, None
        if cg is not None:
            cg.remove()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on the event loop reads the answers (a reading thread hands over between two)."""
        self.loop = loop

    def set_cpus(self, cpus: set[int] | None) -> None:
        """Confine the worker's threads (ONNX Runtime's included) to ``cpus``; None: every core the
        agent may use. Kept for the workers started later (a restart)."""
        self.cpus = cpus
        proc = self.proc
        if proc is not None and self.state == "ready":
            set_process_cpus(proc.pid, cpus if cpus is not None else agent_cpus())

    # ------------------------------------------------------------------ runs

    def submit(self, header: dict, arrays: dict, callback: Callable[[dict, dict], None]) -> int:
        """Send one run; ``callback(reply_header, arrays)`` is called from the reader thread (an
        error reply has ``error``). Raises WorkerDown when the worker is not there."""
        with self.lock:
            if self.state != "ready":
                raise self.down_error()
            rid = next(self.ids)
            self.pending[rid] = callback
            sender = self.sender
        try:
            sender.send(ipc.pack({**header, "id": rid}, arrays, ipc.TO_WORKER[0]))
        except OSError:
            with self.lock:
                self.pending.pop(rid, None)
            raise self.down_error() from None
        return rid

    def forget(self, rid: int) -> None:
        with self.lock:
            self.pending.pop(rid, None)

    def pending_ids(self) -> set[int]:
        with self.lock:
            return set(self.pending)

    def down_error(self) -> WorkerDown:
        last = self.last_exit or {}
        if self.state == "stopped":
            return WorkerDown(f"{self.label}: its worker process was stopped (the version was unloaded)")
        due = f"; next start in {max(0.0, self.next_start - time.monotonic()):.1f} s" if self.next_start else ""
        return WorkerDown(f"{self.label}: its worker process {last.get('reason', 'is starting')}; restarting{due}",
                          last.get("kind", "worker"))

    def _dispatch(self, header: dict, arrays: dict) -> None:
        with self.lock:
            cb = self.pending.pop(header.get("id"), None)
        if cb is not None:
            try:
                cb(header, arrays)
            except Exception:  # noqa: BLE001 - one request's callback must not stop the reader
                log.exception("%s: answer callback failed", self.label)

    def _read(self, gen: int, proc: subprocess.Popen, sock: socket.socket) -> None:
        """Answers read by a thread, until the event loop is known: then it takes over."""
        while True:
            try:
                if self.loop is not None and not select.select([sock], [], [], 0)[0]:
                    self.loop.call_soon_threadsafe(self._watch, gen, proc, sock)  # between two messages
                    return
                if not select.select([sock], [], [], 0.25)[0]:
                    continue
                header, arrays = ipc.recv(sock)
            except (ipc.Closed, OSError, ValueError):
                break
            self._dispatch(header, arrays)
        self._died(gen, proc, sock)

    def _watch(self, gen: int, proc: subprocess.Popen, sock: socket.socket) -> None:
        """On the event loop: read what the socket has whenever it has something."""
        frames = ipc.Frames()
        fd = sock.fileno()
        if fd < 0:  # closed meanwhile
            return
        chunk = bytearray(READ_CHUNK)
        view = memoryview(chunk)

        def readable() -> None:
            try:
                n = sock.recv_into(chunk, READ_CHUNK, socket.MSG_DONTWAIT)
                messages = frames.feed(view[:n]) if n else None
            except BlockingIOError:
                return
            except (OSError, ipc.Closed, ValueError):
                messages = None
            if messages is None:  # the worker is gone: the rest (waiting for its exit status) off the loop
                self.loop.remove_reader(fd)
                threading.Thread(target=self._died, args=(gen, proc, sock), daemon=True).start()
                return
            for header, arrays in messages:
                self._dispatch(header, arrays)

        self.loop.add_reader(fd, readable)

    def _died(self, gen: int, proc: subprocess.Popen, sock: socket.socket) -> None:
        try:
            status = proc.wait(5)
        except subprocess.TimeoutExpired:  # closed its socket but lives: make sure
            proc.kill()
            status = proc.wait()
        sock.close()
        oom = self._oom_killed()
        with self.lock:
            if gen != self.gen:
                return
            reason, kind = self.kill_reason or describe_exit(status, self.spec.memory_mb, oom)
            pending, self.pending = self.pending, {}
            stopping = self.stopping
            self.state = "stopped" if stopping else "restarting"
            if not stopping:
                self.deaths += 1
                lived = time.monotonic() - self.started_at
                self.backoff = RESTART_MIN_S if lived >= STABLE_S else min(RESTART_MAX_S, self.backoff * 2)
                if self.deaths == 1:
                    self.backoff = RESTART_MIN_S
                self.next_start = time.monotonic() + self.backoff
                self.last_exit = {"time": time.time(), "reason": reason, "kind": kind, "status": status,
                                  "pid": proc.pid}
        for cb in pending.values():
            try:
                cb({"error": kind, "message": f"{self.label}: its worker process {reason}; restarting"}, {})
            except Exception:  # noqa: BLE001
                log.exception("%s: answer callback failed", self.label)
        self._remove_cgroup()  # a restart makes a fresh one
        if stopping:
            return
        log.warning("%s: worker process (pid %s) %s; restarting in %.1f s", self.label, proc.pid, reason, self.backoff)
        t = threading.Timer(self.backoff, self._restart)
        t.daemon = True
        t.start()
        self._event("worker_exit", reason=reason, cause=kind, status=status, pid=proc.pid,
                    restart_in_s=round(self.backoff, 3))

    def _event(self, what: str, **fields) -> None:
        try:
            self.on_event(what, **fields)
        except Exception:  # noqa: BLE001 - reporting must not stop a restart
            log.exception("%s: event %s", self.label, what)

    def _restart(self) -> None:
        if self.stopping:
            return
        try:
            self.start()
        except ApiError as exc:
            with self.lock:
                if self.stopping:
                    return
                self.backoff = min(RESTART_MAX_S, self.backoff * 2)
                self.next_start = time.monotonic() + self.backoff
                self.last_exit = {"time": time.time(), "reason": f"failed to start again ({exc.message})",
                                  "kind": exc.kind if exc.kind in ("memory", "worker") else "worker",
                                  "status": None, "pid": None}
                self.state = "restarting"
            t = threading.Timer(self.backoff, self._restart)
            t.daemon = True
            t.start()
            self._event("worker_start_failed", error=exc.message[:300], restart_in_s=round(self.backoff, 3))
            return
        with self.lock:
            self.restarts += 1
        self._event("worker_restarted", pid=self.ready.get("pid"), restarts=self.restarts)

    # ------------------------------------------------------------------ stop / kill

    def kill(self, reason: str, kind: str = "worker") -> None:
        """Kill the process now (a run overran its deadline by far); it is restarted as after a crash."""
        with self.lock:
            proc = self.proc
            if proc is None or self.state != "ready":
                return
            self.kill_reason = (reason, kind)
        try:
            proc.kill()
        except OSError:
            pass

    def stop(self, grace_s: float = 5.0) -> None:
        """No restart; the process ends once its runs in progress have answered (at most ``grace_s``)."""
        with self.lock:
            self.stopping = True
            self.state = "stopped"
            proc = self.proc

        def finish():
            deadline = time.monotonic() + grace_s
            while self.pending and time.monotonic() < deadline:
                time.sleep(0.02)
            if proc is not None and proc.poll() is None:
                proc.kill()  # its reader sees the end and removes its cgroup (_died)
            else:  # never started, or gone already: nothing will read its end
                self._remove_cgroup()

        if self.pending and grace_s > 0:
            threading.Thread(target=finish, daemon=True).start()
        else:
            finish()

    # ------------------------------------------------------------------ info

    def rss_mb(self) -> float | None:
        proc = self.proc
        if proc is None or self.state != "ready":
            return None
        try:
            with open(f"/proc/{proc.pid}/statm") as f:
                return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
        except (OSError, ValueError, IndexError):
            return None

    def info(self) -> dict:
        proc = self.proc
        return {"pid": proc.pid if proc is not None and self.state == "ready" else None, "state": self.state,
                "restarts": self.restarts, "last_exit": dict(self.last_exit) if self.last_exit else None,
                "rss_mb": self.rss_mb(), "address_space_limit_mb": self.ready.get("limit_mb"),
                "memory_limit": self.ready.get("memory_limit"),
                "next_start_in_s": round(max(0.0, self.next_start - time.monotonic()), 3)
                if self.next_start and self.state == "restarting" else None}


class CoreReserve:
    """Cores kept free of batch work while realtime requests arrive (``--realtime-reserve``).

    On a small device a realtime request's wake-ups (the event loop's, its client's) wait for a core
    when every core runs a batch thread, however low that thread's priority (SCHED_IDLE or nice 19:
    measured on a 2-vCPU VM, a socket ping-pong's 99.9th percentile goes from 0.1 ms with one core
    busy to 2-3 ms with both). So when a realtime request arrived within ``window_s``, the batch
    worker processes are confined (CPU affinity, every thread) to all but ``reserve`` cores, and
    given every core again once realtime traffic has been quiet for ``window_s``. Runs on the event
    loop; a change costs a system call per worker thread, only at the transitions."""

    def __init__(self, reserve: int, window_s: float, workers: Callable[[], list]):
        self.reserve = max(0, reserve)
        self.window_s = window_s
        self.workers = workers  # the batch worker processes now
        cpus = sorted(agent_cpus())
        self.batch_cpus = set(cpus[self.reserve:]) if self.reserve and len(cpus) > self.reserve \
            and hasattr(os, "sched_setaffinity") else None
        self.enabled = self.batch_cpus is not None
        self.active = False
        self.last = 0.0
        self.changes = 0
        self.timers = None

    def note(self, now: float, timers) -> None:
        """A realtime request arrived (monotonic ``now``); ``timers``: the scheduler's."""
        self.last = now
        if not self.active:
            self.active = True
            self.timers = timers
            self._apply()
            timers.add(now + self.window_s, self._check)

    def _check(self) -> None:
        if time.monotonic() - self.last >= self.window_s:
            self.active = False
            self._apply()
        else:
            self.timers.add(self.last + self.window_s, self._check)

    def confine(self) -> set[int] | None:
        """What a batch worker starting now should be confined to."""
        return self.batch_cpus if self.active else None

    def _apply(self) -> None:
        self.changes += 1
        cpus = self.confine()
        for w in self.workers():
            try:
                w.set_cpus(cpus)
            except Exception:  # noqa: BLE001 - a worker that just died: its restart takes .cpus
                log.exception("%s: cannot set its cores", w.label)

    def describe(self) -> dict:
        return {"cores": self.reserve if self.enabled else 0, "window_ms": round(self.window_s * 1000),
                "active": self.active, "batch_cpus": sorted(self.batch_cpus) if self.active else None,
                "changes": self.changes}

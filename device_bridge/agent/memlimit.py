"""How a worker process's memory budget (deploy setting ``memory_mb``) is enforced on this machine.

Chosen once, at the agent's start (``--memory-limit``, default ``auto``: the first that works):

- ``cgroup_v2``: the agent's cgroup (``0::PATH`` in /proc/self/cgroup, under the cgroup2 mount)
  already delegates the memory controller to its children (``memory`` in its
  ``cgroup.subtree_control``) and the agent may create a child there: each worker gets a child
  cgroup of its own with ``memory.max`` (and ``memory.swap.max`` 0);
- ``cgroup_v1``: the agent's folder of the v1 memory controller (``N:memory:PATH``) takes a child
  that the agent may write: each worker gets one with ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes``, where swap is accounted, so that swap is no way around it);
- ``rlimit_as``: the worker limits its own address space (``RLIMIT_AS``, worker.py);
- ``none``: counted, not enforced (no /proc: macOS; or not POSIX).

Whether a cgroup is usable is checked by doing it: a probe child is created, given a limit and
removed. In a cgroup, the limit is what the worker holds once numpy and onnxruntime are imported
(its own ``memory.current`` / ``memory.usage_in_bytes``, measured by the worker) + ``memory_mb``;
past it the kernel stops the worker (SIGKILL from the cgroup's own OOM killer: the agent and the
other workers are not in it), and the agent tells that death from a crash by the cgroup's
``oom_kill`` count. Each start of a worker gets a fresh folder, removed once its process has
gone; folders left by an agent that was killed are removed by the next agent that starts (their
owner's pid is in the name).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("device_bridge.agent.memlimit")

CHOICES = ("auto", "cgroup", "rlimit")
MECHANISMS = ("cgroup_v2", "cgroup_v1", "rlimit_as", "none")
_PREFIX = "mlsql-"
_NAME = re.compile(r"^mlsql-(\d+)-")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_seq = itertools.count(1)  # next() is atomic under the interpreter lock


class Unavailable(RuntimeError):
    """``--memory-limit cgroup`` where no cgroup can be written."""


def _cgroup_lines() -> list[tuple[str, str, str]]:
    try:
        with open("/proc/self/cgroup") as f:
            return [tuple(line.rstrip("\n").split(":", 2)) for line in f if line.count(":") >= 2]  # type: ignore[misc]
    except OSError:
        return []


def _mounts() -> list[tuple[str, str, str, list[str]]]:
    """(fstype, mount root, mount point, super options) of the cgroup mounts, from mountinfo."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                lf, rf = left.split(), right.split()
                if len(lf) >= 5 and len(rf) >= 3 and rf[0] in ("cgroup", "cgroup2"):
                    out.append((rf[0], lf[3], lf[4].replace("\\040", " "), rf[2].split(",")))
    except OSError:
        pass
    return out


def _join(mount: str, root: str, path: str) -> Path:
    if root != "/" and path.startswith(root):
        path = path[len(root) :]
    return Path(mount) / path.lstrip("/")


def _folders() -> list[tuple[str, Path]]:
    """Where this process's memory cgroup lives: [(mechanism, folder)], v2 first."""
    lines = _cgroup_lines()
    mounts = _mounts()
    out = []
    for hid, controllers, path in lines:
        if hid == "0" and controllers == "":
            for fstype, root, point, _ in mounts:
                if fstype == "cgroup2":
                    out.append(("cgroup_v2", _join(point, root, path)))
                    break
    for _hid, controllers, path in lines:
        if "memory" in controllers.split(","):
            for fstype, root, point, opts in mounts:
                if fstype == "cgroup" and "memory" in opts:
                    out.append(("cgroup_v1", _join(point, root, path)))
                    break
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(folder: Path) -> int:
    """Remove the worker folders under ``folder`` whose agent is gone (empty ones only: a cgroup
    with a process in it cannot be removed). Returns how many went."""
    gone = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for d in entries:
        m = _NAME.match(d.name)
        if m and d.is_dir() and not _pid_alive(int(m.group(1))):
            try:
                d.rmdir()
                gone += 1
            except OSError:
                pass
    return gone


def sweep_dead(wait_s: float = 0.0) -> int:
    """sweep() every memory cgroup folder of this process, retrying for up to ``wait_s`` while a
    dead agent's folders are still busy (its workers die a moment after it). For whoever stops an
    agent with SIGKILL (tests, benchmarks)."""
    import time

    deadline = time.monotonic() + wait_s
    gone = 0
    while True:
        left = 0
        for _, folder in _folders():
            gone += sweep(folder)
            try:
                left += sum(
                    1
                    for d in folder.iterdir()
                    if (m := _NAME.match(d.name)) and not _pid_alive(int(m.group(1)))
                )
            except OSError:
                pass
        if not left or time.monotonic() >= deadline:
            return gone
        time.sleep(0.05)


class Cgroup:
    """One worker's cgroup folder."""

    def __init__(self, mechanism: str, path: Path):
        self.mechanism = mechanism
        self.path = path

    @property
    def v2(self) -> bool:
        return self.mechanism == "cgroup_v2"

    def create(self) -> None:
        self.path.mkdir(exist_ok=True)

    def oom_kills(self) -> int:
        """How many times the kernel stopped a process of this cgroup for its limit."""
        try:
            text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and v.strip().isdigit():
                return int(v)
        if not self.v2:  # kernels before 4.13 have no oom_kill line: the limit was hit at least
            try:
                return int((self.path / "memory.failcnt").read_text().strip() or 0)
            except (OSError, ValueError):
                return 0
        return 0

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the worker cgroup %s: %s", self.path, exc)

    def spec(self) -> dict:
        return {"mechanism": self.mechanism, "path": str(self.path)}


class MemoryLimits:
    """The mechanism this agent uses, and the folder where its workers' cgroups go."""

    def __init__(self, mechanism: str, folder: Path | None = None):
        self.mechanism = mechanism
        self.folder = folder

    def child(self, name: str, version: int) -> Cgroup | None:
        """A new cgroup (not yet created) for a worker of (name, version); None without cgroups."""
        if self.folder is None:
            return None
        n = next(_seq)  # one count for the process: its simulated devices (--devices K) share the folder
        safe = _SAFE.sub("_", name)[:40]
        return Cgroup(self.mechanism, self.folder / f"{_PREFIX}{os.getpid()}-{safe}-v{version}-{n}")

    def describe(self) -> dict:
        return {"mechanism": self.mechanism, "cgroup": str(self.folder) if self.folder else None}


def _probe(mechanism: str, folder: Path) -> bool:
    """Create a child, give it a limit, read it back, remove it: can this agent use cgroups here?"""
    if mechanism == "cgroup_v2":
        try:
            if "memory" not in (folder / "cgroup.subtree_control").read_text().split():
                return False
        except OSError:
            return False
    probe = folder / f"{_PREFIX}{os.getpid()}-probe"
    limit_file = "memory.max" if mechanism == "cgroup_v2" else "memory.limit_in_bytes"
    want = 64 << 20
    try:
        probe.mkdir(exist_ok=True)
    except OSError:
        return False
    try:
        (probe / limit_file).write_text(str(want))
        got = (probe / limit_file).read_text().strip()
        return got.isdigit() and int(got) == want
    except OSError:
        return False
    finally:
        try:
            probe.rmdir()
        except OSError:
            pass


def detect(choice: str = "auto") -> MemoryLimits:
    """The mechanism for ``choice`` (``auto``, ``cgroup``, ``rlimit``); Unavailable when ``cgroup``
    is asked for and none can be written."""
    if choice not in CHOICES:
        raise Unavailable(f"--memory-limit must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice in ("auto", "cgroup") and os.name == "posix":
        for mechanism, folder in _folders():
            sweep(folder)
            if _probe(mechanism, folder):
                return MemoryLimits(mechanism, folder)
        if choice == "cgroup":
            found = ", ".join(f"{m} {f}" for m, f in _folders()) or "no memory cgroup"
            raise Unavailable(
                f"--memory-limit cgroup: no memory cgroup this agent may create a child in ({found}); "
                "use --memory-limit auto or rlimit"
            )
    try:
        import resource  # noqa: F401
    except ImportError:
        return MemoryLimits("none")
    return MemoryLimits("rlimit_as" if os.path.exists("/proc/self/statm") else "none")


# ---------------------------------------------------------------------------- in the worker


def join(spec: dict) -> None:
    """The worker moves itself into its cgroup (first thing: what it maps from then on is charged there)."""
    with open(os.path.join(spec["path"], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def limit(spec: dict, memory_mb: int) -> float:
    """The worker sets its cgroup's limit: what it holds now + memory_mb. Returns the limit in MB."""
    path = Path(spec["path"])
    v2 = spec["mechanism"] == "cgroup_v2"
    used = int((path / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text().strip())
    value = used + memory_mb * 2**20
    if v2:
        (path / "memory.max").write_text(str(value))
        try:
            (path / "memory.swap.max").write_text("0")
        except OSError:  # no swap accounting
            pass
    else:
        # memory + swap may never be below memory alone: raised first when the limit goes up; when it
        # goes down, that write fails and is made again after the memory limit's
        memsw = path / "memory.memsw.limit_in_bytes"
        try:
            memsw.write_text(str(value))
            memsw_done = True
        except OSError:  # swap not accounted (no memsw file), or the limit goes down
            memsw_done = False
        (path / "memory.limit_in_bytes").write_text(str(value))
        if not memsw_done and memsw.exists():
            memsw.write_text(str(value))
    return value / 2**20

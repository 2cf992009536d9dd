"""Real device-bridge processes for tests: an agent or hub started as `python -m device_bridge`
(or any command that writes a ready file), waited for until it listens."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def start_bridge(args: list[str], tmp: Path, tag: str = "agent", *, timeout: float = 60.0, env=None,
                 command: list[str] | None = None) -> tuple[subprocess.Popen, list[dict]]:
    """Start ``device_bridge <args>`` (or ``command + args``) with a ready file in ``tmp``; returns
    the process and what it listens on (one entry per device: name, port, url). Its output goes
    to ``tmp/<tag>.log``, which the error shows when it exits or does not start in time."""
    ready = tmp / f"{tag}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = tmp / f"{tag}.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen([*(command or [sys.executable, "-m", "device_bridge"]), *args,
                              "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready.exists():
            try:
                data = json.loads(ready.read_text())
                return p, data.get("listening") or data.get("devices") or [data]
            except json.JSONDecodeError:  # written but not yet complete
                pass
        if p.poll() is not None:
            raise RuntimeError(f"{tag} exited:\n{log_path.read_text()}")
        time.sleep(0.05)
    p.kill()
    raise RuntimeError(f"{tag} did not start in {timeout:g} s:\n{log_path.read_text()}")


def start_agent(tmp: Path, *, token: str, trust: Path, name: str = "d1", port: int = 0,
                store: Path | None = None, tag: str = "agent") -> tuple[subprocess.Popen, str]:
    """One agent on loopback trusting the workspace key ``trust``; returns the process and its URL."""
    p, listening = start_bridge(["serve", "--name", name, "--port", str(port), "--store", str(store or tmp / name),
                                 "--token", token, "--trust", str(trust)], tmp, tag)
    return p, listening[0]["url"]

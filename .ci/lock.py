"""The lock file: the exact versions `make install` installs, so two fresh machines get the same packages.

    python .ci/lock.py            # resolve pyproject.toml again (pip's resolver) and rewrite requirements.lock,
                                  # keeping every locked version that still fits (as pip-compile and uv do)
    python .ci/lock.py --upgrade  # resolve from scratch: the newest versions pyproject.toml allows
    python .ci/lock.py --check    # exit 1 when requirements.lock no longer matches pyproject.toml

`make lock` runs the first. The lock holds every package (with its dependencies) that
`pip install -e '.[EXTRAS]'` resolves on Linux x86-64 with CPython 3.11, as `name==version`
lines, and a header with the sha256 of pyproject.toml's dependency tables: `--check`
(run by `make install`, and so by CI) fails when those tables changed since the lock
was written, or when a locked version falls outside a range pyproject.toml asks for.
A plain `pip install mlsql` still uses pyproject.toml's ranges.

torch is locked at the CPU build (2.13.0): the newest release in its range pulls a
multi-GB CUDA build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"


def _at(root: Path) -> None:
    global ROOT, LOCK, PYPROJECT
    ROOT, LOCK, PYPROJECT = root, root / "requirements.lock", root / "pyproject.toml"
EXTRAS = ("lab", "data", "test", "torch", "spark")
PINS = {"torch": "2.13.0"}  # the CPU build; see the module docstring
OWN = ("mlsql", "mlsql-device")  # this repository's distributions: installed from the clone, never locked
LOCAL = ["./device_bridge"]  # resolved from the clone, not the index


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib
    return tomllib.loads(path.read_text())


def _pyproject() -> dict:
    return _toml(PYPROJECT)


def _requirements(project: dict) -> list[str]:
    reqs = list(project.get("dependencies", []))
    reqs += _toml(ROOT / "device_bridge" / "pyproject.toml")["project"].get("dependencies", [])
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def _digest(project: dict) -> str:
    device = _toml(ROOT / "device_bridge" / "pyproject.toml")["project"].get("dependencies", [])
    tables = {"dependencies": project.get("dependencies", []), "extras": list(EXTRAS), "device": device,
              "optional-dependencies": {e: project.get("optional-dependencies", {}).get(e, []) for e in EXTRAS},
              "pins": PINS}
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked() -> tuple[str | None, dict[str, str]]:
    digest, pins = None, {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"# pyproject-sha256: ([0-9a-f]{64})", line)
        if m:
            digest = m.group(1)
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.strip()
    return digest, pins


def _kept(project: dict) -> dict[str, str]:
    """The locked versions that still fit pyproject.toml's direct requirements: the next resolution
    keeps them, so a change to one requirement moves only what it must."""
    from pip._vendor.packaging.requirements import Requirement

    if not LOCK.exists():
        return {}
    pins = _locked()[1]
    for text in _requirements(project):
        req = Requirement(text)
        name = _canonical(req.name)
        if name in pins and req.specifier and not req.specifier.contains(pins[name], prereleases=True):
            del pins[name]
    pinned = {_canonical(k) for k in PINS}
    return {k: v for k, v in pins.items() if k not in OWN and k not in pinned}


def _resolve(pins: dict[str, str]) -> list[dict] | None:
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "pins.txt"
        constraints.write_text("".join(f"{k}=={v}\n" for k, v in pins.items()))
        report = Path(tmp) / "report.json"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                               "--report", str(report), "-c", str(constraints), *LOCAL, f".[{','.join(EXTRAS)}]"],
                              cwd=ROOT)
        return json.loads(report.read_text())["install"] if done.returncode == 0 else None


def write(upgrade: bool = False) -> None:
    project = _pyproject()["project"]
    kept = {} if upgrade else _kept(project)
    resolved = _resolve({**kept, **PINS})
    if resolved is None and kept:
        print("the locked versions no longer resolve together with pyproject.toml; resolving from scratch",
              file=sys.stderr)
        resolved = _resolve(dict(PINS))
    if resolved is None:
        sys.exit("pip could not resolve pyproject.toml's dependencies (see above)")
    lines = sorted(f"{_canonical(i['metadata']['name'])}=={i['metadata']['version'].split('+')[0]}"
                   for i in resolved if _canonical(i["metadata"]["name"]) not in OWN)
    header = [
        "# The exact versions `make install` installs. Written by `make lock` (python .ci/lock.py); do not edit.",
        f"# extras: {','.join(EXTRAS)}; resolved for CPython {sys.version_info.major}.{sys.version_info.minor} "
        f"on {sys.platform}",
        f"# pyproject-sha256: {_digest(project)}",
    ]
    LOCK.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {LOCK.name}: {len(lines)} packages")


def check() -> int:
    from pip._vendor.packaging.requirements import Requirement

    if not LOCK.exists():
        print(f"{LOCK.name} is missing: run `make lock`", file=sys.stderr)
        return 1
    project = _pyproject()["project"]
    digest, pins = _locked()
    problems = []
    if digest != _digest(project):
        problems.append("pyproject.toml's dependencies changed since the lock was written")
    for text in _requirements(project):
        req = Requirement(text)
        if (req.marker is not None and not req.marker.evaluate()) or _canonical(req.name) in OWN:
            continue
        version = pins.get(_canonical(req.name))
        if version is None:
            problems.append(f"{req.name} is not in the lock")
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name}=={version} in the lock is outside pyproject.toml's range {req.specifier}")
    if problems:
        print(f"{LOCK.name} does not match pyproject.toml:\n  " + "\n  ".join(problems)
              + "\nRun `make lock` and commit requirements.lock.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the lock matches pyproject.toml")
    ap.add_argument("--upgrade", action="store_true", help="resolve from scratch instead of keeping locked versions")
    ap.add_argument("--root", type=Path, default=ROOT, help="the project folder (default: this clone)")
    a = ap.parse_args()
    _at(a.root.resolve())
    sys.exit(check() if a.check else write(a.upgrade))

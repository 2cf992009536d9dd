"""The extension's jest unit tests (extensions/test/*.spec.ts: %%mlsql detection, the dialect's
word lists, panel rows, error spans from line/column, deploy bodies, the lists read from the
vocabulary Python generates), run by pytest through `jlpm test` so that `make test` runs them too.
`jlpm test` first writes extensions/src/generated/vocabulary.json with this interpreter's
`python -m mlsql.language.vocabulary` (its bin folder leads the PATH)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parents[2] / "extensions"


def test_jest_unit_tests_pass():
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""), CI="1")
    if shutil.which("node", path=env["PATH"]) is None:
        pytest.skip("node is not installed: the extension's jest tests need it (so does building it)")
    if not (EXT / "node_modules" / ".bin" / "jest").exists():
        pytest.fail("extensions/node_modules is missing: run `make install` (or `cd extensions && jlpm install`)")
    r = subprocess.run(["jlpm", "test", "--ci"], cwd=EXT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "failed" not in out.split("Tests:")[-1].split("\n")[0], out[-3000:]

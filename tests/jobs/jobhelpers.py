"""Helpers for the job tests: small notebooks built with nbformat, the mlsql command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def wait_for(cond, timeout: float, what: str):
    """Poll ``cond()`` every 0.2 s until it is truthy (returned), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def write_notebook(path: Path, *cells: str, parameters: str | None = None, kernel: str = "python3") -> Path:
    """A notebook of code cells; ``parameters`` is the cell tagged "parameters" (first)."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb_cells = []
    if parameters is not None:
        c = new_code_cell(parameters)
        c.metadata["tags"] = ["parameters"]
        nb_cells.append(c)
    nb_cells += [new_code_cell(src) for src in cells]
    nb = new_notebook(cells=nb_cells)
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nbformat.write(nb, path)
    return path


def mlsql_cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLSQL_HOME"}
    return subprocess.run([sys.executable, "-m", "mlsql.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)

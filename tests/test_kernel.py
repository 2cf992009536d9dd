"""The MLSQL kernel, started for real through jupyter_client."""

from __future__ import annotations

import os

import pytest

from mlsql.notebook.kernel import as_python


def test_cells_become_python_for_ipython():
    assert as_python("SELECT 1") == "%%mlsql\nSELECT 1"
    assert as_python("%%python\nx = 1\nprint(x)") == "x = 1\nprint(x)"
    assert as_python("%pip list") == "%pip list"
    code = as_python("%python m = 12\nSELECT {m} AS x;\n%py n = m + 1\nSELECT {n} AS y")
    lines = code.split("\n")
    assert lines[0] == "m = 12" and lines[2] == "n = m + 1"
    assert "run_cell_magic('mlsql', '', '\\nSELECT {m} AS x;')" in lines[1]  # line 2 of the cell stays line 2
    assert lines[3].startswith("get_ipython().run_cell_magic") and not lines[3].endswith(";")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    from jupyter_client.manager import start_new_kernel

    ws = tmp_path_factory.mktemp("kernel") / "ws"
    km, kc = start_new_kernel(kernel_name="mlsql", env={**os.environ, "MLSQL_HOME": str(ws)})
    yield kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def run(kc, code: str) -> tuple[str, str]:
    out, err = [], []

    def hook(msg):
        t, c = msg["msg_type"], msg["content"]
        if t == "stream":
            (err if c["name"] == "stderr" else out).append(c["text"])
        elif t == "error":
            err.append(f"{c['ename']}: {c['evalue']}")
        elif t in ("execute_result", "display_data"):
            out.append(c["data"].get("text/plain", ""))

    kc.execute_interactive(code, output_hook=hook, timeout=120)
    return "".join(out), "".join(err)


def test_python_runs_in_the_kernel_namespace(kernel):
    out, err = run(kernel, "%%python\nm = 12\nimport pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})\nprint('ok', m)")
    assert "ok 12" in out and not err
    out, err = run(kernel, "SELECT {m} * 2 AS x")
    assert "24" in out and not err, (out, err)
    out, err = run(kernel, "SELECT sum(a) AS total FROM df")
    assert "6" in out and not err
    out, err = run(kernel, "%python k = m + 5\nCREATE TABLE kt AS SELECT {k} AS v;\n%python k = 100\nSELECT v, {k} AS w FROM kt")
    assert "17" in out and "100" in out and not err, (out, err)
    out, err = run(kernel, "%%python\nprint(type(_).__name__ if '_' in dir() else 'none', k)")
    assert "100" in out


def test_errors_name_the_line_of_the_cell(kernel):
    out, err = run(kernel, "%python z = 1\nSELECT 1;\n\nSELEC 42")
    assert "Line 4" in err or "line 4" in err, err
    assert "Traceback" not in err and "run_cell_magic" not in err

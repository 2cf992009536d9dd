"""Errors carry their position: as fields on the exception, and, in a notebook, as an
application/vnd.mlsql.error+json display published before the error, with the line and
column of the cell as the editor shows it. Checked through real kernels."""

from __future__ import annotations

import os

import pytest

import mlsql
from mlsql.errors import EngineError, ParseError, UnknownModelError, UnknownOptionError

MIME = "application/vnd.mlsql.error+json"
SETUP = ("CREATE OR REPLACE TABLE penguins AS SELECT 'Adelie' AS species, 39.1 AS bill_length_mm "
         "UNION ALL SELECT 'Gentoo', 47.5")

# (line 3 of a cell, the text the error is about, its kind)
CASES = [
    ("CREATE MODEL m OPTIONS (model_type = 'linear_reg' AS SELECT * FROM penguins", "AS", "ParseError"),
    ("SELECT bill_length_mm FRM penguins", "penguins", "EngineError"),
    ("SELECT species, bill_lenght_mm FROM penguins", "bill_lenght_mm", "EngineError"),
    ("SELECT * FROM ML.PREDICT(MODEL no_such_model, TABLE penguins)", "no_such_model", "UnknownModelError"),
    ("CREATE MODEL m OPTIONS (model_type = 'linear_reg', max_depht = 3, input_label_cols = ['bill_length_mm'])\n"
     "AS SELECT * FROM penguins", "max_depht", "UnknownOptionError"),
]


def test_fields_on_the_errors(tmp_path):
    s = mlsql.connect(tmp_path / "ws")
    s.sql(SETUP)
    kinds = {"ParseError": ParseError, "EngineError": EngineError, "UnknownModelError": UnknownModelError,
             "UnknownOptionError": UnknownOptionError}
    for line3, token, kind in CASES:
        script = f"SELECT 1;\n\n{line3}"
        with pytest.raises(kinds[kind]) as info:
            s.sql(script)
        span = info.value.span(script)
        col = line3.index(token) + 1
        assert (span.line, span.column, span.end_line, span.end_column) == (3, col, 3, col + len(token)), (line3, span)
    with pytest.raises(ParseError) as info:
        s.sql("SELECT 1;\n\nCREATE MODEL m OPTIONS (model_type = 'linear_reg' AS SELECT 1")
    assert (info.value.line, info.value.column) == (3, 51)  # as fields, not only in the message
    # DuckDB counts from the statement; a second statement on the same line is found in it
    script = "SELECT 1; SELECT species, bill_lenght_mm FROM penguins"
    with pytest.raises(EngineError) as info:
        s.sql(script)
    span = info.value.span(script)
    assert (span.line, span.column, span.end_column) == (1, script.index("bill_") + 1, script.index(" FROM") + 1)
    s.close()


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "MLSQL_HOME": str(tmp_path_factory.mktemp("errpos") / "ws")}
    started = [start_new_kernel(kernel_name=name, env=env) for name in ("mlsql", "python3")]
    mk, py = started[0][1], started[1][1]
    py.execute_interactive("%load_ext mlsql", timeout=60)
    mk.execute_interactive(SETUP, timeout=120)
    yield {"mlsql": mk, "python3": py}
    for km, kc in started:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def run(kc, code: str) -> list[tuple[str, dict]]:
    msgs = []
    kc.execute_interactive(code, output_hook=lambda m: msgs.append((m["msg_type"], m["content"])), timeout=180)
    return msgs


@pytest.mark.parametrize("kernel", ["mlsql", "python3"])
def test_the_kernel_publishes_the_position(kernels, kernel):
    kc = kernels[kernel]
    for line3, token, kind in CASES:
        # the error is on line 3 of the cell as the editor shows it
        cell = f"SELECT 1;\n\n{line3}" if kernel == "mlsql" else f"%%mlsql\nSELECT 1;\n{line3}"
        msgs = run(kc, cell)
        # the error as before: IPython prints a UsageError on stderr
        types = ["error" if t == "stream" and c["name"] == "stderr" and "UsageError" in c["text"] else t
                 for t, c in msgs]
        assert "display_data" in types and "error" in types, msgs
        shown = [c for t, c in msgs if t == "display_data" and MIME in c["data"]]
        assert len(shown) == 1 and list(shown[0]["data"]) == [MIME], msgs
        assert types.index("display_data") < types.index("error")  # the span first
        data = shown[0]["data"][MIME]
        col = line3.index(token) + 1
        assert data["kind"] == kind, data
        assert (data["line"], data["column"], data["end_line"], data["end_column"]) == (3, col, 3, col + len(token)), \
            (cell, data)
        error = msgs[types.index("error")][1]["text"]
        assert data["message"].split("\n")[0] in error
    msgs = run(kc, "SELECT 1 AS fine" if kernel == "mlsql" else "%%mlsql\nSELECT 1 AS fine")
    assert not any(MIME in c.get("data", {}) for _, c in msgs)

"""Errors carry their position: as fields on the exception, and, in a notebook, as an
application/vnd.mlsql.error+json display published before the error, with the line and
column of the cell as the editor shows it. Checked through real kernels."""

from __future__ import annotations

import os
import re

import pytest

import mlsql
from mlsql.errors import EngineError, ParseError, UnknownColumnError, UnknownModelError, UnknownOptionError

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


def shown(kc, cell: str) -> tuple[str, dict]:
    """What the user sees of a failing cell: the error text (IPython's UsageError on stderr) and
    the position published for the editor."""
    msgs = run(kc, cell)
    err = "".join(c["text"] for t, c in msgs if t == "stream" and c["name"] == "stderr")
    assert err.startswith("UsageError: "), msgs
    data = [c["data"][MIME] for t, c in msgs if t == "display_data" and MIME in c.get("data", {})]
    assert len(data) == 1, msgs
    return err[len("UsageError: "):].rstrip("\n"), data[0]


def line_numbers(text: str) -> set[int]:
    """Every line number a message mentions: 'Line 3, Col', '(line 3)', DuckDB's 'LINE 3:'."""
    return {int(n) for n in re.findall(r"\b(?:Line|line|LINE) (\d+)", text)}


@pytest.mark.parametrize("kernel", ["mlsql", "python3"])
def test_a_parse_error_names_one_line_the_cells(kernels, kernel):
    # line 3 of the cell as JupyterLab numbers it; in the Python kernel "%%mlsql" is line 1
    bad = "CREATE MODEL m OPTIONS (model_type = 'linear_reg' AS SELECT 1"
    cell = ("SELECT 1;\n\n" if kernel == "mlsql" else "%%mlsql\nSELECT 1;\n") + bad
    err, data = shown(kernels[kernel], cell)
    assert err == f"Expecting ). Line 3, Col: 51.\n  {bad}\n  {' ' * 50}^"
    assert line_numbers(err) == {3}
    assert (data["line"], data["column"], data["end_line"], data["end_column"]) == (3, 51, 3, 53)


def test_a_duckdb_error_in_a_later_statement_names_the_cells_line(kernels):
    err, data = shown(kernels["python3"], "%%mlsql\nSELECT 1;\nSELECT species, bill_lenght_mm FROM penguins")
    assert err.startswith('Statement 2 (line 3): Binder Error: Referenced column "bill_lenght_mm" not found'), err
    assert "\nLINE 3: SELECT species, bill_lenght_mm FROM penguins\n" + " " * 24 + "^" in err, err
    assert line_numbers(err) == {3}
    assert (data["line"], data["column"], data["end_column"]) == (3, 17, 31)


def _model_types() -> str:
    """model_type's allowed values as the message lists them (the options table's, in its order)."""
    from mlsql.language.options import OPTIONS

    return ", ".join(repr(c) for c in next(o for o in OPTIONS["CREATE MODEL"] if o.name == "model_type").choices)


_MODEL_TYPES = _model_types()


def test_an_invalid_option_value_has_its_position(kernels):
    cell = ("%%mlsql\nSELECT 1;\n"
            "CREATE MODEL m OPTIONS (model_type = 'logistic_regression', input_label_cols = ['species'])\n"
            "AS SELECT * FROM penguins")
    err, data = shown(kernels["python3"], cell)
    src = cell.split("\n")[2]
    col = src.index("'logistic_regression'") + 1
    assert err == (f"Statement 2 (line 3): Option model_type = 'logistic_regression' is not one of "
                   f"{_MODEL_TYPES}. Line 3, Col: {col}.\n"
                   f"  {src}\n  {' ' * (col - 1)}^\nDid you mean 'logistic_reg'?")
    assert (data["kind"], data["line"], data["column"], data["end_line"], data["end_column"]) == \
        ("OptionError", 3, col, 3, col + len("'logistic_regression'"))


def test_every_bad_option_of_a_statement_is_reported_with_its_position(kernels):
    cell = ("%%mlsql\nSELECT 1;\n"
            "CREATE MODEL m OPTIONS (model_type = 'logistic_regression', max_depht = 3,\n"
            "                        input_label_cols = ['species'], max_iterations = -1)\n"
            "AS SELECT * FROM penguins")
    err, data = shown(kernels["python3"], cell)
    lines = cell.split("\n")
    at = [(3, lines[2].index("'logistic_regression'") + 1), (3, lines[2].index("max_depht") + 1),
          (4, lines[3].index("-1") + 1)]
    assert err.split("\n")[0] == "Statement 2 (line 3): 3 bad options in CREATE MODEL OPTIONS"
    blocks = [b for b in err.split("\n") if "Line " in b]
    assert blocks == [
        f"Option model_type = 'logistic_regression' is not one of {_MODEL_TYPES}. Line 3, Col: {at[0][1]}.",
        f"Unknown option 'max_depht' in CREATE MODEL OPTIONS. Line 3, Col: {at[1][1]}.",
        f"Option max_iterations = -1 must be a whole number >= 1. Line 4, Col: {at[2][1]}.",
    ]
    assert f"  {lines[3]}\n  {' ' * (at[2][1] - 1)}^" in err
    assert "Did you mean 'logistic_reg'?" in err and "Did you mean 'max_tree_depth'?" in err
    assert (data["line"], data["column"]) == at[0]  # the first one where the editor marks one span
    assert [(e["kind"], e["line"], e["column"]) for e in data["errors"]] == \
        [("OptionError", *at[0]), ("UnknownOptionError", *at[1]), ("OptionError", *at[2])]


def test_a_missing_predict_column_is_placed_and_suggests_only_free_columns(penguin_models):
    s = penguin_models
    inputs = "species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, sex"
    script = ("SELECT 1;\nSELECT *\n"
              "FROM ML.PREDICT(MODEL mass_model, (SELECT * EXCLUDE (bill_depth_mm) FROM penguins))")
    with pytest.raises(UnknownColumnError) as info:
        s.sql(script)
    src = script.split("\n")[2]
    col = src.index("bill_depth_mm") + 1
    ref = re.search(r"mass_model@\d+", str(info.value)).group(0)
    # bill_length_mm is a column the query has, and the model reads it as itself: no "did you mean" it
    assert str(info.value) == (
        f"Statement 2 (line 2): ML.PREDICT input has no column 'bill_depth_mm', which model {ref} needs. "
        f"Line 3, Col: {col}.\n  {src}\n  {' ' * (col - 1)}^\n"
        f"Model {ref} reads 6 input columns: {inputs}.")
    sp = info.value.span(script)
    assert (sp.line, sp.column, sp.end_line, sp.end_column) == (3, col, 3, col + len("bill_depth_mm"))
    # a free column close to the missing one is offered; the same rule in every scoring function
    for func in ("PREDICT", "EVALUATE", "EXPLAIN_PREDICT"):
        with pytest.raises(UnknownColumnError) as info:
            s.sql(f"SELECT * FROM ML.{func}(MODEL mass_model, (SELECT * EXCLUDE (bill_depth_mm), "
                  f"bill_depth_mm AS bill_depth FROM penguins))")
        assert info.value.hint == f"Did you mean 'bill_depth'? Model {ref} reads 6 input columns: {inputs}.", func
    # all the missing ones, and the whole query when it does not name them
    script = "SELECT *\nFROM ML.PREDICT(MODEL mass_model,\n  (SELECT species, island, sex FROM penguins))"
    with pytest.raises(UnknownColumnError) as info:
        s.sql(script)
    assert str(info.value).split(". Line")[0] == (
        f"ML.PREDICT input has no columns 'bill_length_mm', 'bill_depth_mm', 'flipper_length_mm', "
        f"which model {ref} needs")
    sp = info.value.span(script)
    assert (sp.line, sp.column, sp.end_line, sp.end_column) == (3, 3, 3, len(script.split("\n")[2]))

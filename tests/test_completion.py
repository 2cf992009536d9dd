"""Tab completion and Shift-Tab inspection: mlsql.notebook.completion in process, then through real
kernels (the MLSQL kernel and ipykernel with %load_ext mlsql) with complete_request and
inspect_request, as JupyterLab sends them."""

from __future__ import annotations

import os

import pytest

from mlsql.notebook.completion import complete, inspect


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with penguins, a boosted-tree model (two versions, an alias) and a device."""
    import mlsql
    import mlsql.datasets

    root = tmp_path_factory.mktemp("completion") / "ws"
    s = mlsql.connect(root)
    mlsql.datasets.load("penguins", session=s)
    for _ in range(2):
        s.sql("""CREATE OR REPLACE MODEL species_model
                 OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'], max_iterations = 5)
                 AS SELECT species, island, bill_length_mm, flipper_length_mm FROM penguins""")
    s.set_alias("species_model", "champion", 1)
    s.sql("CREATE DEVICE edge_cam OPTIONS (url = 'http://127.0.0.1:9')")
    s.sql("CREATE DEVICE GROUP shop_floor OPTIONS (devices = ['edge_cam'])")
    yield s
    s.close()


def matches(session, code: str, cursor: int | None = None) -> list[str]:
    r = complete(code, len(code) if cursor is None else cursor, session)
    assert r["cursor_end"] == (len(code) if cursor is None else cursor)
    return r["matches"]


def test_tables_columns_models_functions(ws):
    assert matches(ws, "SELECT * FROM peng") == ["penguins"]
    assert "bill_length_mm" in matches(ws, "SELECT p.bill FROM penguins p", len("SELECT p.bill"))
    code = "SELECT  FROM penguins WHERE island = 'Dream'"
    got = matches(ws, code, len("SELECT "))
    assert got[:3] == ["species", "island", "bill_length_mm"]
    assert matches(ws, "SELECT penguins.isl FROM penguins", len("SELECT penguins.isl")) == ["island"]
    assert matches(ws, "SELECT * FROM ML.PREDICT(MODEL spec") == ["species_model"]
    assert matches(ws, "SELECT * FROM ML.PREDICT(MODEL species_model@") == ["2", "1", "champion"]
    assert matches(ws, "SELECT * FROM ML.EXPL") == ["EXPLAIN_FORECAST", "EXPLAIN_PREDICT"]
    assert "ML.PREDICT" in matches(ws, "SELECT * FROM ML")
    assert "penguins" in matches(ws, "SELECT * FROM workspace.")
    assert "avg" in matches(ws, "SELECT av")
    assert matches(ws, "sel")[0] == "select"  # keywords in the case typed


def test_options_by_model_type(ws):
    tree = matches(ws, "CREATE MODEL m OPTIONS (model_type = 'boosted_tree_classifier', ")
    assert {"max_tree_depth", "subsample", "input_label_cols", "auto_class_weights"} <= set(tree)
    assert "hidden_units" not in tree
    linear = matches(ws, "CREATE MODEL m OPTIONS (model_type = 'linear_reg', ")
    assert "max_tree_depth" not in linear and "l1_reg" in linear
    assert matches(ws, "CREATE MODEL m OPTIONS (model_type = 'boosted_tree_classifier', max_t") == ["max_tree_depth"]
    assert matches(ws, "CREATE MODEL m OPTIONS (model_type = 'dnn_") == ["dnn_classifier", "dnn_regressor"]
    assert "quantize" in matches(ws, "DEPLOY MODEL species_model TO DEVICE edge_cam OPTIONS (q")


def test_devices_and_groups(ws):
    assert matches(ws, "DEPLOY MODEL species_model TO DEVICE edge") == ["edge_cam"]
    assert matches(ws, "DEPLOY MODEL species_model TO GROUP sh") == ["shop_floor"]
    assert matches(ws, "SELECT * FROM ML.DEVICE_METRICS('ed") == ["edge_cam"]


def test_broken_sql_still_completes_and_never_raises(ws):
    assert "penguins" in matches(ws, "SELECT ( FROM WHERE ;;; SELECT * FROM pen")
    for code in ["", "'", "/* open", "SELECT 'unclosed", ";", "@", "x.", "ML.", "OPTIONS(", "\x00"]:
        for i in range(len(code) + 1):
            complete(code, i, ws)
            inspect(code, i, ws)
    assert complete("SELECT 1", 99, ws)["cursor_end"] == 8
    assert complete("SELECT * FROM pen", None, None)["matches"] == []  # no session: keywords only


def test_inspect(ws):
    r = inspect("SELECT * FROM penguins", len("SELECT * FROM pen"), ws)
    assert r["found"] and "bill_length_mm: DOUBLE" in r["data"]["text/plain"]
    assert "| island | `VARCHAR` |" in r["data"]["text/markdown"]
    r = inspect("SELECT * FROM ML.PREDICT(MODEL species_model, TABLE penguins)", len("SELECT * FROM ML.PREDICT(MODEL spe"), ws)
    assert r["found"] and "species_model@2" in r["data"]["text/plain"] and "roc_auc" in r["data"]["text/plain"]
    r = inspect("SELECT * FROM ML.PREDICT(MODEL species_model@1, TABLE penguins)", len("SELECT * FROM ML.PREDICT(MODEL spe"), ws)
    assert "species_model@1" in r["data"]["text/plain"]
    r = inspect("SELECT * FROM ML.EVALUATE(MODEL m)", len("SELECT * FROM ML.EVA"), ws)
    assert r["found"] and r["data"]["text/plain"].startswith("ML.EVALUATE(MODEL m")
    r = inspect("SELECT p.island FROM penguins p", len("SELECT p.isl"), ws)
    assert r["data"]["text/plain"].startswith("island: VARCHAR")
    assert inspect("SELECT nothing_here", 10, ws)["found"] is False


# -- through real kernels ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernels(ws):
    from jupyter_client.manager import start_new_kernel

    ws.engine.release()  # the kernels attach the catalog themselves
    env = {**os.environ, "MLSQL_HOME": str(ws.workspace.root)}
    started = [start_new_kernel(kernel_name=name, env=env) for name in ("mlsql", "python3")]
    py = started[1][1]
    py.execute_interactive("%load_ext mlsql", timeout=60)
    yield {"mlsql": started[0][1], "python3": py}
    for km, kc in started:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


CASES = [  # (cell text with | at the cursor, a match expected)
    ("SELECT * FROM peng|", "penguins"),
    ("SELECT p.flip| FROM penguins p", "flipper_length_mm"),
    ("SELECT | FROM penguins", "bill_length_mm"),
    ("SELECT *\nFROM ML.PREDICT(MODEL spe|", "species_model"),
    ("SELECT * FROM ML.ROC|", "ROC_CURVE"),
    ("CREATE MODEL m OPTIONS (model_type = 'boosted_tree_classifier', max_tr|", "max_tree_depth"),
    ("DEPLOY MODEL species_model TO DEVICE edg|", "edge_cam"),
]


def complete_in(kc, cell: str) -> dict:
    code, cursor = cell.replace("|", ""), cell.index("|")
    reply = kc.complete(code, cursor, reply=True, timeout=120)["content"]
    assert reply["status"] == "ok"
    return reply


@pytest.mark.parametrize("kernel", ["mlsql", "python3"])
def test_complete_request(kernels, kernel):
    kc = kernels[kernel]
    for cell, expected in CASES:
        cell = cell if kernel == "mlsql" else "%%mlsql\n" + cell
        reply = complete_in(kc, cell)
        assert expected in reply["matches"], (cell, reply["matches"])
        assert "print" not in reply["matches"]  # no Python completions inside SQL
        start = reply["cursor_start"]
        code = cell.replace("|", "")
        word = code[start:cell.index("|")]
        assert expected.lower().startswith(word.lower()), (cell, start, word)
    if kernel == "mlsql":
        assert complete_in(kc, "%%mlsql\nSELECT * FROM peng|")["matches"] == ["penguins"]
        assert "island" in complete_in(kc, "%python t = 1\nSELECT isl| FROM penguins")["matches"]
        assert "print" in complete_in(kc, "%python pri|\nSELECT 1")["matches"]  # a Python line is Python
    if kernel == "python3":
        assert "penguins" in complete_in(kc, "x = 1\n%mlsql SELECT * FROM pen|")["matches"]
        assert "print" in complete_in(kc, "pri|")["matches"]  # Python cells complete as before


@pytest.mark.parametrize("kernel", ["mlsql", "python3"])
def test_inspect_request(kernels, kernel):
    kc = kernels[kernel]
    head = "" if kernel == "mlsql" else "%%mlsql\n"
    code = head + "SELECT * FROM penguins"
    reply = kc.inspect(code, len(code) - 3, reply=True, timeout=120)["content"]
    assert reply["found"], reply
    assert "flipper_length_mm: BIGINT" in reply["data"]["text/plain"]
    code = head + "SELECT * FROM ML.EVALUATE(MODEL species_model)"
    reply = kc.inspect(code, len(code) - 5, reply=True, timeout=120)["content"]
    assert reply["found"] and "roc_auc" in reply["data"]["text/plain"] and "species_model@2" in reply["data"]["text/plain"]

"""One table for every statement's OPTIONS: per statement kind, an unknown option (did-you-mean and
the statement named), a value of the wrong type, one out of range (option, value and what is
allowed named), and a valid one that takes effect. Real workspace, real agent, real files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bridge_procs import start_agent

from mlsql.errors import MLSQLError, OptionError, UnknownOptionError
from mlsql.language.options import OPTIONS, markdown, options_for, read_literal, validate

TOKEN = "options-test-token"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "LANGUAGE.md"


@pytest.fixture(scope="module")
def s(tmp_path_factory):
    import mlsql
    import mlsql.datasets

    ws = tmp_path_factory.mktemp("options") / "ws"
    s = mlsql.connect(ws)
    mlsql.datasets.load("penguins", session=s)
    s.sql("""CREATE MODEL species OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'],
             max_iterations = 5) AS SELECT species, island, bill_length_mm, flipper_length_mm FROM penguins""")
    yield s
    s.close()


def _raises(s, sql: str, cls, *parts: str) -> str:
    with pytest.raises(cls) as info:
        s.sql(sql)
    msg = str(info.value)
    for p in parts:
        assert p in msg, (p, msg)
    return msg


# -- CREATE MODEL ----------------------------------------------------------------------------
MODEL = "CREATE OR REPLACE MODEL m OPTIONS (model_type = 'boosted_tree_regressor', input_label_cols = ['body_mass_g'], {}) " \
        "AS SELECT island, flipper_length_mm, body_mass_g FROM penguins WHERE body_mass_g IS NOT NULL"


def test_create_model_options(s):
    _raises(s, MODEL.format("max_tree_dept = 3"), UnknownOptionError,
            "max_tree_dept", "CREATE MODEL OPTIONS", "Did you mean 'max_tree_depth'?")
    _raises(s, MODEL.format("max_iterations = 'ten'"), OptionError,
            "max_iterations = 'ten'", "must be a whole number >= 1")
    _raises(s, MODEL.format("data_split_eval_fraction = 1.5"), OptionError,
            "data_split_eval_fraction = 1.5", "must be a number in (0, 1)")
    _raises(s, MODEL.format("tree_method = 'histo'"), OptionError,
            "tree_method = 'histo'", "is not one of 'hist'", "Did you mean 'hist'?")
    _raises(s, MODEL.format("hidden_units = [8]"), OptionError,
            "Option hidden_units applies to dnn_classifier, dnn_regressor, not boosted_tree_regressor")
    s.sql(MODEL.format("max_iterations = 3, early_stop = FALSE, data_split_method = 'no_split'"))
    assert s.sql("SELECT count(*) FROM ML.TRAINING_INFO(MODEL m)").scalar() == 3
    # nothing was trained by the refused statements: one version only
    assert [v.version for v in s.registry.versions("m")] == [1]


# -- EXPORT MODEL ----------------------------------------------------------------------------
def test_export_options(s, tmp_path):
    uri = tmp_path / "species.onnx"
    _raises(s, f"EXPORT MODEL species OPTIONS (uri = '{uri}', quantise = 'int8')", UnknownOptionError,
            "quantise", "EXPORT MODEL OPTIONS", "Did you mean 'quantize'?")
    _raises(s, f"EXPORT MODEL species OPTIONS (uri = '{uri}', package = 'yes')", OptionError,
            "package = 'yes'", "must be TRUE or FALSE")
    _raises(s, f"EXPORT MODEL species OPTIONS (uri = '{uri}', opset = 30)", OptionError,
            "opset = 30", "must be a whole number in [13, 21]")
    assert not uri.exists()
    s.sql(f"EXPORT MODEL species OPTIONS (uri = '{uri}', opset = 15)")
    import onnx

    opsets = {o.domain: o.version for o in onnx.load(str(uri)).opset_import}
    assert opsets[""] == 15


# -- DEPLOY MODEL ----------------------------------------------------------------------------


def test_deploy_options(s, tmp_path):
    from device_bridge.keys import load_or_create_keypair

    load_or_create_keypair(s.workspace.keys_dir)
    agent, url = start_agent(tmp_path, token=TOKEN, trust=s.workspace.keys_dir / "signing_key.pub", name="opt",
                             store=tmp_path / "store")
    try:
        s.sql(f"CREATE OR REPLACE DEVICE 'opt' OPTIONS (url = '{url}', token = '{TOKEN}')")
        _raises(s, "DEPLOY MODEL species TO DEVICE 'opt' OPTIONS (max_eror_rate = 0.1)", UnknownOptionError,
                "max_eror_rate", "DEPLOY MODEL OPTIONS", "Did you mean 'max_error_rate'?")
        # options of a group rollout are checked as well, even before any device is asked
        _raises(s, "DEPLOY MODEL species TO DEVICE 'opt' OPTIONS (min_requests = 'many')", OptionError,
                "min_requests = 'many'", "must be a whole number >= 0")
        _raises(s, "DEPLOY MODEL species TO DEVICE 'opt' OPTIONS (max_error_rate = 2)", OptionError,
                "max_error_rate = 2", "must be a number in [0, 1]")
        _raises(s, "DEPLOY MODEL species TO DEVICE 'opt' OPTIONS (rollout_percent = 0)", OptionError,
                "rollout_percent = 0", "in (0, 100]")
        _raises(s, "DEPLOY MODEL species TO DEVICE 'opt' OPTIONS (providers = ['cdua'])", OptionError,
                "'cdua' is not an execution provider", "Did you mean 'cuda'?")
        assert s.sql("SHOW DEVICES").to_arrow().to_pylist()[0]["models"] == []  # nothing was sent
        r = s.sql("DEPLOY MODEL species TO DEVICE 'opt' OPTIONS (providers = 'cpu', strict_providers = TRUE)")
        row = r.to_arrow().to_pylist()[0]
        assert row["providers"] == ["cpu"] and row["active"] == 1
        # a version 2 that knows only the island: only_if_better keeps version 1 on the device
        s.sql("""CREATE OR REPLACE MODEL species OPTIONS (model_type = 'boosted_tree_classifier',
                 input_label_cols = ['species'], max_iterations = 1) AS SELECT species, island FROM penguins""")
        again = s.sql("DEPLOY MODEL species@2 TO DEVICE 'opt' OPTIONS (only_if_better = 'roc_auc')")
        assert again.to_arrow().to_pylist()[0]["deployed"] is False
        assert "Not deployed to opt: species@2 has roc_auc" in again.message
    finally:
        agent.kill()
        s.sql("DROP DEVICE IF EXISTS 'opt'")


# -- CREATE DEVICE, CREATE DEVICE GROUP ------------------------------------------------------
def test_device_options(s):
    _raises(s, "CREATE DEVICE 'x' OPTIONS (url = 'http://127.0.0.1:9', tiemout_s = 2)", UnknownOptionError,
            "tiemout_s", "CREATE DEVICE OPTIONS", "Did you mean 'timeout_s'?")
    _raises(s, "CREATE DEVICE 'x' OPTIONS (url = 'http://127.0.0.1:9', verify_tls = 3)", OptionError,
            "verify_tls = 3", "must be TRUE or FALSE")
    _raises(s, "CREATE DEVICE 'x' OPTIONS (url = 'http://127.0.0.1:9', timeout_s = 0)", OptionError,
            "timeout_s = 0", "must be a number > 0")
    _raises(s, "CREATE DEVICE 'x' OPTIONS (url = '127.0.0.1:9')", OptionError,
            "url = '127.0.0.1:9'", "http:// or https://")
    _raises(s, "CREATE DEVICE 'x' OPTIONS (token = 't')", OptionError, "CREATE DEVICE needs OPTIONS (url")
    assert "x" not in [d.name for d in s.devices.devices()]
    s.sql("CREATE DEVICE 'x' OPTIONS (url = 'http://127.0.0.1:9', timeout_s = 2, verify_tls = FALSE)")
    try:
        dev = s.devices.get("x")
        assert dev.timeout_s == 2.0 and dev.verify_tls is False
    finally:
        s.sql("DROP DEVICE 'x'")


def test_device_group_options(s):
    _raises(s, "CREATE DEVICE GROUP 'g' OPTIONS (hubb = 'http://127.0.0.1:9')", UnknownOptionError,
            "hubb", "CREATE DEVICE GROUP OPTIONS", "Did you mean 'hub'?")
    _raises(s, "CREATE DEVICE GROUP 'g' OPTIONS (hub = 'http://127.0.0.1:9', devices = [1, 2])", OptionError,
            "devices = [1, 2]", "must be a list of strings")
    _raises(s, "CREATE DEVICE GROUP 'g' OPTIONS (hub = 'ftp://127.0.0.1:9')", OptionError,
            "hub = 'ftp://127.0.0.1:9'", "http:// or https://")
    r = s.sql("CREATE DEVICE GROUP 'g' OPTIONS (hub = 'http://127.0.0.1:9', devices = 'a1')")
    try:
        assert r.to_arrow().to_pylist() == [{"group": "g", "devices": ["a1"], "hub": "http://127.0.0.1:9"}]
    finally:
        s.sql("DROP DEVICE GROUP 'g'")


# -- CREATE JOB ------------------------------------------------------------------------------
def test_job_options(s):
    _raises(s, "CREATE JOB j OPTIONS (every = '1h', retires = 2) AS (SELECT 1)", UnknownOptionError,
            "retires", "CREATE JOB OPTIONS", "Did you mean 'retries'?")
    _raises(s, "CREATE JOB j OPTIONS (every = '1h', retries = 'two') AS (SELECT 1)", OptionError,
            "retries = 'two'", "must be a whole number >= 0")
    _raises(s, "CREATE JOB j OPTIONS (every = '1h', max_concurrent = 0) AS (SELECT 1)", OptionError,
            "max_concurrent = 0", "must be a whole number >= 1")
    s.sql("CREATE JOB j OPTIONS (every = '1h', retries = 2, max_concurrent = 3) AS (SELECT 1)")
    try:
        from mlsql.jobs import JobStore

        spec = JobStore(s.workspace).get("j")
        assert spec.options["retries"] == 2 and spec.options["max_concurrent"] == 3
    finally:
        s.sql("DROP JOB j")


# -- ML functions' STRUCT settings -----------------------------------------------------------
def test_ml_function_settings(s):
    q = "SELECT * FROM ML.EXPLAIN_PREDICT(MODEL species@1, TABLE penguins, STRUCT({}))"
    _raises(s, q.format("2 AS top_k_feature"), UnknownOptionError,
            "top_k_feature", "ML.EXPLAIN_PREDICT's STRUCT(...)", "Did you mean 'top_k_features'?")
    _raises(s, q.format("'two' AS top_k_features"), OptionError,
            "top_k_features = 'two'", "must be a whole number >= 1")
    _raises(s, q.format("0 AS top_k_features"), OptionError, "top_k_features = 0", ">= 1")
    _raises(s, "SELECT * FROM ML.PREDICT(MODEL species@1, TABLE penguins, STRUCT(1.5 AS threshold))", OptionError,
            "threshold = 1.5", "must be a number in [0, 1]")
    _raises(s, "SELECT * FROM ML.FEATURE_IMPORTANCE(MODEL species@1, STRUCT(1 AS x))", MLSQLError,
            "ML.FEATURE_IMPORTANCE takes no settings")
    rows = s.sql(q.format("2 AS top_k_features")).to_arrow().column("top_feature_attributions").to_pylist()
    assert {len(r) for r in rows} == {2}


# -- the table itself ------------------------------------------------------------------------
def test_options_for_lists_names_types_and_docs():
    names = [n for n, _, _ in options_for("CREATE MODEL")]
    assert names[0] == "model_type" and "max_tree_depth" in names and "hidden_units" in names
    linear = {n for n, _, _ in options_for("CREATE MODEL", model_type="linear_reg")}
    assert "max_tree_depth" not in linear and "hidden_units" not in linear and "l1_reg" in linear
    assert ("opset", "int", "ONNX opset of the file (a graph that needs a newer one is refused)") in options_for("export")
    assert {n for n, _, _ in options_for("DEPLOY MODEL")} >= {"providers", "max_error_rate", "min_requests"}
    assert [n for n, _, _ in options_for("ML.EXPLAIN_PREDICT")] == ["top_k_features", "threshold", "trial_id"]
    assert options_for("ML.TRAINING_INFO") == []
    for kind, opts in OPTIONS.items():
        for o in opts:
            assert o.doc and o.type in ("int", "float", "bool", "str", "list", "enum", "struct", "duration"), (kind, o)


def test_validate_fills_defaults_and_converts():
    got = validate("DEPLOY MODEL", {"Providers": "cuda", "max_p95_ms": 20}, defaults=True)
    assert got["providers"] == ["cuda"] and got["max_p95_ms"] == 20.0 and isinstance(got["max_p95_ms"], float)
    assert got["quantize"] == "none" and got["wave_timeout_s"] == 60.0 and got["strict_providers"] is False
    assert validate("EXPORT MODEL", {"quantize": "INT8"}) == {"quantize": "int8"}


def test_read_literal():
    import sqlglot

    def lit(sql):
        return read_literal(sqlglot.parse_one(f"SELECT {sql}", read="duckdb").expressions[0])

    assert lit("'a'") == "a" and lit("12") == 12 and lit("1.5") == 1.5 and lit("-3") == -3
    assert lit("TRUE") is True and lit("NULL") is None and lit("[1, 2]") == [1, 2]
    assert lit("STRUCT(1 AS a, 'x' AS b)") == {"a": 1, "b": "x"} and lit("CAST(2 AS INT)") == 2
    assert lit("x + 1") == "x + 1"
    with pytest.raises(OptionError, match="argument 2 must be a literal, got x \\+ 1"):
        read_literal(sqlglot.parse_one("SELECT x + 1").expressions[0], where="argument 2")


def test_language_docs_list_every_option():
    """docs/LANGUAGE.md's reference is the table's own text: an option added to the table and not
    to the docs fails here (regenerate with `python -m mlsql.language.options`)."""
    text = DOCS.read_text()
    m = re.search(r"<!-- options:begin.*?-->\n(.*?)<!-- options:end -->", text, re.S)
    assert m, "docs/LANGUAGE.md has no generated options reference"
    assert m.group(1) == markdown(), "docs/LANGUAGE.md's options reference is out of date: python -m mlsql.language.options"
    for kind, opts in OPTIONS.items():
        for o in opts:
            assert f"| `{o.name}` |" in m.group(1), (kind, o.name)

"""The MLSQL dialect: every ML statement round-trips; plain DuckDB SQL is left exactly as written."""

from __future__ import annotations

import pytest
from sqlglot import exp

from mlsql.errors import ParseError, UnknownVariableError
from mlsql.language.dialect import mx, parse_one, parse_script, substitute_variables

ROUND_TRIP = [
    "CREATE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT x, y FROM t",
    "CREATE OR REPLACE MODEL m OPTIONS (model_type = 'logistic_reg') AS SELECT * FROM t",
    "CREATE MODEL IF NOT EXISTS m OPTIONS (model_type = 'linear_reg') AS SELECT * FROM t",
    "CREATE MODEL m TRANSFORM (ML.STANDARD_SCALER(x) OVER () AS xs, LN(d) AS ld, y) "
    "OPTIONS (model_type = 'linear_reg', input_label_cols = ['y'], l2_reg = 0.5, early_stop = FALSE) "
    "AS WITH a AS (SELECT * FROM t) SELECT * FROM a",
    "SELECT * FROM ML.PREDICT(MODEL m, TABLE t)",
    "SELECT * FROM ML.PREDICT(MODEL m@3, (SELECT x FROM t WHERE x > 1))",
    "SELECT * FROM ML.PREDICT(MODEL m@champion, TABLE t, STRUCT(0.7 AS threshold))",
    "SELECT * FROM ML.EVALUATE(MODEL m)",
    "SELECT * FROM ML.EVALUATE(MODEL m, TABLE t)",
    "SELECT * FROM ML.EXPLAIN_PREDICT(MODEL m, (SELECT 1 AS x), STRUCT(3 AS top_k_features))",
    "SELECT * FROM ML.FEATURE_IMPORTANCE(MODEL m)",
    "SELECT * FROM ML.TRAINING_INFO(MODEL m)",
    "SELECT * FROM ML.CONFUSION_MATRIX(MODEL m, TABLE t)",
    "SELECT * FROM ML.ROC_CURVE(MODEL m, TABLE t)",
    "SELECT * FROM ML.DEVICE_METRICS('pixel-7')",
    "SELECT carrier, AVG(p.predicted_late_probs[2].prob) FROM ML.PREDICT(MODEL m, TABLE f) AS p GROUP BY 1",
    "WITH a AS (SELECT 1 AS x) SELECT * FROM ML.PREDICT(MODEL m, TABLE a) JOIN b USING (x)",
    "SHOW MODELS",
    "DESCRIBE MODEL m@2",
    "DROP MODEL m",
    "DROP MODEL IF EXISTS m",
    "EXPLAIN SELECT * FROM ML.PREDICT(MODEL m, TABLE t)",
    "EXPLAIN MLSQL SELECT 1",
    "SET mlsql_lock_timeout = 5",
    "CREATE OR REPLACE JOB refresh OPTIONS (every = '1h') AS (CREATE OR REPLACE TABLE t AS SELECT 1; SELECT * FROM t)",
    "DESCRIBE JOB nightly",
    "RUN JOB nightly",
    "ALTER JOB nightly PAUSE",
    "SELECT * FROM ML.JOB_RUNS('nightly')",
    "EXPORT MODEL m@2 OPTIONS (uri = 'out/m.onnx', format = 'onnx', quantize = 'int8')",
    "DEPLOY MODEL m TO DEVICE 'pixel-7' OPTIONS (providers = ['nnapi', 'cpu'], strict_providers = TRUE)",
    "DEPLOY MODEL m@3 TO GROUP 'field' OPTIONS (rollout_percent = 10, max_error_rate = 0.01)",
    "ROLLBACK MODEL m ON DEVICE 'pixel-7'",
    "CREATE DEVICE 'pixel-7' OPTIONS (url = 'http://127.0.0.1:7070', token = 'secret')",
    "CREATE DEVICE GROUP 'field' OPTIONS (devices = ['a', 'b'])",
    "SHOW DEVICES",
    "DROP DEVICE 'pixel-7'",
    "DROP DEVICE IF EXISTS 'pixel-7'",
    "DROP DEVICE GROUP 'field'",
    "CREATE JOB nightly OPTIONS (schedule = '0 3 * * *') AS NOTEBOOK 'notebooks/retrain.ipynb'",
    "SHOW JOBS",
    "DROP JOB nightly",
    "CREATE OR REPLACE ALERT low_acc OPTIONS (every = '5 minutes', notify = ['json://127.0.0.1:8123/hook']) "
    "AS (SELECT * FROM scores WHERE accuracy < 0.8)",
    "CREATE ALERT IF NOT EXISTS skew OPTIONS (every = '1h', notify = ['mailto://a@b.c']) AS (SELECT 1 WHERE FALSE)",
    "SHOW ALERTS",
    "DESCRIBE ALERT low_acc",
    "CHECK ALERT low_acc",
    "DROP ALERT IF EXISTS low_acc",
    "SELECT * FROM ML.ALERT_HISTORY('low_acc')",
    "SELECT * FROM ML.ALERT_HISTORY()",
]


@pytest.mark.parametrize("sql", ROUND_TRIP)
def test_round_trip(sql):
    tree = parse_one(sql)
    out = tree.sql(dialect="mlsql")
    assert out == sql
    # and the regenerated text parses to the same tree
    assert parse_one(out) == tree


PLAIN = [
    "SELECT [x * 2 FOR x IN [1, 2, 3]] AS l",
    "FROM t SELECT a, b",
    "SELECT * EXCLUDE (a) FROM t",
    "PIVOT cities ON year USING sum(population)",
    "CREATE TABLE t AS SELECT * FROM read_csv('x.csv', nullstr = 'NA')",
    "SELECT list_transform([1, 2], lambda y: y + 1)",
    "COPY t TO 'out.parquet' (FORMAT parquet)",
    "EXPLAIN ANALYZE SELECT 1",
    "SET VARIABLE x = 1",
    "INSTALL httpfs",
    "SUMMARIZE t",
    "SELECT predict FROM t",  # a column named like an ML function is just a column
    "SELECT evaluate(1)",  # and so is a plain function call
    "CREATE TABLE alert AS (SELECT 1 AS x)",  # a table named like a statement's word is just a table
    "SELECT alert, job FROM alerts",
]


@pytest.mark.parametrize("sql", PLAIN)
def test_plain_duckdb_passes_through_verbatim(sql):
    (st,) = parse_script(sql + ";")
    assert not st.is_ml
    assert st.sql == sql


def test_script_split_keeps_text_and_lines():
    text = "SELECT 1;\n-- a comment; with a semicolon\nSELECT ';' AS s;\n\nSHOW MODELS"
    stmts = parse_script(text)
    assert [s.sql for s in stmts] == ["SELECT 1", "SELECT ';' AS s", "SHOW MODELS"]
    assert [s.line for s in stmts] == [1, 3, 5]
    assert [s.is_ml for s in stmts] == [False, False, True]


def test_nodes_expose_python_values():
    cm = parse_one("CREATE OR REPLACE MODEL Late TRANSFORM (a, b * 2 AS b2) OPTIONS (model_type = 'boosted_tree_classifier', "
                   "input_label_cols = ['late'], max_iterations = 50, learn_rate = 0.1, early_stop = FALSE, "
                   "class_weights = [STRUCT('a', 0.5), STRUCT('b', 2)]) AS SELECT * FROM t")
    assert isinstance(cm, mx.CreateModel)
    assert cm.model.name == "late" and cm.args["replace"]
    assert cm.options() == {"model_type": "boosted_tree_classifier", "input_label_cols": ["late"],
                            "max_iterations": 50, "learn_rate": 0.1, "early_stop": False,
                            "class_weights": [["a", 0.5], ["b", 2]]}
    assert [t.alias_or_name for t in cm.transform] == ["a", "b2"]
    f = next(parse_one("SELECT * FROM ML.PREDICT(MODEL m@4, TABLE t, STRUCT(0.3 AS threshold))").find_all(mx.MLFunction))
    assert (f.func, f.model.name, f.model.version, f.settings()) == ("PREDICT", "m", 4, {"threshold": 0.3})
    d = parse_one("DEPLOY MODEL m VERSION 2 TO DEVICE 'd1' OPTIONS (providers = ['cuda', 'cpu'])")
    assert (d.model.version, d.target_kind, d.target, d.options()) == (2, "DEVICE", "d1", {"providers": ["cuda", "cpu"]})
    s = parse_one("SET mlsql_engine = 'duckdb'")
    assert (s.name, s.value) == ("mlsql_engine", "duckdb")
    # every other SET, RESET and a plain EXPLAIN are DuckDB's, passed through as written
    for text in ("SET threads = 2", "SET VARIABLE x = 1", "RESET threads", "EXPLAIN SELECT 1", "SET engine = 'spark'"):
        (st,) = parse_script(text)
        assert not st.is_ml and st.sql == text, text


@pytest.mark.parametrize("sql, where, fragment", [
    ("SELECT 1;\nCREATE MODEL m OPTIONS (model_type = 'linear_reg') AS", (2, None), "training query"),
    ("SELECT * FROM ML.PREDICT(MODEL, TABLE t)", (1, 31), "model name"),
    ("SELECT * FROM ML.PREDICT(MODEL m TABLE t)", (1, 34), "Expected ',' or ')'"),
    ("SELECT * FROM ML.PREDICT(m, TABLE t)", (1, None), "MODEL <name>"),
    ("CREATE MODEL m OPTIONS (model_type 'x') AS SELECT 1", (1, None), "Expected '='"),
    ("DEPLOY MODEL m INTO DEVICE 'd'", (1, None), "TO DEVICE"),
    ("SELECT * FROM ML.PREDICT(MODEL m@1.5, TABLE t)", (1, None), "whole number"),
])
def test_parse_errors_point_at_the_problem(sql, where, fragment):
    with pytest.raises(ParseError) as info:
        parse_script(sql)
    e = info.value
    assert fragment in str(e)
    assert e.line == where[0]
    if where[1] is not None:
        assert e.col == where[1]
    assert "^" in str(e)


def test_variable_substitution():
    # never inside string literals, quoted names, dollar quotes or comments
    assert substitute_variables("SELECT ${n} + 1, '${name}.onnx', ${name}", {"n": 41, "name": "m"}) == \
        "SELECT 41 + 1, '${name}.onnx', 'm'"
    text = "SELECT \"${n}\", $$ ${n} $$, $t$ ${n} $t$, E'a\\' ${n}' -- ${n}\n/* ${n} */, ${n}"
    assert substitute_variables(text, {"n": 1}) == text[: -len("${n}")] + "1"
    assert substitute_variables("SELECT ${flag}, ${xs}", {"flag": True, "xs": [1, 2]}) == "SELECT TRUE, [1, 2]"
    assert substitute_variables("SELECT ${s}", {"s": "it's"}) == "SELECT 'it''s'"
    with pytest.raises(UnknownVariableError) as info:
        substitute_variables("SELECT 1,\n  ${threshhold}", {"threshold": 1})
    assert "line 2, column 3" in str(info.value) and "Did you mean 'threshold'?" in str(info.value)


def test_a_table_named_like_a_statement_word_is_read_as_duckdb_sql():
    """Only CREATE [OR REPLACE] JOB | ALERT takes its AS ( ... ) as a body of text; a table named
    alert or job keeps sqlglot's own tree of its query."""
    for sql in ("CREATE TABLE alert AS (SELECT 1 AS x)", "CREATE OR REPLACE TABLE job AS (SELECT 1 AS x)"):
        (st,) = parse_script(sql)
        assert not st.is_ml and st.expression is not None and st.expression.find(exp.Select) is not None, sql

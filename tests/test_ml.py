"""Models on real data sets (scikit-learn's bundled sets, penguins): quality, encoding, splits, explanations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from sklearn import datasets as skd

from mlsql.errors import ModelError, OptionError, TrainingError
from mlsql.ml import TrainedModel, resolve_options, train


def frame(bunch, label="target"):
    df = bunch.frame.copy() if bunch.frame is not None else None
    df.columns = [c.replace(" ", "_").replace("(", "").replace(")", "") for c in df.columns]
    return df.rename(columns={"target": label})


@pytest.fixture(scope="module")
def sk(tmp_path_factory):
    import mlsql

    s = mlsql.connect(tmp_path_factory.mktemp("sk") / "ws")
    iris = frame(skd.load_iris(as_frame=True), "species")
    iris["species"] = iris["species"].map({0: "setosa", 1: "versicolor", 2: "virginica"})
    s.register("iris_df", iris)
    s.sql("CREATE TABLE iris AS SELECT * FROM iris_df")
    s.register("cancer_df", frame(skd.load_breast_cancer(as_frame=True), "malignant"))
    s.sql("CREATE TABLE cancer AS SELECT * REPLACE (malignant = 0 AS malignant) FROM cancer_df")
    s.register("diabetes_df", frame(skd.load_diabetes(as_frame=True), "progression"))
    s.sql("CREATE TABLE diabetes AS SELECT * FROM diabetes_df")
    yield s
    s.close()


@pytest.mark.parametrize("model_type", ["logistic_reg", "boosted_tree_classifier"])
def test_multiclass_iris(sk, model_type):
    r = sk.sql(f"""CREATE OR REPLACE MODEL iris_{model_type}
        OPTIONS (model_type = '{model_type}', input_label_cols = ['species'],
                 data_split_method = 'random', data_split_eval_fraction = 0.3, max_iterations = 50)
        AS SELECT * FROM iris""").to_arrow().to_pylist()[0]
    assert r["accuracy"] >= 0.9 and r["roc_auc"] >= 0.95
    t = sk.sql(f"SELECT predicted_species, predicted_species_probs FROM ML.PREDICT(MODEL iris_{model_type}, TABLE iris)").to_arrow()
    assert t.num_rows == 150
    assert set(t.column("predicted_species").to_pylist()) == {"setosa", "versicolor", "virginica"}
    cm = sk.sql(f"SELECT * FROM ML.CONFUSION_MATRIX(MODEL iris_{model_type}, TABLE iris)").to_arrow()
    assert cm.column_names == ["expected_label", "setosa", "versicolor", "virginica"]
    counts = np.array([cm.column(c).to_pylist() for c in cm.column_names[1:]])
    assert counts.sum() == 150 and np.trace(counts) >= 135


def test_binary_breast_cancer_logistic(sk):
    r = sk.sql("""CREATE OR REPLACE MODEL cancer_lr
        OPTIONS (model_type = 'logistic_reg', input_label_cols = ['malignant'], l2_reg = 1.0)
        AS SELECT * FROM cancer""").to_arrow().to_pylist()[0]
    assert r["roc_auc"] >= 0.97 and r["accuracy"] >= 0.93
    ev = sk.sql("SELECT * FROM ML.EVALUATE(MODEL cancer_lr, TABLE cancer, STRUCT(0.9 AS threshold))").to_arrow().to_pylist()[0]
    loose = sk.sql("SELECT * FROM ML.EVALUATE(MODEL cancer_lr, TABLE cancer)").to_arrow().to_pylist()[0]
    assert ev["precision"] >= loose["precision"] and ev["recall"] <= loose["recall"]  # a higher threshold trades recall
    roc = sk.sql("SELECT * FROM ML.ROC_CURVE(MODEL cancer_lr, TABLE cancer) ORDER BY threshold DESC").to_arrow()
    rec = roc.column("recall").to_pylist()
    assert rec == sorted(rec) and rec[-1] == 1.0
    # probabilities of the two classes in label order
    p = sk.sql("SELECT predicted_malignant_probs AS p FROM ML.PREDICT(MODEL cancer_lr, TABLE cancer) LIMIT 1").scalar()
    assert [x["label"] for x in p] == [False, True] and abs(sum(x["prob"] for x in p) - 1) < 1e-9


def test_linear_reg_matches_least_squares(sk):
    from sklearn.linear_model import LinearRegression

    sk.sql("""CREATE OR REPLACE MODEL diab OPTIONS (model_type = 'linear_reg', input_label_cols = ['progression'],
              data_split_method = 'no_split') AS SELECT * FROM diabetes""")
    ours = sk.sql("SELECT predicted_progression FROM ML.PREDICT(MODEL diab, TABLE diabetes)").to_pandas().iloc[:, 0]
    df = sk.sql("SELECT * FROM diabetes").to_pandas()
    ref = LinearRegression().fit(df.drop(columns="progression"), df.progression).predict(df.drop(columns="progression"))
    assert np.allclose(ours, ref, atol=1e-6)
    assert sk.sql("SELECT r2_score FROM ML.EVALUATE(MODEL diab)").scalar() > 0.5


def test_lasso_zeroes_useless_features():
    rng = np.random.default_rng(0)
    n = 2000
    x = rng.normal(size=(n, 6))
    y = 3 * x[:, 0] - 2 * x[:, 1] + rng.normal(scale=0.1, size=n)
    t = pa.table({f"x{i}": x[:, i] for i in range(6)} | {"y": y})
    m = train(t, resolve_options({"model_type": "linear_reg", "input_label_cols": ["y"], "l1_reg": 200.0,
                                  "data_split_method": "no_split"}))
    coef = m.estimator.coef[0]
    assert abs(coef[0] - 3) < 0.2 and abs(coef[1] + 2) < 0.2
    assert np.all(np.abs(coef[2:]) < 1e-6)


def test_null_numeric_uses_training_mean_and_null_category_has_its_own_bucket():
    rng = np.random.default_rng(1)
    n = 400
    x = rng.normal(5, 2, n)
    cat = rng.choice(["a", "b", "c"], n)
    y = 2 * x + np.where(cat == "a", 10, 0) + rng.normal(0, 0.1, n)
    xs = pa.array(np.where(np.arange(n) % 10 == 0, np.nan, x), from_pandas=True)
    cats = pa.array([None if i % 7 == 0 else c for i, c in enumerate(cat)])
    t = pa.table({"x": xs, "cat": cats, "y": y})
    m = train(t, resolve_options({"model_type": "linear_reg", "input_label_cols": ["y"]}))
    mean = m.features[0].mean
    assert mean == pytest.approx(np.nanmean(np.where(np.arange(n) % 10 == 0, np.nan, x)))
    probe = pa.table({"x": pa.array([None, mean], pa.float64()), "cat": pa.array(["b", "b"])})
    p = m.predict(probe).column(0).to_pylist()
    assert p[0] == pytest.approx(p[1])
    unseen = m.predict(pa.table({"x": [5.0, 5.0], "cat": pa.array([None, "zzz"], pa.string())})).column(0).to_pylist()
    assert unseen[0] == pytest.approx(unseen[1])  # NULL and unseen share the "other" bucket
    assert m.features[1].categories == ["a", "b", "c"] and m.features[1].encoding == "onehot"


def test_auto_split_follows_bigquery_sizes():
    def n_eval(rows):
        t = pa.table({"x": np.arange(rows, dtype=float), "y": np.arange(rows, dtype=float) * 2})
        return train(t, resolve_options({"model_type": "linear_reg", "input_label_cols": ["y"]})).n_eval

    assert n_eval(499) == 0
    assert n_eval(1000) == 200
    assert n_eval(60_000) == 10_000


def test_seq_and_custom_split():
    t = pa.table({"x": np.arange(100.0), "y": np.arange(100.0), "is_eval": np.arange(100) >= 75})
    m = train(t, resolve_options({"model_type": "linear_reg", "input_label_cols": ["y"], "data_split_method": "seq",
                                  "data_split_eval_fraction": 0.1, "data_split_col": "x"}))
    assert (m.n_train, m.n_eval) == (90, 10)
    assert [f.name for f in m.features] == ["is_eval"]  # the split column is not a feature
    m = train(t, resolve_options({"model_type": "linear_reg", "input_label_cols": ["y"],
                                  "data_split_method": "custom", "data_split_col": "is_eval"}))
    assert (m.n_train, m.n_eval) == (75, 25)


def test_class_weights_shift_predictions():
    rng = np.random.default_rng(2)
    x = rng.normal(size=3000)
    label = np.where(x + rng.normal(scale=1.0, size=3000) > 1.0, "yes", "no")
    t = pa.table({"x": x, "label": label})
    base = train(t, resolve_options({"model_type": "logistic_reg"}))
    heavy = train(t, resolve_options({"model_type": "logistic_reg", "class_weights": [["yes", 5.0], ["no", 1.0]]}))
    def share_yes(m):
        return np.mean(np.array(m.predict(t).column(0).to_pylist()) == "yes")
    assert share_yes(heavy) > share_yes(base) + 0.05
    with pytest.raises(TrainingError, match="'maybe'"):
        train(t, resolve_options({"model_type": "logistic_reg", "class_weights": [["maybe", 2.0]]}))


def test_boosted_tree_shap_sums_to_prediction_and_survives_save_load(tmp_path):
    rng = np.random.default_rng(3)
    n = 3000
    x = rng.normal(size=(n, 3))
    g = rng.choice(["p", "q"], n)
    y = x[:, 0] ** 2 + np.where(g == "p", 1.0, -1.0) + rng.normal(scale=0.1, size=n)
    t = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "g": g, "y": y})
    m = train(t, resolve_options({"model_type": "boosted_tree_regressor", "input_label_cols": ["y"],
                                  "max_iterations": 40, "early_stop": False}))
    assert m.eval_metrics["r2_score"] > 0.9
    assert m.training_info.num_rows == 40 and m.training_info.column("eval_loss").null_count == 0
    feats = t.drop_columns(["y"]).slice(0, 50)
    ex = m.explain_predict(feats, top_k=4)
    pred = m.predict(feats).column(0).to_numpy()
    assert np.allclose(ex.column("prediction_value").to_numpy(), pred, atol=1e-4)
    top = ex.column("top_feature_attributions").to_pylist()
    assert {d["feature"] for d in top[0]} == {"a", "b", "c", "g"}
    fi = m.feature_importance().to_pylist()
    gains = {r["feature"]: r["importance_gain"] for r in fi}
    assert gains["a"] > gains["b"] and gains["g"] > gains["c"]
    m.save(tmp_path / "m")
    again = TrainedModel.load(tmp_path / "m")
    assert np.allclose(again.predict(feats).column(0).to_numpy(), pred)


def test_linear_explanations_are_exact():
    t = pa.table({"x": [1.0, 2.0, 3.0, 4.0], "z": [0.0, 1.0, 0.0, 1.0], "y": [3.0, 6.0, 7.0, 10.0]})
    m = train(t, resolve_options({"model_type": "linear_reg", "input_label_cols": ["y"]}))
    ex = m.explain_predict(t.drop_columns(["y"]), top_k=2).to_pylist()
    for row in ex:
        assert row["baseline_prediction_value"] == pytest.approx(6.5)  # the prediction at the mean input
        total = row["baseline_prediction_value"] + sum(a["attribution"] for a in row["top_feature_attributions"])
        assert total == pytest.approx(row["predicted_y"])
    with pytest.raises(ModelError, match="boosted tree"):
        m.feature_importance()


def test_bad_inputs_to_training():
    t = pa.table({"x": [1.0, 2.0], "y": ["a", "a"]})
    with pytest.raises(TrainingError, match="single value"):
        train(t, resolve_options({"model_type": "logistic_reg", "input_label_cols": ["y"]}))
    with pytest.raises(TrainingError, match="numeric label"):
        train(t, resolve_options({"model_type": "linear_reg", "input_label_cols": ["y"]}))
    with pytest.raises(OptionError, match="data_split_col"):
        resolve_options({"model_type": "linear_reg", "data_split_method": "custom"})
    with pytest.raises(TrainingError, match="cannot be a model feature"):
        train(pa.table({"x": [[1], [2]], "y": [1.0, 2.0]}),
              resolve_options({"model_type": "linear_reg", "input_label_cols": ["y"]}))


def test_dnn_classifier_trains_per_epoch_and_reloads(tmp_path):
    from palmerpenguins import load_penguins

    df = load_penguins().dropna()
    t = pa.Table.from_pandas(df[["species", "island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm",
                                 "body_mass_g", "sex"]], preserve_index=False)
    epochs = []
    m = train(t, resolve_options({"model_type": "dnn_classifier", "input_label_cols": ["species"],
                                  "hidden_units": [32, 16], "max_iterations": 25, "batch_size": 32,
                                  "learn_rate": 0.01, "early_stop": False, "data_split_method": "random"}),
              progress=lambda i, total, row: epochs.append((i, total)))
    assert epochs == [(i, 25) for i in range(1, 26)]
    assert m.training_info.num_rows == 25 and m.eval_metrics["accuracy"] >= 0.9
    m.save(tmp_path / "dnn")
    again = TrainedModel.load(tmp_path / "dnn")
    feats = t.drop_columns(["species"])
    assert np.allclose(again.predict(feats).column(1).to_pylist()[0][0]["prob"],
                       m.predict(feats).column(1).to_pylist()[0][0]["prob"])
    ex = m.explain_predict(feats.slice(0, 5), top_k=3).to_pylist()
    assert all(len(r["top_feature_attributions"]) == 3 for r in ex)


def test_heavy_libraries_stay_unloaded_for_plain_sql(tmp_path):
    import subprocess
    import sys

    code = ("import sys, mlsql; s = mlsql.connect(sys.argv[1]); s.sql('SELECT 42'); "
            "print(sorted(m for m in ('torch', 'mlflow', 'xgboost', 'onnxruntime', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ws")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ml_weights_are_the_coefficients_the_model_predicts_with(penguin_models):
    """ML.WEIGHTS against sklearn's least squares on the same (float32-rounded) numbers (closed form,
    float64 sums in another order: 1e-9 relative), standardized weights against numpy's std of the training column,
    and a model with a string input: the weights, applied by hand, give ML.PREDICT's numbers."""
    from sklearn.linear_model import LinearRegression

    s = penguin_models
    rows = s.sql("SELECT bill_length_mm, flipper_length_mm, body_mass_g FROM penguins "
                 "WHERE body_mass_g IS NOT NULL AND bill_length_mm IS NOT NULL").to_arrow()
    s.sql("""CREATE OR REPLACE MODEL mass_numbers OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'],
             data_split_method = 'no_split') AS SELECT bill_length_mm, flipper_length_mm, body_mass_g FROM penguins
             WHERE body_mass_g IS NOT NULL AND bill_length_mm IS NOT NULL""")
    # the model reads its inputs as float32 (mlsql.ml.features' matrix): sklearn gets the same numbers
    X = np.column_stack([rows.column(c).to_numpy().astype(np.float32).astype(float)
                         for c in ("bill_length_mm", "flipper_length_mm")])
    ref = LinearRegression().fit(X, rows.column("body_mass_g").to_numpy().astype(float))
    w = {r["processed_input"]: r["weight"] for r in s.sql("SELECT * FROM ML.WEIGHTS(MODEL mass_numbers)").to_arrow().to_pylist()}
    assert w.keys() == {"bill_length_mm", "flipper_length_mm", "__INTERCEPT__"}
    assert [w["bill_length_mm"], w["flipper_length_mm"]] == pytest.approx(list(ref.coef_), rel=1e-9)
    assert w["__INTERCEPT__"] == pytest.approx(ref.intercept_, rel=1e-9)
    std = {r["processed_input"]: r["weight"] for r in
           s.sql("SELECT * FROM ML.WEIGHTS(MODEL mass_numbers, STRUCT(TRUE AS standardize))").to_arrow().to_pylist()}
    assert std["flipper_length_mm"] == pytest.approx(ref.coef_[1] * X[:, 1].std(), rel=1e-9)
    assert std["__INTERCEPT__"] == pytest.approx(ref.predict(X.mean(axis=0, keepdims=True))[0], rel=1e-9)

    # a string input: one weight per category (NULL: NULL and unseen values); by hand = ML.PREDICT
    weights = s.sql("SELECT * FROM ML.WEIGHTS(MODEL mass_model)").to_arrow().to_pylist()
    by_input = {r["processed_input"]: r for r in weights}
    island = {c["category"]: c["weight"] for c in by_input["island"]["category_weights"]}
    assert set(island) == {"Biscoe", "Dream", "Torgersen", None} and by_input["island"]["weight"] is None
    sample = s.sql("SELECT * FROM penguins WHERE body_mass_g IS NOT NULL AND sex IS NOT NULL LIMIT 20").to_arrow()
    got = s.sql("SELECT predicted_body_mass_g FROM ML.PREDICT(MODEL mass_model, (SELECT * FROM penguins "
                "WHERE body_mass_g IS NOT NULL AND sex IS NOT NULL LIMIT 20))").to_arrow().column(0).to_pylist()
    for row, pred in zip(sample.to_pylist(), got):
        total = by_input["__INTERCEPT__"]["weight"]
        for name, r in by_input.items():
            if name == "__INTERCEPT__":
                continue
            if r["category_weights"] is not None:
                cats = {c["category"]: c["weight"] for c in r["category_weights"]}
                total += cats.get(row[name], cats[None])
            else:
                total += r["weight"] * float(np.float32(row[name]))  # the model reads float32 inputs
        assert total == pytest.approx(pred, rel=1e-9)  # the same float64 sum, terms in another order


def test_ml_weights_refuses_a_tree_model_and_a_bad_setting(penguin_models):
    from mlsql.errors import MLSQLError

    with pytest.raises(MLSQLError, match="ML.WEIGHTS is available for linear_reg and logistic_reg models, "
                                         "not boosted_tree_classifier"):
        penguin_models.sql("SELECT * FROM ML.WEIGHTS(MODEL species_model)")
    with pytest.raises(MLSQLError, match="standardiz"):
        penguin_models.sql("SELECT * FROM ML.WEIGHTS(MODEL mass_model, STRUCT(TRUE AS standardise))")

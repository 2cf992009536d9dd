"""random_forest_*, kmeans and pca on every engine (the ``backend`` fixture: DuckDB, then Spark in
local mode), each compared with the library called by hand on the same rows, encoded and
standardized by hand (``by_hand``): xgboost's random-forest mode, scikit-learn's KMeans and PCA,
Spark ML's KMeans. What a model learnt (its centroids, components, booster) is read from it only
where the by-hand answer must start from it (anomaly thresholds); everything else is refitted."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("pyspark")

import by_hand as H  # noqa: E402 - tests/engines/by_hand.py, beside this file

TABLES = ("flights", "penguins")
PENGUIN_FEATURES = "island, bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g, sex"
# the first centroids of the CUSTOM k-means: three rows of three species, picked by hand
INIT_ROWS = """SELECT {cols}, COALESCE((bill_length_mm = 39.1 AND bill_depth_mm = 18.7)
               OR (bill_length_mm = 46.1 AND bill_depth_mm = 13.2) OR (bill_length_mm = 46.5 AND bill_depth_mm = 17.9),
               FALSE) AS init FROM penguins"""


@pytest.fixture(scope="module")
def raw(shared_ws):
    """DuckDB without MLSQL, on the shared workspace's tables."""
    con = H.raw_duckdb(shared_ws, TABLES)
    yield con
    con.close()


def _metrics(result) -> dict:
    return {k: v for k, v in result.table.to_pylist()[0].items() if isinstance(v, float)}


def _name(backend, what: str) -> str:
    return f"{backend.engine.name}_{what}"


# -- random forests ------------------------------------------------------------------------------

RF_QUERY = ("SELECT arr_delay, dep_delay, carrier, origin, distance, hour FROM flights "
            "WHERE month = 1 AND arr_delay IS NOT NULL")
RF_OPTIONS = ("model_type = 'random_forest_regressor', input_label_cols = ['arr_delay'], num_parallel_tree = 20, "
              "max_tree_depth = 8, data_split_method = 'seq', data_split_eval_fraction = 0.2")


def test_random_forest_regressor_is_xgboost_random_forest_mode(backend, raw):
    """The forest is xgboost's random-forest mode as BigQuery ML trains it: one round of
    num_parallel_tree trees, learning rate 1, rows and columns subsampled (0.8, by node). By hand:
    xgboost.train with those parameters on the same encoded rows (held-out rows in the matrix with
    weight 0, as MLSQL passes them), scored by sklearn's metrics on the held-out rows."""
    import xgboost as xgb

    name = _name(backend, "rf_reg")
    got = _metrics(backend.sql(f"CREATE OR REPLACE MODEL {name} OPTIONS ({RF_OPTIONS}) AS {RF_QUERY}"))
    model = backend.model(name).model
    info = backend.sql(f"SELECT * FROM ML.TRAINING_INFO(MODEL {name})").table.to_pylist()
    assert len(info) == 1 and info[0]["learning_rate"] == 1.0  # one round, no shrinkage: a forest
    assert len(model.estimator.booster.get_dump()) == 20

    rows = raw.sql(RF_QUERY).to_arrow_table()
    held = H.eval_mask(rows.num_rows, "seq", 0.2)
    X = H.encode(model.features, rows).astype(np.float32)
    y = np.array(rows.column("arr_delay").to_pylist(), dtype=np.float64)
    params = {"objective": "reg:squarederror", "eta": 1.0, "num_parallel_tree": 20, "max_depth": 8,
              "subsample": 0.8, "colsample_bynode": 0.8, "lambda": 1.0, "tree_method": "hist", "seed": 42,
              "base_score": float(y[~held].mean()), "nthread": 1}
    booster = xgb.train(params, xgb.DMatrix(X, label=y, weight=(~held).astype(np.float64)), num_boost_round=1)
    want = H.regression_metrics(y[held], booster.predict(xgb.DMatrix(X[held])).astype(np.float64))
    assert got.keys() == want.keys()
    if backend.engine.name == "duckdb":
        # xgboost's own trees for the same rows, parameters and seed: the same forest. What can differ is
        # the order of the histogram sums (MLSQL's threads against nthread = 1 here; xgboost sums gradients
        # in float64): ~1e-15 relative on a split gain, far from flipping a split on continuous data, and
        # the metrics' own float64 sums (~1e-13). 1e-6 is far above both on any CPU; no BLAS is involved.
        for k in want:
            assert math.isclose(got[k], want[k], rel_tol=1e-6), (k, got[k], want[k])
        return
    # Spark: xgboost.spark's distributed quantile sketch and each worker's own row and column sampling
    # grow other trees. The bound for random forests is 0.01 on the scale-free metrics; the squared
    # error within 0.01 of the held-out rows' variance is the same bound (r2 = 1 - mse / var)
    for k in ("r2_score", "explained_variance"):
        assert abs(got[k] - want[k]) <= 0.01, (k, got[k], want[k])
    assert abs(got["mean_squared_error"] - want["mean_squared_error"]) <= 0.01 * y[held].var()


def test_random_forest_classifier_explains_and_exports(backend):
    """A forest classifier's feature importance is xgboost's own scores of its booster, its
    explanations sum to the margin, and its ONNX graph gives the native probabilities."""
    name = _name(backend, "rf_cls")
    backend.sql(f"""CREATE OR REPLACE MODEL {name} OPTIONS (model_type = 'random_forest_classifier',
        input_label_cols = ['species'], num_parallel_tree = 10, max_tree_depth = 5)
        AS SELECT species, {PENGUIN_FEATURES} FROM penguins""")
    model = backend.model(name).model
    booster = model.estimator.booster
    assert len(booster.get_dump()) == 30  # 10 trees for each of 3 classes, in one round
    imp = {r["feature"]: r for r in backend.sql(f"SELECT * FROM ML.FEATURE_IMPORTANCE(MODEL {name})").table.to_pylist()}
    gain = booster.get_score(importance_type="total_gain")
    for i, f in enumerate(model.features):
        assert imp[f.name]["importance_gain"] == pytest.approx(gain.get(f"f{i}", 0.0), rel=1e-12)
    ex = backend.sql(f"SELECT * FROM ML.EXPLAIN_PREDICT(MODEL {name}, (SELECT * FROM penguins LIMIT 5), "
                     "STRUCT(10 AS top_k_features))").table.to_pylist()
    for r in ex:  # SHAP: the baseline plus every attribution is the margin the row's prediction comes from
        total = r["baseline_prediction_value"] + sum(a["attribution"] for a in r["top_feature_attributions"])
        assert total == pytest.approx(r["prediction_value"], abs=1e-5)  # float32 leaf sums
    for fmt in ("ensemble", "tensor", "gemm"):
        rep = backend.export(name, tree_format=fmt).export.report
        # float32 ONNX against float32 xgboost: 1e-4 is PARITY_TOL (tests/README.md)
        assert rep.passed and rep.max_abs_diff < 1e-4 and rep.rows == 344, (fmt, rep.to_dict())


# -- k-means -------------------------------------------------------------------------------------


def _standardized(model, rows: pa.Table, center_onehot: bool = False, scale: bool = True) -> np.ndarray:
    """The encoded rows (by hand) with every numerical column at mean 0 and standard deviation 1
    (numpy's, population) over these rows; one-hot columns as they are (k-means) or centred (pca)."""
    X = H.encode(model.features, rows)
    j = 0
    for f in model.features:
        width = len(f.categories) + 1 if f.encoding == "onehot" else 1
        if f.encoding != "onehot":
            X[:, j] -= X[:, j].mean()
            if scale:
                X[:, j] /= X[:, j].std()
        elif center_onehot:
            X[:, j:j + width] -= X[:, j:j + width].mean(axis=0)
        j += width
    return X


def _centroids(backend, name: str, standardize: bool) -> np.ndarray:
    rows = backend.sql(f"SELECT * FROM ML.CENTROIDS(MODEL {name}, STRUCT({standardize} AS standardize)) "
                       "ORDER BY centroid_id").table.to_pylist()
    out: dict[int, list] = {}
    for r in rows:
        vals = [r["numerical_value"]] if r["categorical_value"] is None else [c["value"] for c in r["categorical_value"]]
        out.setdefault(r["centroid_id"], []).extend(vals)
    return np.array([out[k] for k in sorted(out)])


def test_kmeans_custom_start_is_sklearns_kmeans(backend, raw):
    """From the same first centroids (the rows kmeans_init_col marks) Lloyd's iterations end where
    scikit-learn's KMeans ends on the same standardized rows, on every engine (DuckDB: MLSQL's own
    Lloyd's; Spark: Spark's k-means given those centroids)."""
    from sklearn.cluster import KMeans

    name = _name(backend, "km_custom")
    q = INIT_ROWS.format(cols=PENGUIN_FEATURES)
    got = _metrics(backend.sql(f"""CREATE OR REPLACE MODEL {name} OPTIONS (model_type = 'kmeans',
        kmeans_init_method = 'CUSTOM', kmeans_init_col = 'init', early_stop = FALSE, max_iterations = 50) AS {q}"""))
    model = backend.model(name).model
    rows = raw.sql(q).to_arrow_table()
    Z = _standardized(model, rows)
    init = Z[np.array(rows.column("init").to_pylist())]
    assert len(init) == 3
    sk = KMeans(3, init=init, n_init=1, max_iter=50, tol=0.0, algorithm="lloyd").fit(Z)
    # the same float64 Lloyd's iterations to the same fixed point: they differ by the order of their
    # sums (~1e-16 relative a step, over a few iterations): 1e-6 is far above that
    assert got["mean_squared_distance"] * len(Z) == pytest.approx(sk.inertia_, rel=1e-6)
    assert np.abs(_centroids(backend, name, True) - sk.cluster_centers_).max() < 1e-6
    ids = backend.sql(f"SELECT CENTROID_ID, bill_length_mm, flipper_length_mm FROM ML.PREDICT(MODEL {name}, "
                      f"({q}))").table
    assert (np.array(ids.column("CENTROID_ID").to_pylist()) - 1 == sk.labels_).all()
    # in the data's own units: the model's standardized centroid times the column's stddev plus its mean,
    # both worked out by hand here. The same float64 numbers through a multiply and an add on each side
    # (~1e-16 relative; the mean and stddev of 344 values summed in another order, ~1e-14): 1e-9. The
    # standardized centroids themselves are checked against sklearn's above, to their own bound.
    x = np.array(rows.column("bill_length_mm").to_pylist(), dtype=np.float64)
    x = np.where(np.isnan(x), np.nanmean(x), x).astype(np.float32).astype(np.float64)
    col = [f.name for f in model.features].index("bill_length_mm") + len(model.features[0].categories)
    standardized = _centroids(backend, name, True)[:, col]
    assert np.allclose(_centroids(backend, name, False)[:, col], standardized * x.std() + x.mean(), rtol=1e-9)


def test_kmeans_plus_plus_is_the_engines_library_with_the_same_seed(backend, raw, spark_ws):
    """KMEANS++ with random_seed: on DuckDB scikit-learn's k-means++ seeding and Lloyd's, the model
    sklearn's KMeans finds with that seed; on Spark, Spark ML's KMeans (k-means||) with that seed on
    the same rows, called by hand."""
    name = _name(backend, "km_pp")
    opts = "model_type = 'kmeans', num_clusters = 3, kmeans_init_method = 'KMEANS++', random_seed = 7"
    q = f"SELECT {PENGUIN_FEATURES} FROM penguins"
    got = _metrics(backend.sql(f"CREATE OR REPLACE MODEL {name} OPTIONS ({opts}) AS {q}"))
    model = backend.model(name).model
    rows = raw.sql(q).to_arrow_table()
    Z = _standardized(model, rows)
    if backend.engine.name == "duckdb":
        from sklearn.cluster import KMeans

        sk = KMeans(3, init="k-means++", n_init=1, random_state=7, max_iter=model.estimator.iterations, tol=0.0,
                    algorithm="lloyd").fit(Z)
        inertia, centers = sk.inertia_, sk.cluster_centers_
        steps = backend.sql(f"SELECT loss FROM ML.TRAINING_INFO(MODEL {name}) ORDER BY iteration").table
        loss = steps.column("loss").to_pylist()
        # early_stop (min_rel_progress 0.01): every iteration but the last improved the loss by at least 1 %
        assert all((a - b) / a >= 0.01 for a, b in zip(loss[:-2], loss[1:-1])) and len(loss) < 20
    else:
        from pyspark.ml.clustering import KMeans
        from pyspark.ml.linalg import Vectors

        frame = spark_ws.engine.spark.createDataFrame([(Vectors.dense(z),) for z in Z], ["features"])
        fitted = KMeans(k=3, initMode="k-means||", seed=7, maxIter=20, tol=0.01).fit(frame)
        inertia, centers = fitted.summary.trainingCost, np.array(fitted.clusterCenters())
    # the same algorithm from the same seed on the same rows; the rows' standardization (MLSQL's column
    # sums against numpy's) and the sums' order differ by ~1e-16 relative: 1e-6 is far above that
    assert got["mean_squared_distance"] * len(Z) == pytest.approx(inertia, rel=1e-6)
    mine = _centroids(backend, name, True)
    # the same centroids, in the order each library numbers them
    assert max(np.abs(mine - centers[np.argmin(((mine[:, None] - centers[None]) ** 2).sum(-1), axis=1)]).max(),
               0) < 1e-6


def test_kmeans_evaluate_and_anomalies_by_hand(backend, raw):
    """ML.EVALUATE's davies_bouldin_index and mean_squared_distance, and ML.DETECT_ANOMALIES, redone
    with numpy and sklearn from the model's centroids on the same rows."""
    from sklearn.metrics import davies_bouldin_score

    name = _name(backend, "km_custom")
    q = INIT_ROWS.format(cols=PENGUIN_FEATURES)
    if name not in [r["model"] for r in backend.sql("SHOW MODELS").table.to_pylist()]:
        backend.sql(f"""CREATE OR REPLACE MODEL {name} OPTIONS (model_type = 'kmeans', kmeans_init_method = 'CUSTOM',
            kmeans_init_col = 'init', early_stop = FALSE, max_iterations = 50) AS {q}""")
    model = backend.model(name).model
    rows = raw.sql(q).to_arrow_table()
    Z = _standardized(model, rows)
    C = _centroids(backend, name, True)
    D = np.sqrt(((Z[:, None, :] - C[None]) ** 2).sum(-1))
    labels = D.argmin(1)
    ev = _metrics(backend.sql(f"SELECT * FROM ML.EVALUATE(MODEL {name}, ({q}))"))
    assert ev["mean_squared_distance"] == pytest.approx((D.min(1) ** 2).mean(), rel=1e-9)
    # sklearn's index uses the clusters' means; at Lloyd's fixed point they are the centroids
    assert ev["davies_bouldin_index"] == pytest.approx(davies_bouldin_score(Z, labels), rel=1e-6)

    near = D.min(1)
    medians = np.array([np.median(near[labels == j]) for j in range(3)])
    normalized = (D / medians).min(1)
    cut = np.quantile(normalized, 1 - 0.05)
    got = backend.sql(f"SELECT is_anomaly, normalized_distance, CENTROID_ID FROM ML.DETECT_ANOMALIES(MODEL {name}, "
                      f"STRUCT(0.05 AS contamination), ({q}))").table
    # the same float64 distances from the model's own centroids (ML.CENTROIDS) and the same float32-rounded,
    # standardized inputs, summed in another order (~1e-16 relative), over the same medians: 1e-9
    assert np.allclose(got.column("normalized_distance").to_pylist(), normalized, rtol=1e-9)
    assert got.column("is_anomaly").to_pylist() == (normalized > cut).tolist()
    # the 95th percentile of 344 values sits at sorted position 0.95 * 343 = 325.85 (numpy's linear
    # interpolation), so positions 326..343 are above it: 18 rows
    assert sum(got.column("is_anomaly").to_pylist()) == 18
    assert (np.array(got.column("CENTROID_ID").to_pylist()) == labels + 1).all()
    from mlsql.errors import MLSQLError

    with pytest.raises(MLSQLError, match="ML.EXPLAIN_PREDICT is not available for kmeans models"):
        backend.sql(f"SELECT * FROM ML.EXPLAIN_PREDICT(MODEL {name}, ({q}))")
    with pytest.raises(MLSQLError, match="ML.GENERATE_EMBEDDING is available for pca models, not kmeans"):
        backend.sql(f"SELECT * FROM ML.GENERATE_EMBEDDING(MODEL {name}, ({q}))")


# -- PCA -----------------------------------------------------------------------------------------


def test_pca_is_sklearns_pca(backend, raw):
    """Components, explained variance and projections: scikit-learn's PCA on the same rows, centred
    and scaled by hand (Spark: Spark ML's PCA underneath, the same numbers)."""
    from sklearn.decomposition import PCA

    name = _name(backend, "pca")
    q = f"SELECT {PENGUIN_FEATURES} FROM penguins"
    got = _metrics(backend.sql(f"CREATE OR REPLACE MODEL {name} OPTIONS (model_type = 'pca', "
                               f"num_principal_components = 3) AS {q}"))
    model = backend.model(name).model
    rows = raw.sql(q).to_arrow_table()
    Z = _standardized(model, rows, center_onehot=True)
    sk = PCA(3, svd_solver="full").fit(Z)
    # an eigen-decomposition of the same covariance (sklearn's SVD, Spark's eigensolver): float64
    # rounding (~1e-15) divided by the eigengaps (> 0.1 here): 1e-6 is far above that
    assert got["total_explained_variance_ratio"] == pytest.approx(sk.explained_variance_ratio_.sum(), rel=1e-6)
    info = backend.sql(f"SELECT * FROM ML.PRINCIPAL_COMPONENT_INFO(MODEL {name}) ORDER BY 1").table
    # eigenvalues and their ratios: the same bound (LAPACK under any BLAS kernel or thread count agrees
    # to ~1e-15 relative on a well-separated spectrum)
    assert np.allclose(info.column("eigenvalue").to_pylist(), sk.explained_variance_, rtol=1e-6)
    assert np.allclose(info.column("cumulative_explained_variance_ratio").to_pylist(),
                       np.cumsum(sk.explained_variance_ratio_), rtol=1e-6)
    comps = backend.sql(f"SELECT * FROM ML.PRINCIPAL_COMPONENTS(MODEL {name}) ORDER BY principal_component_id").table
    by_id: dict[int, list] = {}
    for r in comps.to_pylist():
        vals = [r["numerical_value"]] if r["categorical_value"] is None else [c["value"] for c in r["categorical_value"]]
        by_id.setdefault(r["principal_component_id"], []).extend(vals)
    V = np.array([by_id[k] for k in sorted(by_id)])
    assert np.abs(V - sk.components_).max() < 1e-6  # sklearn's signs: each component's largest entry positive
    pred = backend.sql(f"SELECT principal_component_1, principal_component_2, principal_component_3 "
                       f"FROM ML.PREDICT(MODEL {name}, ({q}))").table
    P = np.column_stack([pred.column(i).to_pylist() for i in range(3)])
    assert np.abs(P - sk.transform(Z)).max() < 1e-6
    # the embedding: the same projection as one ARRAY<DOUBLE> per row, then the input columns
    emb = backend.sql(f"SELECT * FROM ML.GENERATE_EMBEDDING(MODEL {name}, ({q}))").table
    assert emb.column_names[0] == "ml_generate_embedding_result" and emb.num_rows == rows.num_rows
    assert emb.column_names[1:] == rows.column_names
    E = np.array(emb.column(0).to_pylist())
    assert E.shape == (rows.num_rows, 3) and np.abs(E - sk.transform(Z)).max() < 1e-6


def test_unsupervised_exports_pass_parity(backend):
    """k-means (distances + ArgMin) and PCA (MatMul) as ONNX give the native values on each engine's model."""
    for what in ("km_custom", "pca"):
        name = _name(backend, what)
        rep = backend.export(name).export.report
        # float32 graph against the float64 model, relative to max(1, |value|): PARITY_TOL (tests/README.md)
        assert rep.passed and rep.max_abs_diff < 1e-4 and rep.rows == 344, (what, rep.to_dict())
        # kmeans: every row in the native model's cluster; pca: the components' r2 against the native
        # ones, 1 - (float32 rounding, ~1e-7)^2 relative
        assert rep.metric_onnx == (1.0 if what.startswith("km") else pytest.approx(1.0, abs=1e-9)), rep.metric_onnx

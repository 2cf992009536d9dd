"""random_forest_*, kmeans and pca on DuckDB: their options and errors, what only one engine needs
to show (scikit-learn's RANDOM start, early stopping, the ratio form of PCA, a multiclass forest's
tree layout in every ONNX form), and a kmeans model deployed to a device agent. Every engine's
models against the libraries called by hand: tests/engines/test_model_types_engines.py."""

from __future__ import annotations

import re

import numpy as np
import pytest
from bridge_procs import start_bridge

from mlsql.errors import MLSQLError, OptionError, TrainingError

FEATURES = "island, bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g, sex"
TOKEN = "types-test-token"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import mlsql
    import mlsql.datasets

    s = mlsql.connect(tmp_path_factory.mktemp("types") / "ws")
    mlsql.datasets.load("penguins", session=s)
    yield s
    s.close()


def _standardized(model, table) -> np.ndarray:
    """The model's encoded rows, numerical columns at mean 0 and (population) standard deviation 1."""
    from mlsql.ml.features import encode

    X = encode(table, model.features).astype(np.float64)
    j = 0
    for f in model.features:
        if f.encoding == "onehot":
            j += len(f.categories) + 1
            continue
        X[:, j] = (X[:, j] - X[:, j].mean()) / X[:, j].std()
        j += 1
    return X


@pytest.mark.parametrize("options, message", [
    ("model_type = 'random_forest_regressor', input_label_cols = ['body_mass_g'], learn_rate = 0.1",
     "Option learn_rate applies to"),
    ("model_type = 'random_forest_regressor', input_label_cols = ['body_mass_g'], num_parallel_tree = 1",
     "a random forest has at least 2 trees"),
    ("model_type = 'random_forest_classifier', input_label_cols = ['species'], booster_type = 'dart'",
     "Option booster_type applies to"),
    ("model_type = 'kmeans', input_label_cols = ['species']", "Option input_label_cols applies to"),
    ("model_type = 'kmeans', num_clusters = 1", re.escape("num_clusters = 1 must be a whole number in [2, 100]")),
    ("model_type = 'kmeans', kmeans_init_method = 'CUSTOM'", "needs kmeans_init_col"),
    ("model_type = 'kmeans', kmeans_init_col = 'init'", "read only with kmeans_init_method = 'CUSTOM'"),
    ("model_type = 'kmeans', distance_type = 'manhattan'", "is not one of 'euclidean', 'cosine'"),
    ("model_type = 'pca'", "pca needs num_principal_components or pca_explained_variance_ratio"),
    ("model_type = 'pca', num_principal_components = 2, pca_explained_variance_ratio = 0.9", "not both"),
    ("model_type = 'pca', num_principal_components = 2, data_split_method = 'random'",
     "Option data_split_method applies to"),
])
def test_options_are_checked_before_any_data_is_read(ws, options, message):
    with pytest.raises(OptionError, match=message):
        ws.sql(f"CREATE OR REPLACE MODEL bad OPTIONS ({options}) AS SELECT * FROM penguins")
    assert "bad" not in [r["model"] for r in ws.sql("SHOW MODELS").table.to_pylist()]


def test_training_errors_name_what_is_wrong(ws):
    with pytest.raises(TrainingError, match="is TRUE on 4 rows; num_clusters = 3 needs exactly 3"):
        ws.sql(f"""CREATE OR REPLACE MODEL bad OPTIONS (model_type = 'kmeans', num_clusters = 3,
                   kmeans_init_method = 'CUSTOM', kmeans_init_col = 'init')
                   AS SELECT {FEATURES}, bill_length_mm IN (39.1, 46.1) AS init FROM penguins""")
    with pytest.raises(MLSQLError, match="kmeans_init_col 'flag' is not a column"):
        ws.sql(f"""CREATE OR REPLACE MODEL bad OPTIONS (model_type = 'kmeans', kmeans_init_method = 'CUSTOM',
                   kmeans_init_col = 'flag') AS SELECT {FEATURES} FROM penguins""")
    with pytest.raises(TrainingError, match="have at most 2 components"):
        ws.sql("CREATE OR REPLACE MODEL bad OPTIONS (model_type = 'pca', num_principal_components = 3) "
               "AS SELECT bill_length_mm, bill_depth_mm FROM penguins")
    assert "bad" not in [r["model"] for r in ws.sql("SHOW MODELS").table.to_pylist()]


def test_kmeans_random_start_is_sklearns_and_stops_early(ws):
    """RANDOM: the rows scikit-learn's KMeans(init='random') starts from for the seed, then Lloyd's
    iterations until the loss improves by less than min_rel_progress; the model is sklearn's after
    as many iterations. num_clusters left out: round(log10(344)) = 3."""
    from sklearn.cluster import KMeans

    r = ws.sql(f"""CREATE OR REPLACE MODEL km_random OPTIONS (model_type = 'kmeans', random_seed = 3,
                   min_rel_progress = 0.001) AS SELECT {FEATURES} FROM penguins""")
    assert "kmeans" in r.message and "davies_bouldin_index" in r.message
    model = ws.model("km_random").model
    Z = _standardized(model, ws.sql("SELECT * FROM penguins").table)
    iters = model.estimator.iterations
    sk = KMeans(3, init="random", n_init=1, random_state=3, max_iter=iters, tol=0.0, algorithm="lloyd").fit(Z)
    # the same float64 iterations from the same rows: they differ by the order of their sums (~1e-16)
    assert model.eval_metrics["mean_squared_distance"] * len(Z) == pytest.approx(sk.inertia_, rel=1e-9)
    assert np.abs(model.estimator.centroids - sk.cluster_centers_).max() < 1e-9
    loss = ws.sql("SELECT loss FROM ML.TRAINING_INFO(MODEL km_random) ORDER BY iteration").table.column(0).to_pylist()
    assert len(loss) == iters and loss == sorted(loss, reverse=True)  # Lloyd's never raises the loss
    gains = [(a - b) / a for a, b in zip(loss, loss[1:])]
    # every iteration but the last gained at least 0.1 %; the last one either gained less (early_stop)
    # or reached Lloyd's fixed point (no row changes cluster: sklearn, given more iterations, stops there)
    assert all(g >= 0.001 for g in gains[:-1])
    longer = KMeans(3, init="random", n_init=1, random_state=3, max_iter=100, tol=0.0, algorithm="lloyd").fit(Z)
    assert gains[-1] < 0.001 or longer.n_iter_ <= iters + 1
    assert loss[-1] == pytest.approx(sk.inertia_ / len(Z), rel=1e-9)


def test_kmeans_clusters_are_one_query_for_a_scatter_plot(ws):
    """notebooks/08_forecast_and_cluster draws a scatter coloured by cluster from one ML.PREDICT query;
    a cosine model's clusters, and the centroids in the data's own units."""
    ws.sql(f"""CREATE OR REPLACE MODEL km_cos OPTIONS (model_type = 'kmeans', num_clusters = 3,
               distance_type = 'COSINE', kmeans_init_method = 'KMEANS++') AS SELECT {FEATURES} FROM penguins""")
    t = ws.sql("SELECT CENTROID_ID AS cluster, bill_length_mm, flipper_length_mm "
               "FROM ML.PREDICT(MODEL km_cos, TABLE penguins)").table
    assert t.num_rows == 344 and set(t.column("cluster").to_pylist()) == {1, 2, 3}
    model = ws.model("km_cos").model
    Z = _standardized(model, ws.sql("SELECT * FROM penguins").table)
    Zn = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    C = model.estimator.centroids
    # cosine: the nearest centroid is the one of largest cosine similarity (centroids have unit length)
    assert np.allclose(np.linalg.norm(C, axis=1), 1.0, rtol=1e-12)
    assert ((Zn @ C.T).argmax(axis=1) + 1 == np.array(t.column("cluster").to_pylist())).all()
    d = ws.sql("SELECT NEAREST_CENTROIDS_DISTANCE AS d FROM ML.PREDICT(MODEL km_cos, TABLE penguins) LIMIT 1").table
    first = d.column("d").to_pylist()[0]
    assert [x["DISTANCE"] for x in first] == sorted(x["DISTANCE"] for x in first)
    assert first[0]["DISTANCE"] == pytest.approx(1.0 - (Zn[0] @ C.T).max(), abs=1e-12)
    # a centroid's share of each island: the categorical value is the cluster's mean of the one-hot column
    cent = ws.sql("SELECT categorical_value FROM ML.CENTROIDS(MODEL km_cos) WHERE feature = 'island'").table
    for cats in cent.column(0).to_pylist():
        assert [c["category"] for c in cats] == ["Biscoe", "Dream", "Torgersen", None]


def test_pca_explained_variance_ratio_keeps_the_fewest_components(ws):
    """pca_explained_variance_ratio: the fewest components whose cumulative ratio reaches it, as
    sklearn's PCA(n_components=ratio) keeps them (unscaled features: body mass dominates)."""
    from sklearn.decomposition import PCA

    cols = "bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g"
    q = f"SELECT {cols} FROM penguins WHERE body_mass_g IS NOT NULL"
    for ratio, scale in ((0.8, "TRUE"), (0.95, "TRUE"), (0.9, "FALSE")):
        ws.sql(f"CREATE OR REPLACE MODEL p_ratio OPTIONS (model_type = 'pca', pca_explained_variance_ratio = {ratio}, "
               f"scale_features = {scale}) AS {q}")
        X = np.column_stack([ws.sql(q).table.column(c).to_numpy().astype(np.float32).astype(np.float64)
                             for c in cols.split(", ")])
        X = X - X.mean(axis=0)
        if scale == "TRUE":
            X = X / X.std(axis=0)
        sk = PCA(ratio, svd_solver="full").fit(X)
        info = ws.sql("SELECT * FROM ML.PRINCIPAL_COMPONENT_INFO(MODEL p_ratio)").table
        assert info.num_rows == sk.n_components_, (ratio, scale)
        assert np.allclose(info.column("explained_variance_ratio").to_pylist(), sk.explained_variance_ratio_,
                           rtol=1e-9)


def test_pca_anomalies_are_the_worst_rebuilt_rows(ws):
    """ML.DETECT_ANOMALIES of a pca model: each row's mean squared reconstruction error against the
    training rows' (1 - contamination) quantile of it, worked out with sklearn's inverse_transform."""
    from sklearn.decomposition import PCA

    cols = "bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g"
    q = f"SELECT {cols} FROM penguins WHERE body_mass_g IS NOT NULL"
    ws.sql(f"CREATE OR REPLACE MODEL p_anom OPTIONS (model_type = 'pca', num_principal_components = 2) AS {q}")
    X = np.column_stack([ws.sql(q).table.column(c).to_numpy().astype(np.float32).astype(np.float64)
                         for c in cols.split(", ")])
    Z = (X - X.mean(axis=0)) / X.std(axis=0)
    sk = PCA(2, svd_solver="full").fit(Z)
    err = ((Z - sk.inverse_transform(sk.transform(Z))) ** 2).mean(axis=1)
    got = ws.sql(f"SELECT * FROM ML.DETECT_ANOMALIES(MODEL p_anom, STRUCT(0.1 AS contamination), ({q}))").table
    assert got.column_names[:2] == ["is_anomaly", "mean_squared_error"] and "body_mass_g" in got.column_names
    assert np.allclose(got.column("mean_squared_error").to_pylist(), err, rtol=1e-9, atol=1e-12)
    assert got.column("is_anomaly").to_pylist() == (err > np.quantile(err, 0.9)).tolist()


def test_ml_functions_refuse_the_wrong_model_type(ws):
    ws.sql("CREATE OR REPLACE MODEL rf_small OPTIONS (model_type = 'random_forest_classifier', "
           "input_label_cols = ['species'], num_parallel_tree = 4) AS SELECT * FROM penguins")
    with pytest.raises(MLSQLError, match="ML.DETECT_ANOMALIES is available for kmeans and pca models, not "
                                         "random_forest_classifier"):
        ws.sql("SELECT * FROM ML.DETECT_ANOMALIES(MODEL rf_small, STRUCT(0.1 AS contamination), TABLE penguins)")
    with pytest.raises(MLSQLError, match="ML.CENTROIDS is available for kmeans models, not random_forest_classifier"):
        ws.sql("SELECT * FROM ML.CENTROIDS(MODEL rf_small)")
    ws.sql(f"CREATE OR REPLACE MODEL km_small OPTIONS (model_type = 'kmeans', num_clusters = 2) "
           f"AS SELECT {FEATURES} FROM penguins")
    with pytest.raises(MLSQLError, match="needs STRUCT\\(x AS contamination\\)"):
        ws.sql("SELECT * FROM ML.DETECT_ANOMALIES(MODEL km_small, TABLE penguins)")
    with pytest.raises(OptionError, match="contamination = 0.7 must be a number in \\[0, 0.5\\]"):
        ws.sql("SELECT * FROM ML.DETECT_ANOMALIES(MODEL km_small, STRUCT(0.7 AS contamination), TABLE penguins)")
    with pytest.raises(MLSQLError, match="ML.EXPLAIN_PREDICT is not available for kmeans models"):
        ws.sql("SELECT * FROM ML.EXPLAIN_PREDICT(MODEL km_small, TABLE penguins)")
    with pytest.raises(MLSQLError, match="ML.PRINCIPAL_COMPONENTS is available for pca models, not kmeans"):
        ws.sql("SELECT * FROM ML.PRINCIPAL_COMPONENTS(MODEL km_small)")
    with pytest.raises(MLSQLError, match="ML.FEATURE_IMPORTANCE is available for boosted tree and random forest"):
        ws.sql("SELECT * FROM ML.FEATURE_IMPORTANCE(MODEL km_small)")


@pytest.mark.parametrize("quantize", ["none", "int8", "int8_static", "fp16"])
def test_kmeans_and_pca_export_in_every_quantized_form(ws, quantize):
    """k-means (distances + ArgMin) and PCA (a MatMul) exported fp32 and quantized: fp32 parity within
    PARITY_TOL, and a quantized graph keeps its metric (every row in the native model's cluster; the
    components' r2 against the native ones) within max_metric_drop, or the export is refused."""
    ws.sql(f"CREATE OR REPLACE MODEL km_q OPTIONS (model_type = 'kmeans', num_clusters = 3) AS SELECT {FEATURES} "
           "FROM penguins")
    ws.sql(f"CREATE OR REPLACE MODEL p_q OPTIONS (model_type = 'pca', num_principal_components = 3) AS SELECT "
           f"{FEATURES} FROM penguins")
    for name, metric in (("km_q", "centroid_agreement"), ("p_q", "component_r2")):
        rep = ws.sql(f"EXPORT MODEL {name} OPTIONS (quantize = '{quantize}')").export.report
        assert rep.passed and rep.max_abs_diff < 1e-4 and rep.metric == metric, rep.to_dict()
        if quantize != "none":
            assert rep.metric_native - rep.metric_quantized <= 0.005, rep.to_dict()  # max_metric_drop's default


@pytest.mark.parametrize("fmt", ["ensemble", "tensor", "gemm"])
def test_multiclass_trees_in_parallel_export_to_their_classes(ws, fmt):
    """With several trees a round (num_parallel_tree) a multiclass booster holds each class's trees
    together ([c0, c0, c1, c1, c2, c2] a round), not one per class in turn: every ONNX form adds each
    tree to its own class (xgboost's tree_info), so the graph gives the native probabilities."""
    ws.sql("CREATE OR REPLACE MODEL bt_par OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = "
           "['species'], num_parallel_tree = 2, max_iterations = 3, early_stop = FALSE) AS SELECT * FROM penguins")
    rep = ws.export("bt_par", tree_format=fmt).export.report
    assert rep.passed and rep.max_abs_diff < 1e-4, rep.to_dict()  # PARITY_TOL: float32 leaf sums


def test_kmeans_deploys_and_predicts_on_a_device(ws, tmp_path):
    """DEPLOY a kmeans model like any other: the device's ONNX graph (distances + ArgMin) puts every
    row in the cluster ML.PREDICT puts it in here, at the same distances."""
    from device_bridge.keys import load_or_create_keypair

    load_or_create_keypair(ws.workspace.keys_dir)
    pub = ws.workspace.keys_dir / "signing_key.pub"
    agent, listening = start_bridge(["serve", "--name", "km-dev", "--port", "0", "--store", str(tmp_path / "dev"),
                                     "--token", TOKEN, "--trust", str(pub)], tmp_path, "agent")
    try:
        ws.sql(f"CREATE OR REPLACE DEVICE 'km-dev' OPTIONS (url = '{listening[0]['url']}', token = '{TOKEN}')")
        ws.sql(f"CREATE OR REPLACE MODEL km_dev OPTIONS (model_type = 'kmeans', num_clusters = 4) "
               f"AS SELECT {FEATURES} FROM penguins")
        r = ws.sql("DEPLOY MODEL km_dev TO DEVICE 'km-dev'")
        assert "Deployed km_dev@1 to km-dev" in r.message
        q = "SELECT CENTROID_ID, NEAREST_CENTROIDS_DISTANCE FROM ML.PREDICT(MODEL km_dev, TABLE penguins{})"
        remote = ws.sql(q.format(", STRUCT('km-dev' AS device)")).table.to_pylist()
        local = ws.sql(q.format("")).table.to_pylist()
        assert len(remote) == 344 and [r["CENTROID_ID"] for r in remote] == [r["CENTROID_ID"] for r in local]
        # float32 distances on the device against float64 here: ~1e-7 relative
        assert max(abs(a["DISTANCE"] - b["DISTANCE"]) / max(1.0, b["DISTANCE"])
                   for x, y in zip(remote, local) for a, b in zip(x["NEAREST_CENTROIDS_DISTANCE"],
                                                                  y["NEAREST_CENTROIDS_DISTANCE"])) < 1e-5
    finally:
        agent.kill()

"""CREATE MODEL of kmeans and pca on Spark, with Spark ML, where the rows are.

The encoding is learnt and applied by the DuckDB path's own code on Arrow batches in the
executors (``mlsql.ml.features``: each numeric column's mean, each string column's categories;
then the float32 matrix), its standardization from column sums computed by Spark, and the
standardized rows assembled into Spark ML's vector column. Then:

- ``kmeans``: ``pyspark.ml.clustering.KMeans`` (``RANDOM``: initMode 'random'; ``KMEANS++``: Spark's
  parallel k-means||), ``distanceMeasure`` 'euclidean' or 'cosine', ``maxIter = max_iterations``
  and ``tol``: Spark's convergence rule stops when no centroid moves farther than ``tol`` (in the
  standardized space), so ``early_stop`` means ``tol = min_rel_progress`` and ``early_stop =
  FALSE`` means ``tol = 0`` (until nothing moves, or max_iterations). ``CUSTOM``: Spark ML's
  estimator takes no starting centroids, so the RDD-based ``pyspark.mllib.clustering.KMeans``
  (the implementation Spark ML's wraps) is given them as its ``initialModel``: a classic session's.
- ``pca``: ``pyspark.ml.feature.PCA``; its components get scikit-learn's signs, its explained
  variance gives the ratios.

The result is the same ``KMeansModel`` / ``PCAModel`` the DuckDB path makes: prediction, evaluation,
centroids and anomalies then run the same code on either engine. The training statistics that
ML.DETECT_ANOMALIES needs (each centroid's median distance, every training row's score) are
computed in the executors by that code as well.
"""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pyarrow as pa

from mlsql.engines.spark import score as S
from mlsql.engines.spark.train import (
    add_column_summaries,
    prepare,  # noqa: F401 - the trainer's other half, shared with supervised types
)
from mlsql.errors import TrainingError, UnknownColumnError
from mlsql.ml.features import MAX_CATEGORIES, FeatureSpec, _kind, encode
from mlsql.ml.unsupervised import KMeansModel, PCAModel

FEATURES = "__mlsql_features"
INIT = "__mlsql_init"


def _find(columns: list[str], name: str) -> str | None:
    return {c.lower(): c for c in columns}.get(name.lower())


# -- executor side -------------------------------------------------------------------------------
def _statistics(numeric: list[str], categorical: list[str], batches):
    """Per partition: each numeric column's sum, count and whether any value is finite (its mean
    fills NULLs), each string column's values."""
    sums = {c: [0.0, 0, False] for c in numeric}
    cats: dict[str, set] = {c: set() for c in categorical}
    n = 0
    for b in batches:
        t = pa.Table.from_batches([b])
        n += t.num_rows
        add_column_summaries(t, numeric, categorical, sums, cats)
    yield pa.RecordBatch.from_arrays([pa.array([json.dumps({"n": n, "sums": sums,
                                                            "cats": {c: sorted(v) for c, v in cats.items()}})])],
                                     names=["stats"])


def _encode(specs: list[dict], init_col: str | None, batches):
    """The float32 design matrix (columns f0, f1, ...) and, for CUSTOM, the init flag."""
    import pyarrow.compute as pc

    specs = [FeatureSpec(**s) for s in specs]
    width = sum(s.width for s in specs)
    for b in batches:
        t = pa.Table.from_batches([b])
        X = encode(t, specs)
        arrays = [pa.array(X[:, j]) for j in range(width)]
        names = [f"f{j}" for j in range(width)]
        if init_col is not None:
            arrays.append(pc.fill_null(t.column(init_col).cast(pa.bool_()), False).combine_chunks())
            names.append(INIT)
        yield pa.RecordBatch.from_arrays(arrays, names=names)


def _per_row(blob, width: int, what: str, batches):
    """Per encoded row, with the fitted estimator: kmeans, its nearest centroid and the distance
    ('nearest'), or its normalized distance ('normalized'); pca, its reconstruction error ('error')."""
    from mlsql.ml import kmeans as K

    est = S._model(blob)
    for b in batches:
        if b.num_rows == 0:
            continue
        X = np.column_stack([b.column(j).to_numpy(zero_copy_only=False) for j in range(width)])
        if what == "error":
            yield pa.RecordBatch.from_arrays([pa.array(est.reconstruction_error(X), pa.float64())], names=["score"])
            continue
        D = est.distances(X)
        labels = D.argmin(axis=1)
        if what == "nearest":
            yield pa.RecordBatch.from_arrays([pa.array(labels, pa.int64()),
                                              pa.array(D[np.arange(len(D)), labels], pa.float64())],
                                             names=["label", "distance"])
        else:
            yield pa.RecordBatch.from_arrays([pa.array(K.normalized_distance(D, est.medians), pa.float64())],
                                             names=["score"])


# -- driver side ---------------------------------------------------------------------------------
def train(engine, df, opts, progress=None):
    """Train the kmeans or pca model ``opts`` describes on the Spark DataFrame ``df``."""
    F = engine._functions()
    columns = df.columns
    init_col = None
    if opts.model_type == "kmeans" and opts.kmeans_init_col:
        init_col = _find(columns, opts.kmeans_init_col)
        if init_col is None:
            raise UnknownColumnError(opts.kmeans_init_col, columns,
                                     message=f"kmeans_init_col '{opts.kmeans_init_col}' is not a column of the "
                                             "training query")
    names = [c for c in columns if c != init_col]
    if not names:
        raise TrainingError("The training query has no feature columns")
    schema = S.arrow_schema(df)
    kinds = {}
    for name in names:
        kinds[name] = _kind(schema.field(name).type)
        if kinds[name] is None:
            raise TrainingError(
                f"Column '{name}' has type {schema.field(name).type}, which cannot be a model feature",
                hint="Use numbers, booleans, dates or strings; turn lists and structs into columns first.")
    numeric = [c for c in names if kinds[c] == "numeric"]
    categorical = [c for c in names if kinds[c] == "categorical"]
    stats = [json.loads(r["stats"]) for r in
             df.mapInArrow(partial(_statistics, numeric, categorical), "stats string").collect()]
    n = sum(s["n"] for s in stats)
    if n == 0:
        raise TrainingError("The training query returned no rows")
    specs = []
    for name in names:
        at = str(schema.field(name).type)
        if kinds[name] == "numeric":
            s0, c0, finite = 0.0, 0, False
            for s in stats:
                a, b, f = s["sums"][name]
                s0, c0, finite = s0 + a, c0 + b, finite or f
            specs.append(FeatureSpec(name, "numeric", at, mean=s0 / c0 if finite and c0 else 0.0, encoding="value"))
        else:
            cats = sorted({v for s in stats for v in s["cats"][name]})
            if len(cats) > MAX_CATEGORIES:
                raise TrainingError(
                    f"Column '{name}' has {len(cats):,} distinct values; at most {MAX_CATEGORIES:,} are supported",
                    hint="Group rare values, hash them into buckets, or leave the column out.")
            specs.append(FeatureSpec(name, "categorical", at, categories=cats, encoding="onehot"))
    width = sum(s.width for s in specs)
    enc_schema = pa.schema([(f"f{j}", pa.float32()) for j in range(width)]
                           + ([(INIT, pa.bool_())] if init_col else []))
    encoded = df.mapInArrow(partial(_encode, [s.to_dict() for s in specs], init_col), S._struct(enc_schema)).persist()
    try:
        # the standardization's sums: float64 sums of the float32 matrix, as the DuckDB path takes them
        row = encoded.agg(*[F.sum(F.col(f"f{j}").cast("double")).alias(f"s{j}") for j in range(width)],
                          *[F.sum(F.col(f"f{j}").cast("double") ** 2).alias(f"q{j}") for j in range(width)]).first()
        sums = np.array([row[f"s{j}"] for j in range(width)], dtype=np.float64)
        squares = np.array([row[f"q{j}"] for j in range(width)], dtype=np.float64)
        if opts.model_type == "kmeans":
            model = _kmeans(engine, F, encoded, specs, width, n, sums, squares, opts, init_col, progress)
        else:
            model = _pca(engine, F, encoded, specs, width, n, sums, squares, opts, progress)
    finally:
        encoded.unpersist()
    return model


def _assembled(F, encoded, width: int, shift: np.ndarray, scale: np.ndarray, extra=()):
    """The standardized rows as Spark ML's vector column (doubles, as the DuckDB path computes them)."""
    from pyspark.ml.feature import VectorAssembler

    z = encoded.select(*[((F.col(f"f{j}").cast("double") - F.lit(float(shift[j]))) / F.lit(float(scale[j])))
                         .alias(f"z{j}") for j in range(width)], *extra)
    return VectorAssembler(inputCols=[f"z{j}" for j in range(width)], outputCol=FEATURES).transform(z)


def _scores(F, frame, n: int) -> np.ndarray:
    """The ``score`` column as the model keeps it (``mlsql.ml.kmeans.stored_scores``): every value,
    or beyond MAX_STORED_SCORES that many quantiles (Spark's percentile_approx)."""
    from mlsql.ml.kmeans import MAX_STORED_SCORES, stored_scores

    if n <= MAX_STORED_SCORES:
        return stored_scores(np.array([r[0] for r in frame.select("score").collect()], dtype=np.float64))
    probs = np.linspace(0.0, 1.0, MAX_STORED_SCORES).tolist()
    got = frame.agg(F.percentile_approx("score", probs, 100_000)).first()[0]
    return np.sort(np.asarray(got, dtype=np.float64))


def _kmeans(engine, F, encoded, specs, width, n, sums, squares, opts, init_col, progress):
    import time

    from mlsql.ml import kmeans as K

    shift, scale = K.shift_scale_from_sums(specs, n, sums, squares, opts.standardize_features, center_all=False)
    extra = [F.col(INIT)] if init_col else []
    rows = _assembled(F, encoded, width, shift, scale, extra)
    tol = opts.min_rel_progress if opts.early_stop else 0.0
    t0 = time.perf_counter()
    if opts.kmeans_init_method == "custom":
        centers, cost, iterations = _custom_kmeans(engine, rows, opts, init_col, tol)
    else:
        from pyspark.ml.clustering import KMeans

        k = opts.num_clusters or K.default_clusters(n)
        if n < k:
            raise TrainingError(f"kmeans with num_clusters = {k} needs at least {k} rows; the training query "
                                f"returned {n}")
        km = KMeans(k=k, featuresCol=FEATURES, initMode="random" if opts.kmeans_init_method == "random"
                    else "k-means||", seed=opts.random_seed, maxIter=opts.max_iterations, tol=tol,
                    distanceMeasure=opts.distance_type)
        fitted = km.fit(rows)
        centers = [np.asarray(c, dtype=np.float64) for c in fitted.clusterCenters()]
        cost, iterations = float(fitted.summary.trainingCost), int(fitted.summary.numIter)
    history = [{"iteration": iterations, "loss": cost / n, "eval_loss": None, "learning_rate": None,
                "duration_ms": (time.perf_counter() - t0) * 1000.0}]
    if progress is not None:
        progress(iterations, opts.max_iterations, history[0])
    est = K.KMeansEstimator(np.vstack(centers), shift, scale, opts.distance_type, iterations=iterations)
    # ML.DETECT_ANOMALIES' baseline: each centroid's median distance, then every row's normalized distance
    blob = S.model_bytes(est)
    near = encoded.mapInArrow(partial(_per_row, blob, width, "nearest"), "label long, distance double")
    med = {r["label"]: r["m"] for r in near.groupBy("label").agg(F.percentile("distance", 0.5).alias("m")).collect()}
    est.medians = np.array([float(med.get(j, 1.0)) for j in range(len(centers))])
    blob = S.model_bytes(est)
    est.scores = _scores(F, encoded.mapInArrow(partial(_per_row, blob, width, "normalized"), "score double"), n)
    model = KMeansModel.trained(opts, specs, est, history, n, {})
    model.eval_metrics = S.unsupervised_metrics(model, encoded.select(*[f"f{j}" for j in range(width)]), None,
                                                encoded_width=width).metrics
    return model


def _custom_kmeans(engine, rows, opts, init_col, tol):
    """CUSTOM: the flagged rows as the first centroids of Spark's RDD-based k-means (Spark ML's
    estimator takes none), which needs a classic session's SparkContext."""
    if getattr(engine, "remote", None) is not None:
        raise TrainingError("kmeans_init_method = 'CUSTOM' trains on a classic Spark session, not Spark Connect",
                            hint="Use 'KMEANS++' or 'RANDOM' here, or train on DuckDB.")
    from pyspark.mllib.clustering import KMeans as RDDKMeans
    from pyspark.mllib.clustering import KMeansModel as RDDKMeansModel
    from pyspark.mllib.linalg import Vectors as RDDVectors

    first = [np.asarray(r[0].toArray(), dtype=np.float64) for r in rows.where(INIT).select(FEATURES).collect()]
    k = opts.num_clusters or len(first)
    if len(first) != k:
        raise TrainingError(f"kmeans_init_col '{init_col}' is TRUE on {len(first)} rows; num_clusters = {k} "
                            f"needs exactly {k}",
                            hint="Mark one row per cluster, or leave num_clusters out to take their count.")
    if opts.distance_type == "cosine":
        first = [c / (np.linalg.norm(c) or 1.0) for c in first]
    vectors = rows.select(FEATURES).rdd.map(lambda r: RDDVectors.fromML(r[0])).cache()
    try:
        fitted = RDDKMeans.train(vectors, k, maxIterations=opts.max_iterations, epsilon=tol,
                                 initialModel=RDDKMeansModel([RDDVectors.dense(c) for c in first]),
                                 distanceMeasure=opts.distance_type, seed=opts.random_seed)
        centers = [np.asarray(c, dtype=np.float64) for c in fitted.clusterCenters]
        cost = float(fitted.computeCost(vectors))
        try:  # the JVM model knows how many iterations ran; Python's wrapper does not say
            iterations = int(fitted._java_model.numIter())
        except Exception:
            iterations = opts.max_iterations
    finally:
        vectors.unpersist()
    return centers, cost, iterations


def _pca(engine, F, encoded, specs, width, n, sums, squares, opts, progress):
    import time

    from pyspark.ml.feature import PCA

    from mlsql.ml import pca as P
    from mlsql.ml.kmeans import shift_scale_from_sums

    if n < 2:
        raise TrainingError("pca needs at least 2 rows")
    t0 = time.perf_counter()
    shift, scale = shift_scale_from_sums(specs, n, sums, squares, opts.scale_features, center_all=True)
    limit = min(n, width)
    if opts.num_principal_components is not None and opts.num_principal_components > limit:
        raise TrainingError(f"num_principal_components = {opts.num_principal_components}, but {n} rows of "
                            f"{width} encoded columns have at most {limit} components")
    k = opts.num_principal_components or limit
    fitted = PCA(k=k, inputCol=FEATURES).fit(_assembled(F, encoded, width, shift, scale))
    ratios_all = np.asarray(fitted.explainedVariance.toArray(), dtype=np.float64)
    comps_all = np.asarray(fitted.pc.toArray(), dtype=np.float64).T  # Spark: one component per column
    keep = P.components_to_keep(ratios_all, opts)
    # the total variance of the standardized columns (n - 1 denominator), from the same sums
    mean = sums / n
    var = np.maximum(squares - n * mean**2, 0.0) / (n - 1) / scale**2
    total = float(var.sum())
    est = P.PCAEstimator(P.sign_convention(comps_all[:keep]), ratios_all[:keep] * total, ratios_all[:keep], shift,
                         scale, total_variance=total)
    blob = S.model_bytes(est)
    est.scores = _scores(F, encoded.mapInArrow(partial(_per_row, blob, width, "error"), "score double"), n)
    history = [{"iteration": 1, "loss": float(1.0 - est.ratios.sum()), "eval_loss": None, "learning_rate": None,
                "duration_ms": (time.perf_counter() - t0) * 1000.0}]
    if progress is not None:
        progress(1, 1, history[0])
    return PCAModel.trained(opts, specs, est, history, n, P.evaluation(est).metrics)

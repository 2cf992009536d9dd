"""k-means (``model_type = 'kmeans'``) with BigQuery ML's options, on the encoded matrix.

The features are encoded as for linear models (numbers as they are, NULL → the training mean;
strings one-hot over the training categories plus a column for NULL and unseen values), and with
``standardize_features`` (the default) each numerical column is scaled to mean 0 and standard
deviation 1 (population, over the training rows); one-hot columns are left as 0/1.

The fit is Lloyd's algorithm in float64, written here so that its iterations are BigQuery ML's:
``max_iterations`` (assign every row to its nearest centroid, move each centroid to the mean of its
rows), ``early_stop`` when the loss (the mean squared distance to the nearest centroid; cosine: the
mean cosine distance) improves by less than ``min_rel_progress`` of itself, and one row of
ML.TRAINING_INFO per iteration. A centroid that loses all its rows keeps its place. The first
centroids are scikit-learn's choice for ``random_seed``: ``KMEANS++`` is
``sklearn.cluster.kmeans_plusplus`` on the centred rows, exactly as ``KMeans(init='k-means++')``
seeds itself, and ``RANDOM`` the rows ``KMeans(init='random')`` draws; so the model is the one
``sklearn.cluster.KMeans(init=..., n_init=1, tol=0, max_iter=<its iterations>, random_state=seed)``
finds on the same matrix (tests/test_model_types.py checks it). ``CUSTOM`` starts from the rows
whose ``kmeans_init_col`` is TRUE. ``distance_type = 'COSINE'`` is spherical k-means, as Spark ML
does it: rows and centroids on the unit sphere, distance 1 - cosine similarity.

On Spark the same model is fitted by Spark ML (``mlsql.engines.spark.unsupervised``); prediction,
evaluation, centroids and anomalies use this module on either engine.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlsql.errors import ModelError, TrainingError
from mlsql.ml import metrics as M
from mlsql.ml.features import FeatureSpec
from mlsql.ml.options import early_stop_reason

MAX_STORED_SCORES = 100_000  # training anomaly scores kept exactly; beyond, this many quantiles of them


def default_clusters(n_rows: int) -> int:
    """BigQuery ML chooses num_clusters from the row count when it is not given: MLSQL takes
    round(log10(rows)), at least 2."""
    return max(2, int(round(math.log10(max(n_rows, 1)))))


def standardization(X: np.ndarray, specs: list[FeatureSpec], scale_numeric: bool, center_all: bool,
                    weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The shift and scale of each encoded column: numerical columns centred and (``scale_numeric``)
    divided by their population standard deviation; one-hot columns centred only with
    ``center_all`` (PCA centres every column; k-means leaves 0/1 columns as they are)."""
    d = X.shape[1]
    shift, scale = np.zeros(d), np.ones(d)
    mean, sq, n = np.zeros(d), np.zeros(d), 0
    for a in range(0, len(X), 500_000):  # float64 sums without a float64 copy of X
        xb = X[a:a + 500_000].astype(np.float64)
        mean += xb.sum(axis=0)
        sq += (xb * xb).sum(axis=0)
        n += len(xb)
    mean /= max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean**2, 0.0))
    return _shift_scale(specs, mean, std, scale_numeric, center_all, shift, scale)


def _shift_scale(specs, mean, std, scale_numeric, center_all, shift=None, scale=None):
    d = len(mean)
    shift = np.zeros(d) if shift is None else shift
    scale = np.ones(d) if scale is None else scale
    j = 0
    for s in specs:
        if s.encoding == "onehot":
            if center_all:
                shift[j:j + s.width] = mean[j:j + s.width]
            j += s.width
            continue
        if scale_numeric or center_all:
            shift[j] = mean[j]
        if scale_numeric and std[j] > 1e-12:
            scale[j] = std[j]
        j += 1
    return shift, scale


def shift_scale_from_sums(specs, n: int, sums: np.ndarray, squares: np.ndarray, scale_numeric: bool,
                          center_all: bool) -> tuple[np.ndarray, np.ndarray]:
    """``standardization`` from column sums and sums of squares (an engine that sums in parts)."""
    mean = sums / max(n, 1)
    std = np.sqrt(np.maximum(squares / max(n, 1) - mean**2, 0.0))
    return _shift_scale(specs, mean, std, scale_numeric, center_all)


def _unit(Z: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(Z, axis=1, keepdims=True)
    return Z / np.where(norm > 0, norm, 1.0)


def squared_distances(Z: np.ndarray, C: np.ndarray) -> np.ndarray:
    """||z - c||² for every row and centroid, [n, k], never below 0."""
    d2 = (Z * Z).sum(axis=1)[:, None] - 2.0 * Z @ C.T + (C * C).sum(axis=1)[None, :]
    return np.maximum(d2, 0.0)


class KMeansEstimator:
    """The centroids (in the standardized space) and how to get there from the encoded matrix."""

    kind = "kmeans"
    encoding = "onehot"

    def __init__(self, centroids=None, shift=None, scale=None, distance: str = "euclidean", medians=None,
                 scores=None, iterations: int = 0):
        self.centroids = centroids  # [k, d] float64, standardized space (cosine: unit length)
        self.shift, self.scale = shift, scale
        self.distance = distance
        self.medians = medians  # [k]: the median distance of each centroid's training rows (anomalies)
        self.scores = scores  # sorted normalized distances of the training rows (or their quantiles)
        self.iterations = iterations

    # -- the standardized space -------------------------------------------------------------
    def standardized(self, X) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.shift) / self.scale

    def distances(self, X) -> np.ndarray:
        """The distance of each row to each centroid, [n, k]: Euclidean, or 1 - cosine similarity."""
        Z = self.standardized(X)
        return _distances(Z, self.centroids, self.distance)

    def predict_raw(self, X) -> np.ndarray:
        return self.distances(X)

    # -- training ---------------------------------------------------------------------------
    def fit(self, X, opts, specs, init_rows: np.ndarray | None, progress=None) -> list[dict]:
        n = len(X)
        k = opts.num_clusters or default_clusters(n)
        if init_rows is not None:
            k = opts.num_clusters or int(init_rows.sum())
        if n < k:
            raise TrainingError(f"kmeans with num_clusters = {k} needs at least {k} rows; the training query "
                                f"returned {n}")
        self.distance = opts.distance_type
        self.shift, self.scale = standardization(X, specs, opts.standardize_features, center_all=False)
        Z = self.standardized(X)
        if self.distance == "cosine":
            Z = _unit(Z)
        C = initial_centroids(Z, k, opts.kmeans_init_method, opts.random_seed, init_rows, opts.kmeans_init_col)
        if self.distance == "cosine":
            C = _unit(C)
        labels, best = _assign(Z, C, self.distance)
        prev = _loss(best, self.distance)
        history: list[dict] = []
        t0 = time.perf_counter()
        for it in range(1, opts.max_iterations + 1):
            C = _update(Z, labels, C, self.distance)
            new_labels, best = _assign(Z, C, self.distance)
            loss = _loss(best, self.distance)
            now = time.perf_counter()
            row = {"iteration": it, "loss": loss, "eval_loss": None, "learning_rate": None,
                   "duration_ms": (now - t0) * 1000.0}
            t0 = now
            history.append(row)
            if progress is not None:
                progress(it, opts.max_iterations, row)
            if np.array_equal(new_labels, labels):  # a fixed point: another iteration moves nothing
                break
            labels = new_labels
            if opts.early_stop and prev > 0 and (prev - loss) / prev < opts.min_rel_progress:
                if progress is not None and it < opts.max_iterations:
                    progress(it, opts.max_iterations, {**row, "stopped": early_stop_reason(
                        "loss", opts.min_rel_progress, "iteration")})
                break
            prev = loss
        self.centroids, self.iterations = C, len(history)
        self.set_anomaly_baseline(X)
        return history

    def set_anomaly_baseline(self, X) -> None:
        """Each centroid's median distance over its training rows, and the training rows' normalized
        distances (what ML.DETECT_ANOMALIES' contamination is a quantile of)."""
        D = self.distances(X)
        labels = D.argmin(axis=1)
        near = D[np.arange(len(D)), labels]
        self.medians = np.array([float(np.median(near[labels == j])) if (labels == j).any() else 1.0
                                 for j in range(len(self.centroids))])
        self.scores = stored_scores(normalized_distance(D, self.medians))

    # -- persistence ------------------------------------------------------------------------
    def contributions(self, X):
        raise ModelError("ML.EXPLAIN_PREDICT is not available for kmeans models",
                         hint="ML.CENTROIDS shows what each cluster is made of.")

    def importance(self):
        return None

    def save(self, folder):
        folder = Path(folder)
        np.savez(folder / "kmeans.npz", centroids=self.centroids, shift=self.shift, scale=self.scale,
                 medians=self.medians, scores=self.scores)
        (folder / "estimator.json").write_text(json.dumps(
            {"kind": self.kind, "distance": self.distance, "iterations": self.iterations}))

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        meta = json.loads((folder / "estimator.json").read_text())
        z = np.load(folder / "kmeans.npz")
        return cls(z["centroids"], z["shift"], z["scale"], meta["distance"], z["medians"], z["scores"],
                   meta.get("iterations", 0))


def _distances(Z: np.ndarray, C: np.ndarray, distance: str) -> np.ndarray:
    if distance == "cosine":
        return np.clip(1.0 - _unit(Z) @ C.T, 0.0, 2.0)
    return np.sqrt(squared_distances(Z, C))


def _assign(Z: np.ndarray, C: np.ndarray, distance: str) -> tuple[np.ndarray, np.ndarray]:
    """The nearest centroid of each row and its distance (Euclidean: squared)."""
    if distance == "cosine":
        d = 1.0 - Z @ C.T
    else:
        d = squared_distances(Z, C)
    labels = d.argmin(axis=1)
    return labels, d[np.arange(len(d)), labels]


def _loss(best: np.ndarray, distance: str) -> float:
    return float(best.mean())


def _update(Z: np.ndarray, labels: np.ndarray, C: np.ndarray, distance: str) -> np.ndarray:
    """Each centroid at the mean of its rows (cosine: then back on the unit sphere); one with no
    rows stays where it was."""
    k, d = C.shape
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    has = counts > 0
    # each cluster's rows summed in one pass: the rows ordered by cluster, summed segment by segment
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    sums = np.zeros((k, d))
    sums[has] = np.add.reduceat(Z[order], starts[has], axis=0)
    out = C.copy()
    out[has] = sums[has] / counts[has, None]
    if distance == "cosine":
        out[has] = _unit(out[has])
    return out


def initial_centroids(Z: np.ndarray, k: int, method: str, seed: int, init_rows: np.ndarray | None,
                      init_col: str | None) -> np.ndarray:
    """The first centroids: scikit-learn's k-means++ or random rows for ``seed`` (the rows its
    ``KMeans`` would start from), or the rows ``init_rows`` marks (CUSTOM)."""
    n = len(Z)
    if method == "custom":
        chosen = np.flatnonzero(init_rows)
        if len(chosen) != k:
            raise TrainingError(f"kmeans_init_col '{init_col}' is TRUE on {len(chosen)} rows; num_clusters = {k} "
                                f"needs exactly {k}",
                                hint="Mark one row per cluster, or leave num_clusters out to take their count.")
        return Z[chosen].copy()
    if method == "kmeans++":
        from sklearn.cluster import kmeans_plusplus

        # sklearn's KMeans centres its input before seeding: the same rows for the same seed
        _, idx = kmeans_plusplus(Z - Z.mean(axis=0), k, random_state=seed)
        return Z[idx].copy()
    w = np.ones(n)
    idx = np.random.RandomState(seed).choice(n, size=k, replace=False, p=w / w.sum())
    return Z[idx].copy()


# -- what the model gives -------------------------------------------------------------------------
def predictions(est: KMeansEstimator, X) -> pa.Table:
    """ML.PREDICT's columns: CENTROID_ID (1-based) and NEAREST_CENTROIDS_DISTANCE, every centroid
    with its distance, nearest first (BigQuery ML's names)."""
    return predictions_of(est.distances(X))


def predictions_of(D: np.ndarray) -> pa.Table:
    """ML.PREDICT's columns from the distances of each row to each centroid, [n, k]."""
    D = np.asarray(D, dtype=np.float64)
    n, k = D.shape
    order = np.argsort(D, axis=1, kind="stable")
    ids = pa.array((order + 1).ravel(), pa.int64())
    dist = pa.array(np.take_along_axis(D, order, axis=1).ravel(), pa.float64())
    structs = pa.StructArray.from_arrays([ids, dist], names=["CENTROID_ID", "DISTANCE"])
    nearest = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), structs)
    return pa.table({"CENTROID_ID": pa.array(order[:, 0] + 1, pa.int64()), "NEAREST_CENTROIDS_DISTANCE": nearest})


PREDICTION_SCHEMA = pa.schema([
    ("CENTROID_ID", pa.int64()),
    ("NEAREST_CENTROIDS_DISTANCE", pa.list_(pa.struct([("CENTROID_ID", pa.int64()), ("DISTANCE", pa.float64())]))),
])


def evaluation(est: KMeansEstimator, X) -> M.Evaluation:
    """ML.EVALUATE's davies_bouldin_index and mean_squared_distance of these rows: each row assigned
    to its nearest centroid; the index over the model's centroids (clusters with no row left out)."""
    return combine_evaluation(est, [evaluation_sums(est, X)])


def evaluation_sums(est: KMeansEstimator, X) -> dict:
    """What ML.EVALUATE adds up over rows (per batch, on an engine that scores in parts): rows and
    summed distance per centroid, summed squared distance."""
    D = est.distances(X)
    labels = D.argmin(axis=1)
    near = D[np.arange(len(D)), labels]
    k = D.shape[1]
    return {"n": len(D), "counts": np.bincount(labels, minlength=k).tolist(),
            "dist": np.bincount(labels, weights=near, minlength=k).tolist(), "sq": float((near**2).sum())}


def combine_evaluation(est: KMeansEstimator, parts: list[dict]) -> M.Evaluation:
    n = sum(p["n"] for p in parts)
    if n == 0:
        raise ModelError("No rows to evaluate the kmeans model on")
    counts = np.sum([p["counts"] for p in parts], axis=0)
    dist = np.sum([p["dist"] for p in parts], axis=0)
    spread = dist / np.maximum(counts, 1)
    msd = sum(p["sq"] for p in parts) / n
    return M.Evaluation(cluster_metrics(est.centroids, est.distance, counts, spread, msd), rows=int(n))


def cluster_metrics(C: np.ndarray, distance: str, counts: np.ndarray, spread: np.ndarray, msd: float) -> dict:
    """davies_bouldin_index (mean over clusters of the worst (s_i + s_j) / d(c_i, c_j), s the mean
    distance of a cluster's rows to its centroid) and mean_squared_distance."""
    used = np.flatnonzero(counts > 0)
    db = None
    if len(used) > 1:
        Cu = C[used]
        sep = _distances(Cu, Cu, distance) if distance == "cosine" else np.sqrt(squared_distances(Cu, Cu))
        s = spread[used]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (s[:, None] + s[None, :]) / sep
        np.fill_diagonal(ratio, -np.inf)
        ratio[~np.isfinite(ratio)] = -np.inf
        db = float(np.max(ratio, axis=1).mean())
    return {"davies_bouldin_index": db, "mean_squared_distance": msd}


def centroids_table(est: KMeansEstimator, specs: list[FeatureSpec], standardize: bool = False) -> pa.Table:
    """ML.CENTROIDS: one row per centroid and feature: ``numerical_value`` for a number (in its
    own units, or standardized), ``categorical_value`` for a string: each category (NULL: NULL and
    unseen values) with the centroid's value, the share of the cluster's rows in it."""
    C = est.centroids if (standardize or est.distance == "cosine") else est.centroids * est.scale + est.shift
    rows = []
    for cid in range(len(C)):
        j = 0
        for f in specs:
            if f.encoding == "onehot":
                cats = [*f.categories, None]
                rows.append((cid + 1, f.name, None, [{"category": c, "value": float(v)}
                                                     for c, v in zip(cats, C[cid, j:j + len(cats)])]))
                j += len(cats)
            else:
                rows.append((cid + 1, f.name, float(C[cid, j]), None))
                j += 1
    cv = pa.list_(pa.struct([("category", pa.string()), ("value", pa.float64())]))
    return pa.table({"centroid_id": pa.array([r[0] for r in rows], pa.int64()),
                     "feature": pa.array([r[1] for r in rows], pa.string()),
                     "numerical_value": pa.array([r[2] for r in rows], pa.float64()),
                     "categorical_value": pa.array([r[3] for r in rows], cv)})


# -- anomalies ------------------------------------------------------------------------------------
def normalized_distance(D: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """The smallest of a row's distances to each centroid, each divided by that centroid's median
    training distance (BigQuery ML's normalized_distance)."""
    return (D / np.where(medians > 0, medians, 1.0)[None, :]).min(axis=1)


def stored_scores(scores: np.ndarray) -> np.ndarray:
    """The training rows' anomaly scores as the model keeps them: all of them, sorted, or beyond
    MAX_STORED_SCORES that many evenly spaced quantiles."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if len(s) > MAX_STORED_SCORES:
        s = np.quantile(s, np.linspace(0.0, 1.0, MAX_STORED_SCORES))
    return s


def threshold(scores: np.ndarray, contamination: float) -> float:
    """The score above which a row is an anomaly: the (1 - contamination) quantile of the training
    rows' scores (numpy's linear interpolation)."""
    return float(np.quantile(scores, 1.0 - contamination))


def detect_anomalies(est: KMeansEstimator, X, contamination: float) -> pa.Table:
    """ML.DETECT_ANOMALIES of a kmeans model: ``is_anomaly`` (normalized_distance above the training
    rows' (1 - contamination) quantile of it), ``normalized_distance``, ``CENTROID_ID``."""
    D = est.distances(X)
    nd = normalized_distance(D, est.medians)
    cut = threshold(est.scores, contamination)
    return pa.table({"is_anomaly": pa.array(nd > cut, pa.bool_()),
                     "normalized_distance": pa.array(nd, pa.float64()),
                     "CENTROID_ID": pa.array(D.argmin(axis=1) + 1, pa.int64())})


ANOMALY_SCHEMA = pa.schema([("is_anomaly", pa.bool_()), ("normalized_distance", pa.float64()),
                            ("CENTROID_ID", pa.int64())])

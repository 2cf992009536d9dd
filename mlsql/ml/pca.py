"""Principal component analysis (``model_type = 'pca'``) with BigQuery ML's options.

The features are encoded as for linear models (numbers as they are, NULL → the training mean;
strings one-hot over the training categories plus a column for NULL and unseen values), every
column is centred on its training mean and, with ``scale_features`` (the default), each numerical
column divided by its population standard deviation. On DuckDB scikit-learn's ``PCA`` fits that
matrix (``pca_solver``: 'full', 'randomized' or 'auto', seeded with ``random_seed``); on Spark,
Spark ML's ``PCA`` (``mlsql.engines.spark.unsupervised``). Either way the components are stored
with scikit-learn's sign convention (each component's largest coefficient in absolute value is
positive), so the two engines give the same columns.

``num_principal_components`` keeps that many components; ``pca_explained_variance_ratio`` the
fewest whose cumulative explained variance ratio reaches it (all of them fitted first, with the
'full' solver). ML.PREDICT gives ``principal_component_1`` … ``principal_component_k``: the
standardized row times each component.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlsql.errors import ModelError, TrainingError
from mlsql.ml import metrics as M
from mlsql.ml.features import FeatureSpec
from mlsql.ml.kmeans import standardization, stored_scores, threshold


def sign_convention(components: np.ndarray) -> np.ndarray:
    """Components with scikit-learn's signs (``svd_flip`` on V): the largest coefficient of each, in
    absolute value, positive."""
    C = np.array(components, dtype=np.float64, copy=True)
    big = np.argmax(np.abs(C), axis=1)
    signs = np.sign(C[np.arange(len(C)), big])
    signs[signs == 0] = 1.0
    return C * signs[:, None]


def components_to_keep(ratios: np.ndarray, opts) -> int:
    """How many components the options ask for, of those fitted (their explained variance ratios)."""
    if opts.num_principal_components is not None:
        return min(opts.num_principal_components, len(ratios))
    cum = np.cumsum(ratios)
    # the fewest reaching the ratio (a hair below it counts: float sums of ratios that add up to it exactly)
    return int(min(len(ratios), np.searchsorted(cum, opts.pca_explained_variance_ratio - 1e-12) + 1))


class PCAEstimator:
    """The principal components (rows of ``components``, in the standardized space) and the
    standardization that leads there from the encoded matrix."""

    kind = "pca"
    encoding = "onehot"

    def __init__(self, components=None, eigenvalues=None, ratios=None, shift=None, scale=None, scores=None,
                 total_variance: float = 0.0):
        self.components = components  # [k, d]
        self.eigenvalues = eigenvalues  # [k]: variance along each component (n - 1 denominator)
        self.ratios = ratios  # [k]: each eigenvalue over the total variance
        self.shift, self.scale = shift, scale
        self.scores = scores  # sorted reconstruction errors of the training rows (ML.DETECT_ANOMALIES)
        self.total_variance = total_variance

    def standardized(self, X) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.shift) / self.scale

    def transform(self, X) -> np.ndarray:
        return self.standardized(X) @ self.components.T

    def predict_raw(self, X) -> np.ndarray:
        return self.transform(X)

    def reconstruction_error(self, X) -> np.ndarray:
        """Each row's mean squared error (over the encoded columns, standardized) once rebuilt from
        its principal components."""
        Z = self.standardized(X)
        R = Z - (Z @ self.components.T) @ self.components
        return (R * R).mean(axis=1)

    def fit(self, X, opts, specs, progress=None) -> list[dict]:
        from sklearn.decomposition import PCA

        n, d = X.shape
        if n < 2:
            raise TrainingError("pca needs at least 2 rows")
        t0 = time.perf_counter()
        self.shift, self.scale = standardization(X, specs, opts.scale_features, center_all=True)
        Z = self.standardized(X)
        limit = min(n, d)
        if opts.num_principal_components is not None and opts.num_principal_components > limit:
            raise TrainingError(f"num_principal_components = {opts.num_principal_components}, but {n} rows of "
                                f"{d} encoded columns have at most {limit} components")
        k = opts.num_principal_components
        solver = opts.pca_solver
        if k is None:  # a variance ratio: every component, then the fewest that reach it
            k, solver = limit, "full"
        if solver == "randomized" and k >= limit:
            solver = "full"  # the randomized solver needs fewer components than min(rows, columns)
        pca = PCA(n_components=k, svd_solver=solver, random_state=opts.random_seed).fit(Z)
        keep = components_to_keep(pca.explained_variance_ratio_, opts)
        self.components = sign_convention(pca.components_[:keep])
        self.eigenvalues = np.asarray(pca.explained_variance_[:keep], dtype=np.float64)
        self.ratios = np.asarray(pca.explained_variance_ratio_[:keep], dtype=np.float64)
        self.total_variance = float(Z.var(axis=0, ddof=1).sum())
        self.scores = stored_scores(self.reconstruction_error(X))
        row = {"iteration": 1, "loss": float(1.0 - self.ratios.sum()), "eval_loss": None, "learning_rate": None,
               "duration_ms": (time.perf_counter() - t0) * 1000.0}
        if progress is not None:
            progress(1, 1, row)
        return [row]

    def contributions(self, X):
        raise ModelError("ML.EXPLAIN_PREDICT is not available for pca models",
                         hint="ML.PRINCIPAL_COMPONENTS shows each component's coefficients.")

    def importance(self):
        return None

    def save(self, folder):
        folder = Path(folder)
        np.savez(folder / "pca.npz", components=self.components, eigenvalues=self.eigenvalues, ratios=self.ratios,
                 shift=self.shift, scale=self.scale, scores=self.scores)
        (folder / "estimator.json").write_text(json.dumps({"kind": self.kind, "total_variance": self.total_variance}))

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        meta = json.loads((folder / "estimator.json").read_text())
        z = np.load(folder / "pca.npz")
        return cls(z["components"], z["eigenvalues"], z["ratios"], z["shift"], z["scale"], z["scores"],
                   meta.get("total_variance", 0.0))


def column_names(k: int) -> list[str]:
    return [f"principal_component_{i + 1}" for i in range(k)]


def predictions(est: PCAEstimator, X) -> pa.Table:
    """ML.PREDICT's columns: principal_component_1 … principal_component_k."""
    return predictions_of(est.transform(X))


def predictions_of(P: np.ndarray) -> pa.Table:
    P = np.asarray(P, dtype=np.float64)
    return pa.table({name: pa.array(P[:, i], pa.float64()) for i, name in enumerate(column_names(P.shape[1]))})


EMBEDDING_SCHEMA = pa.schema([("ml_generate_embedding_result", pa.list_(pa.float64()))])


def embeddings(est: PCAEstimator, X) -> pa.Table:
    """ML.GENERATE_EMBEDDING's column: each row's projection as one ARRAY<DOUBLE> of k values (the
    same numbers as ML.PREDICT's principal_component_1 … k), built from the matrix without a row loop."""
    P = np.ascontiguousarray(est.transform(X), dtype=np.float64)
    n, k = P.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.table([pa.ListArray.from_arrays(offsets, pa.array(P.ravel()))], schema=EMBEDDING_SCHEMA)


def evaluation(est: PCAEstimator, X=None) -> M.Evaluation:
    """ML.EVALUATE's total_explained_variance_ratio: of the training rows (``X`` None), or the share of
    these rows' variance (about the training mean, standardized) that the components keep."""
    if X is None:
        return M.Evaluation({"total_explained_variance_ratio": float(est.ratios.sum())})
    return combine_evaluation(est, [evaluation_sums(est, X)])


def evaluation_sums(est: PCAEstimator, X) -> dict:
    """What ML.EVALUATE adds up over rows (per batch, on an engine that scores in parts): the rows'
    count, sums and sums of squares, standardized and projected."""
    Z = est.standardized(X)
    P = Z @ est.components.T
    return {"n": len(Z), "z": Z.sum(axis=0).tolist(), "zz": float((Z * Z).sum()),
            "p": P.sum(axis=0).tolist(), "pp": float((P * P).sum())}


def combine_evaluation(est: PCAEstimator, parts: list[dict]) -> M.Evaluation:
    """The variance of the rows about their own mean, and the share of it along the components."""
    n = sum(p["n"] for p in parts)
    if n < 2:
        raise ModelError("ML.EVALUATE of a pca model needs at least 2 rows")
    z = np.sum([p["z"] for p in parts], axis=0)
    pr = np.sum([p["p"] for p in parts], axis=0)
    total = sum(p["zz"] for p in parts) - float(z @ z) / n
    kept = sum(p["pp"] for p in parts) - float(pr @ pr) / n
    return M.Evaluation({"total_explained_variance_ratio": kept / total if total > 0 else 0.0}, rows=int(n))


def components_table(est: PCAEstimator, specs: list[FeatureSpec]) -> pa.Table:
    """ML.PRINCIPAL_COMPONENTS: one row per component and feature: ``numerical_value`` (a number's
    coefficient) or ``categorical_value`` (a string's: each category, NULL for NULL and unseen values)."""
    rows = []
    for pid, comp in enumerate(est.components):
        j = 0
        for f in specs:
            if f.encoding == "onehot":
                cats = [*f.categories, None]
                rows.append((pid + 1, f.name, None, [{"category": c, "value": float(v)}
                                                     for c, v in zip(cats, comp[j:j + len(cats)])]))
                j += len(cats)
            else:
                rows.append((pid + 1, f.name, float(comp[j]), None))
                j += 1
    cv = pa.list_(pa.struct([("category", pa.string()), ("value", pa.float64())]))
    return pa.table({"principal_component_id": pa.array([r[0] for r in rows], pa.int64()),
                     "feature": pa.array([r[1] for r in rows], pa.string()),
                     "numerical_value": pa.array([r[2] for r in rows], pa.float64()),
                     "categorical_value": pa.array([r[3] for r in rows], cv)})


def component_info(est: PCAEstimator) -> pa.Table:
    """ML.PRINCIPAL_COMPONENT_INFO: eigenvalue, explained_variance_ratio and its running sum per component."""
    k = len(est.ratios)
    return pa.table({"principal_component_id": pa.array(np.arange(1, k + 1), pa.int64()),
                     "eigenvalue": pa.array(est.eigenvalues, pa.float64()),
                     "explained_variance_ratio": pa.array(est.ratios, pa.float64()),
                     "cumulative_explained_variance_ratio": pa.array(np.cumsum(est.ratios), pa.float64())})


def detect_anomalies(est: PCAEstimator, X, contamination: float) -> pa.Table:
    """ML.DETECT_ANOMALIES of a pca model: ``is_anomaly`` (the row's reconstruction error above the
    training rows' (1 - contamination) quantile of it) and that ``mean_squared_error``."""
    err = est.reconstruction_error(X)
    return pa.table({"is_anomaly": pa.array(err > threshold(est.scores, contamination), pa.bool_()),
                     "mean_squared_error": pa.array(err, pa.float64())})


ANOMALY_SCHEMA = pa.schema([("is_anomaly", pa.bool_()), ("mean_squared_error", pa.float64())])

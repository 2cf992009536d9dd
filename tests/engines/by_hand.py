"""Expected answers that do not come from MLSQL: the tables in raw DuckDB, the data split,
encoding and scores written out with numpy, xgboost called directly, metrics from sklearn.

What a model *learnt* (its categories, coefficients, booster) is read from the trained model;
how MLSQL applies it (SQL for TRANSFORM, the encoding, scoring, metrics, splits) is redone here
from BigQuery ML's definitions, so a test compares MLSQL with something that is not itself."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


def raw_duckdb(session, tables):
    """A plain ``duckdb.connect()`` holding ``tables`` of ``session``'s workspace, exported once as Arrow
    (the workspace's catalog file stays MLSQL's: it is attached behind a lock, one process at a time)."""
    import duckdb

    con = duckdb.connect()
    for t in tables:
        con.register(t, session.sql(f"SELECT * FROM {t}").table)
    return con


def training_query(body: str) -> str:
    """The query of a ``CREATE MODEL`` body (``[TRANSFORM (...)] OPTIONS (...) AS <query>``)."""
    return re.split(r"\)\s+AS\s+", body.split("OPTIONS", 1)[1], maxsplit=1)[1]


def option(body: str, name: str, default=None):
    m = re.search(rf"{name}\s*=\s*(?:\['(\w+)'\]|'(\w+)'|([\d.]+))", body)
    if m is None:
        return default
    label, text, number = m.groups()
    return label or text or float(number)


def eval_mask(n: int, method: str, fraction: float, seed: int = 42) -> np.ndarray:
    """Evaluation rows of BigQuery ML's ``data_split_method`` as MLSQL documents it: 'random' draws
    one uniform number per row from numpy's default generator seeded with ``random_seed`` (42) and
    holds out those below the fraction; 'seq' holds out the last ``round(n * fraction)`` rows."""
    if method == "random":
        return np.random.default_rng(seed).random(n) < fraction
    mask = np.zeros(n, dtype=bool)
    mask[n - int(round(n * fraction)):] = True
    return mask


def transformed(con, tf, rows: pa.Table) -> pa.Table:
    """The fitted TRANSFORM's items (SQL, as the model stored them) run by raw DuckDB on ``rows``;
    an item whose input column is absent is left out, as for a label at prediction time."""
    have = {c.lower() for c in rows.column_names}
    items = [f'{sql} AS "{name}"' for name, sql in tf.items
             if all(c.lower() in have for c in tf.reads.get(name, []))]
    con.register("by_hand_rows", rows)
    try:
        return con.sql(f"SELECT {', '.join(items)} FROM by_hand_rows").to_arrow_table()
    finally:
        con.unregister("by_hand_rows")


def encode(features, rows: pa.Table) -> np.ndarray:
    """BigQuery ML's automatic encoding of ``rows``: a number as it is (NULL and NaN → the training
    mean), a string one-hot over the training categories plus one column for NULL and unseen
    values (linear models) or its index in them (trees). Rounded to float32 at the end: the
    model's input matrix is float32 (mlsql.ml.features), so a score computed from these values
    differs from the model's only by the order of its sums."""
    cols = []
    by_lower = {c.lower(): c for c in rows.column_names}
    for f in features:
        values = rows.column(by_lower[f.name.lower()]).to_pylist()
        if f.kind == "numeric":
            x = np.array([np.nan if v is None else float(v) for v in values])
            cols.append(np.where(np.isnan(x), f.mean, x)[:, None])
            continue
        index = {c: i for i, c in enumerate(f.categories)}
        codes = np.array([index.get(v, len(f.categories)) for v in values])
        if f.encoding == "ordinal":
            cols.append(codes[:, None].astype(np.float64))
        else:
            cols.append((codes[:, None] == np.arange(len(f.categories) + 1)).astype(np.float64))
    return np.hstack(cols).astype(np.float32).astype(np.float64)


def scores(model, X: np.ndarray) -> np.ndarray:
    """Class probabilities [n, k] (a regressor: values [n]) from the model's learnt parameters:
    xgboost's own predict on its booster; a linear model's margin X·coef + intercept through
    scipy's logistic or softmax."""
    from scipy.special import expit, softmax

    est = model.estimator
    if est.kind == "xgboost":
        p = np.asarray(est.booster.inplace_predict(X.astype(np.float32)), dtype=np.float64)
        if est.objective == "binary:logistic":
            return np.stack([1.0 - p, p], axis=1)
        return p.reshape(len(X), -1) if est.objective == "multi:softprob" else p
    margin = X @ est.coef.T + est.intercept
    if est.link == "identity":
        return margin[:, 0]
    if est.link == "sigmoid":
        p = expit(margin[:, 0])
        return np.stack([1.0 - p, p], axis=1)
    return softmax(margin, axis=1)


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    """ML.EVALUATE's regression metrics by sklearn (mean_squared_log_error only where it is defined)."""
    from sklearn import metrics as skm

    out = {"mean_absolute_error": skm.mean_absolute_error(y, pred),
           "mean_squared_error": skm.mean_squared_error(y, pred),
           "median_absolute_error": skm.median_absolute_error(y, pred),
           "r2_score": skm.r2_score(y, pred),
           "explained_variance": skm.explained_variance_score(y, pred)}
    if (y > -1).all() and (pred > -1).all():
        out["mean_squared_log_error"] = skm.mean_squared_log_error(y, pred)
    return {k: float(v) for k, v in out.items()}


def predicted_codes(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    if probs.shape[1] == 2:
        return (probs[:, 1] >= (0.5 if threshold is None else threshold)).astype(np.int64)
    return probs.argmax(axis=1)


def classification_metrics(codes: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> dict:
    """ML.EVALUATE's classification metrics by sklearn: for two classes the second is the positive
    one; for more, precision and recall are macro averages, roc_auc the macro one-vs-rest average,
    and f1_score BigQuery ML's harmonic mean of those two averages (not sklearn's mean of per-class F1)."""
    from sklearn import metrics as skm

    k = probs.shape[1]
    pred = predicted_codes(probs, threshold)
    labels = list(range(k))
    if k == 2:
        precision = skm.precision_score(codes, pred, zero_division=0)
        recall = skm.recall_score(codes, pred, zero_division=0)
        auc = skm.roc_auc_score(codes, probs[:, 1])
    else:
        precision = skm.precision_score(codes, pred, labels=labels, average="macro", zero_division=0)
        recall = skm.recall_score(codes, pred, labels=labels, average="macro", zero_division=0)
        auc = skm.roc_auc_score(codes, probs, multi_class="ovr", average="macro", labels=labels)
    return {"precision": float(precision), "recall": float(recall),
            "accuracy": float(skm.accuracy_score(codes, pred)),
            "f1_score": float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0,
            # the mean negative log of each row's probability of its true class, as written: sklearn's
            # log_loss would renormalize xgboost's float32 probabilities (they sum to 1 within ~1e-7)
            "log_loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(codes)), codes], 1e-15, 1.0)))),
            "roc_auc": float(auc)}


def label_codes(model, rows: pa.Table) -> tuple[np.ndarray, pa.Table]:
    """The rows whose label is one of the model's classes, and each one's class index."""
    values = rows.column(model.label).to_pylist()
    keep = [v is not None for v in values]
    index = {c: i for i, c in enumerate(model.classes)}
    return np.array([index[v] for v in values if v is not None]), rows.filter(pa.array(keep))


def evaluate(model, rows: pa.Table, con=None, tf=None, threshold: float | None = None) -> dict:
    """ML.EVALUATE of ``model`` on ``rows`` (raw columns; ``tf``: the model's fitted TRANSFORM)."""
    if model.task == "regression":
        rows = rows.filter(pa.array([v is not None for v in rows.column(model.label).to_pylist()]))
        y = np.array(rows.column(model.label).to_pylist(), dtype=np.float64)
        return regression_metrics(y, scores(model, encode(model.features, _inputs(con, tf, rows))))
    codes, rows = label_codes(model, rows)
    probs = scores(model, encode(model.features, _inputs(con, tf, rows)))
    return classification_metrics(codes, probs, threshold)


def _inputs(con, tf, rows: pa.Table) -> pa.Table:
    return rows if tf is None else transformed(con, tf, rows)


@dataclass
class Column:
    """How one input column is encoded, learnt by hand from the training rows."""

    name: str
    kind: str  # 'numeric' | 'categorical'
    mean: float | None = None
    categories: list | None = None
    encoding: str = "onehot"


def columns_of(rows: pa.Table, names: list[str], encoding: str = "onehot") -> list[Column]:
    """Each column's encoding learnt from the training ``rows``: a number's mean, a string's sorted values."""
    out = []
    for name in names:
        col = rows.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out.append(Column(name, "categorical", categories=sorted(set(col.drop_null().to_pylist())),
                              encoding=encoding))
        else:
            x = np.array([np.nan if v is None else float(v) for v in col.to_pylist()])
            out.append(Column(name, "numeric", mean=float(np.nanmean(x))))
    return out


def linear_reg(rows: pa.Table, label: str, eval_rows: np.ndarray):
    """linear_reg fitted by sklearn (least squares, no penalty) on the training rows, encoded by
    hand; returns (the encoding, the fitted LinearRegression)."""
    from sklearn.linear_model import LinearRegression

    train = rows.filter(pa.array(~eval_rows))
    cols = columns_of(train, [c for c in rows.column_names if c != label])
    y = np.array(train.column(label).to_pylist(), dtype=np.float64)
    return cols, LinearRegression().fit(encode(cols, train), y)

"""Evaluation metrics with BigQuery ML's names, computed on numpy arrays."""

from __future__ import annotations

import numpy as np

EPS = 1e-15


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    err = pred - y
    mse = float(np.mean(err**2))
    var = float(np.var(y))
    if (y > -1).all() and (pred > -1).all():
        msle = float(np.mean((np.log1p(pred) - np.log1p(y)) ** 2))
    else:
        msle = None
    return {
        "mean_absolute_error": float(np.mean(np.abs(err))),
        "mean_squared_error": mse,
        "mean_squared_log_error": msle,
        "median_absolute_error": float(np.median(np.abs(err))),
        "r2_score": 1.0 - mse / var if var > 0 else 0.0,
        "explained_variance": 1.0 - float(np.var(err)) / var if var > 0 else 0.0,
    }


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties share their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values
    diff = np.concatenate(([True], xs[1:] != xs[:-1], [True]))
    idx = np.flatnonzero(diff)
    starts, ends = idx[:-1], idx[1:]
    avg = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(pos: np.ndarray, score: np.ndarray) -> float | None:
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    r = _rank(score)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(codes: np.ndarray, probs: np.ndarray, threshold: float | None = None,
                           weights: np.ndarray | None = None) -> dict[str, float | None]:
    """``codes``: true class indices; ``probs``: [n, k] probabilities."""
    n, k = probs.shape
    p_true = np.clip(probs[np.arange(n), codes], EPS, 1.0)
    log_loss = float(-np.mean(np.log(p_true)))
    if k == 2:
        t = 0.5 if threshold is None else threshold
        pred = (probs[:, 1] >= t).astype(np.int64)
        pos = codes == 1
        tp = int(np.sum(pred[pos] == 1))
        fp = int(np.sum(pred[~pos] == 1))
        fn = int(np.sum(pred[pos] == 0))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        auc = roc_auc(pos, probs[:, 1])
    else:
        pred = probs.argmax(axis=1)
        precs, recs, aucs = [], [], []
        for c in range(k):
            is_c, said_c = codes == c, pred == c
            tp = int(np.sum(is_c & said_c))
            precs.append(tp / said_c.sum() if said_c.sum() else 0.0)
            recs.append(tp / is_c.sum() if is_c.sum() else 0.0)
            a = roc_auc(is_c, probs[:, c])
            if a is not None:
                aucs.append(a)
        precision, recall = float(np.mean(precs)), float(np.mean(recs))
        auc = float(np.mean(aucs)) if aucs else None
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": float(precision),
        "recall": float(recall),
        "accuracy": float(np.mean(pred == codes)),
        "f1_score": float(f1),
        "log_loss": log_loss,
        "roc_auc": auc,
    }


def confusion(codes: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """[k, k] counts: row = expected class, column = predicted class."""
    return np.bincount(codes * k + pred, minlength=k * k).reshape(k, k)


def roc_points(pos: np.ndarray, score: np.ndarray, n_points: int = 101) -> dict[str, np.ndarray]:
    """ROC curve at score quantiles, as BigQuery ML's ML.ROC_CURVE columns."""
    thresholds = np.unique(np.quantile(score, np.linspace(0, 1, n_points)))[::-1]
    s_pos = np.sort(score[pos])
    s_neg = np.sort(score[~pos])
    # count of scores >= t
    tp = len(s_pos) - np.searchsorted(s_pos, thresholds, side="left")
    fp = len(s_neg) - np.searchsorted(s_neg, thresholds, side="left")
    fn = len(s_pos) - tp
    tn = len(s_neg) - fp
    recall = tp / max(len(s_pos), 1)
    fpr = fp / max(len(s_neg), 1)
    return {
        "threshold": thresholds.astype(np.float64),
        "recall": recall.astype(np.float64),
        "false_positive_rate": fpr.astype(np.float64),
        "true_positives": tp.astype(np.int64),
        "false_positives": fp.astype(np.int64),
        "true_negatives": tn.astype(np.int64),
        "false_negatives": fn.astype(np.int64),
    }

"""Evaluation metrics with BigQuery ML's names, computed on numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class RocCurve:
    """One ROC curve: the exact curve over every distinct score, with collinear points dropped
    (which keeps its area), so ``auc`` is the ``roc_auc`` metric."""

    label: str
    false_positive_rate: np.ndarray
    true_positive_rate: np.ndarray
    thresholds: np.ndarray
    auc: float

    def to_dict(self) -> dict:
        return {"label": self.label, "false_positive_rate": self.false_positive_rate.tolist(),
                "true_positive_rate": self.true_positive_rate.tolist(),
                "thresholds": [None if not np.isfinite(t) else float(t) for t in self.thresholds],
                "auc": self.auc}

    @classmethod
    def from_dict(cls, d: dict) -> RocCurve:
        thr = np.array([np.inf if t is None else t for t in d["thresholds"]], dtype=np.float64)
        return cls(str(d["label"]), np.asarray(d["false_positive_rate"], np.float64),
                   np.asarray(d["true_positive_rate"], np.float64), thr, float(d["auc"]))


@dataclass
class Evaluation:
    """Metrics and the curves behind them, from one pass over the scored rows.

    ``roc``: one curve for a binary classifier (positive = the second class), one per class
    (one-vs-rest) otherwise; ``confusion``: [k, k] counts, row = expected, column = predicted."""

    metrics: dict
    classes: list = field(default_factory=list)
    roc: list[RocCurve] = field(default_factory=list)
    confusion: np.ndarray | None = None
    rows: int = 0

    def to_dict(self) -> dict:
        return {"classes": self.classes, "roc": [r.to_dict() for r in self.roc], "rows": self.rows,
                "confusion": None if self.confusion is None else self.confusion.tolist()}

    @classmethod
    def from_dict(cls, d: dict, metrics: dict) -> Evaluation:
        cm = d.get("confusion")
        return cls(metrics, list(d.get("classes") or []), [RocCurve.from_dict(r) for r in d.get("roc", [])],
                   None if cm is None else np.asarray(cm, dtype=np.int64), int(d.get("rows", 0)))


def roc_exact(pos: np.ndarray, score: np.ndarray, label: str = "", max_points: int = 2000) -> RocCurve | None:
    """The ROC curve at every distinct score (None when one class is absent)."""
    pos = np.asarray(pos, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], pos[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each run of equal scores
    tps = np.cumsum(p)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thr = np.r_[np.inf, s[last]]
    auc = float(np.trapezoid(tpr, fpr))
    if len(tpr) > 2:  # drop points in the middle of a straight segment: the area stays the same
        keep = np.r_[True, np.logical_or(np.diff(fpr, 2) != 0, np.diff(tpr, 2) != 0), True]
        tpr, fpr, thr = tpr[keep], fpr[keep], thr[keep]
    if len(tpr) > max_points:  # a picture needs no more; the area was taken before thinning
        idx = np.unique(np.r_[np.linspace(0, len(tpr) - 1, max_points).astype(np.int64), len(tpr) - 1])
        tpr, fpr, thr = tpr[idx], fpr[idx], thr[idx]
    return RocCurve(label, fpr, tpr, thr, auc)


def evaluation(codes: np.ndarray, probs: np.ndarray, classes: list, threshold: float | None = None) -> Evaluation:
    """``classification_metrics`` plus the ROC curve(s) and the confusion matrix of the same rows."""
    n, k = probs.shape
    metrics = classification_metrics(codes, probs, threshold)
    if k == 2:
        t = 0.5 if threshold is None else threshold
        pred = (probs[:, 1] >= t).astype(np.int64)
        curves = [roc_exact(codes == 1, probs[:, 1], str(classes[1]))]
    else:
        pred = probs.argmax(axis=1)
        curves = [roc_exact(codes == c, probs[:, c], str(classes[c])) for c in range(k)]
    return Evaluation(metrics, list(classes), [c for c in curves if c is not None], confusion(codes, pred, k), n)

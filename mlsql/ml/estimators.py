"""Estimators on the encoded float32 matrix: xgboost boosted trees and linear/logistic models.

Each implements the protocol in docs/INTERNALS.md: fit → per-iteration history,
predict_raw, contributions (SHAP: tree SHAP from xgboost, exact for linear),
importance, save/load.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from mlsql.errors import TrainingError
from mlsql.ml.options import early_stop_reason


def _threads(opts) -> int:
    return opts.num_threads or os.cpu_count() or 1


class XGBEstimator:
    kind = "xgboost"
    encoding = "ordinal"

    def __init__(self, booster=None, objective: str = "", n_out: int = 1):
        self.booster = booster
        self.objective = objective
        self.n_out = n_out

    def fit(self, X, y, w, X_eval, y_eval, opts, task, n_classes, progress):
        import xgboost as xgb

        if task == "regression":
            objective, metric = "reg:squarederror", "rmse"
        elif n_classes == 2:
            objective, metric = "binary:logistic", "logloss"
        else:
            objective, metric = "multi:softprob", "mlogloss"
        params = {
            "objective": objective,
            "eval_metric": metric,
            "eta": opts.learn_rate,
            "max_depth": opts.max_tree_depth,
            "alpha": opts.l1_reg,
            "lambda": opts.l2_reg,
            "subsample": opts.subsample,
            "colsample_bytree": opts.colsample_bytree,
            "colsample_bylevel": opts.colsample_bylevel,
            "colsample_bynode": opts.colsample_bynode,
            "gamma": opts.min_split_loss,
            "min_child_weight": opts.min_tree_child_weight,
            "num_parallel_tree": opts.num_parallel_tree,
            "tree_method": opts.tree_method,
            "booster": opts.booster_type,
            "nthread": _threads(opts),
            "seed": opts.random_seed,
            "verbosity": 0,
        }
        if objective == "multi:softprob":
            params["num_class"] = n_classes
        if task == "regression":
            params["base_score"] = float(np.average(y, weights=w)) if len(y) else 0.0
        dtrain = xgb.QuantileDMatrix(X, label=y, weight=w, nthread=params["nthread"]) \
            if opts.tree_method == "hist" else xgb.DMatrix(X, label=y, weight=w, nthread=params["nthread"])
        evals = [(dtrain, "train")]
        if X_eval is not None:
            deval = xgb.DMatrix(X_eval, label=y_eval, nthread=params["nthread"])
            evals.append((deval, "eval"))
        history: list[dict] = []
        total = opts.max_iterations

        class Recorder(xgb.callback.TrainingCallback):
            def __init__(self):
                self.t0 = time.perf_counter()

            def after_iteration(self, model, epoch, evals_log):
                now = time.perf_counter()
                loss = evals_log["train"][metric][-1]
                eval_loss = evals_log["eval"][metric][-1] if "eval" in evals_log else None
                if metric == "rmse":  # report MSE like BigQuery ML's loss for regressors
                    loss = loss**2
                    eval_loss = eval_loss**2 if eval_loss is not None else None
                row = {"iteration": epoch + 1, "loss": float(loss),
                       "eval_loss": None if eval_loss is None else float(eval_loss),
                       "learning_rate": opts.learn_rate, "duration_ms": (now - self.t0) * 1000.0}
                self.t0 = now
                history.append(row)
                if progress is not None:
                    progress(epoch + 1, total, row)
                if opts.early_stop and len(history) >= 2:
                    key = "eval_loss" if eval_loss is not None else "loss"
                    prev, cur = history[-2][key], history[-1][key]
                    if prev > 0 and (prev - cur) / prev < opts.min_rel_progress:
                        if progress is not None:  # the bar ends as a finished run, saying why it is short
                            progress(epoch + 1, total, {**row, "stopped": early_stop_reason(
                                key, opts.min_rel_progress, "iteration")})
                        return True
                return False

        self.booster = xgb.train(params, dtrain, num_boost_round=total, evals=evals,
                                 verbose_eval=False, callbacks=[Recorder()])
        self.objective = objective
        self.n_out = n_classes if objective == "multi:softprob" else 1
        return history

    def predict_raw(self, X):
        p = self.booster.inplace_predict(X, validate_features=False)
        if self.objective == "binary:logistic":
            p = p.astype(np.float64)
            return np.stack([1.0 - p, p], axis=1)
        if self.objective == "multi:softprob":
            return p.astype(np.float64).reshape(len(X), -1)
        return p.astype(np.float64)

    def contributions(self, X):
        import xgboost as xgb

        c = self.booster.predict(xgb.DMatrix(X), pred_contribs=True, validate_features=False)
        if c.ndim == 2:
            c = c[:, None, :]
        return c.astype(np.float64)

    def importance(self):
        b = self.booster
        out: dict[str, dict[str, float]] = {}
        for kind, key in (("weight", "weight"), ("total_gain", "gain"), ("total_cover", "cover")):
            for f, v in b.get_score(importance_type=kind).items():
                out.setdefault(f, {"weight": 0.0, "gain": 0.0, "cover": 0.0})[key] = float(v)
        return out

    def save(self, folder):
        folder = Path(folder)
        self.booster.save_model(str(folder / "xgboost.json"))
        (folder / "estimator.json").write_text(json.dumps(
            {"kind": self.kind, "objective": self.objective, "n_out": self.n_out}))

    @classmethod
    def load(cls, folder):
        import xgboost as xgb

        folder = Path(folder)
        meta = json.loads((folder / "estimator.json").read_text())
        b = xgb.Booster()
        b.load_model(str(folder / "xgboost.json"))
        return cls(b, meta["objective"], meta["n_out"])


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# The logistic model's loss and gradient, shared by the DuckDB path (chunks of the encoded matrix)
# and the Spark path (Arrow batches in the executors). All of it is float64: with float32 margins
# the gradient carried ~1e-7 relative rounding that depends on the BLAS kernel the CPU gets
# (SkylakeX and Haswell kernels gave log_loss 8e-5 apart after the same 20 L-BFGS iterations);
# in float64 two engines differ only by the order of their sums (~1e-16 per addition).
LOGISTIC_CHUNK = 65_536  # rows per float64 block: bounded memory whatever the table's size
LOGISTIC_GTOL = 1e-9  # L-BFGS-B's projected-gradient stop; float64 gradients are exact far below it


def logistic_margin(X, mean, std, W, b):
    """Margins (rows × outputs) and the standardized rows of the model with standardized
    coefficients ``W`` and intercepts ``b``, on encoded float32 rows, in float64."""
    Z = (np.asarray(X, dtype=np.float64) - mean) / std
    return Z @ W.T + b, Z


def logistic_sums(X, y, w, mean, std, W, b, k: int):
    """Σ w·loss, Σ w·∂loss/∂W and Σ w·∂loss/∂b over these rows (labels ``y`` as class indices),
    unnormalized so that blocks and partitions add up."""
    m, Z = logistic_margin(X, mean, std, W, b)
    if k == 2:
        m = m[:, 0]
        r = (_sigmoid(m) - y) * w
        return float(w @ (np.logaddexp(0.0, m) - y * m)), (r @ Z)[None, :], np.array([r.sum()])
    yi = np.asarray(y, dtype=np.int64)
    lse = np.logaddexp.reduce(m, axis=1)
    r = _softmax(m)
    r[np.arange(len(yi)), yi] -= 1.0
    r *= w[:, None]
    return float(w @ (lse - m[np.arange(len(yi)), yi])), r.T @ Z, r.sum(axis=0)


def logistic_objective(loss, gW, gb, wsum: float, W, l2: float, l1: float):
    """The mean loss and gradient from the sums, with the L2 and (smoothed) L1 penalties."""
    loss, gW, gb = loss / wsum, gW / wsum, gb / wsum
    loss += 0.5 * l2 * float((W**2).sum()) + l1 * float(np.sqrt(W**2 + 1e-12).sum())
    gW = gW + l2 * W + l1 * W / np.sqrt(W**2 + 1e-12)
    return loss, np.concatenate([np.asarray(gW, dtype=np.float64).ravel(), np.asarray(gb, dtype=np.float64)])


class LinearEstimator:
    """linear_reg (least squares, ridge/lasso) and logistic_reg (L-BFGS), on standardized inputs."""

    kind = "linear"
    encoding = "onehot"

    def __init__(self, coef=None, intercept=None, link: str = "identity", x_mean=None, x_std=None):
        self.coef = coef
        self.intercept = intercept
        self.link = link
        self.x_mean = x_mean
        self.x_std = x_std

    # -- training --------------------------------------------------------------
    def fit(self, X, y, w, X_eval, y_eval, opts, task, n_classes, progress):
        n, d = X.shape
        wn = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
        wsum = wn.sum()
        mean = np.zeros(d)
        sq = np.zeros(d)
        gram = np.zeros((d, d))
        step = 500_000
        for a in range(0, n, step):  # float64 statistics without a float64 copy of X
            xb = X[a:a + step].astype(np.float64)
            wb = wn[a:a + step]
            mean += wb @ xb
            sq += wb @ (xb * xb)
            if task == "regression":
                gram += (xb * wb[:, None]).T @ xb
        mean /= wsum
        var = np.maximum(sq / wsum - mean**2, 0.0)
        std = np.sqrt(var)
        std[std < 1e-12] = 1.0
        self.x_mean, self.x_std = mean, std
        t0 = time.perf_counter()
        if task == "regression":
            history = self._fit_least_squares(X, y, wn, wsum, gram, X_eval, y_eval, opts, progress, t0)
        else:
            history = self._fit_logistic(X, y, wn, X_eval, y_eval, opts, n_classes, progress, t0)
        return history

    def _fit_least_squares(self, X, y, w, wsum, gram, X_eval, y_eval, opts, progress, t0):
        mean, std = self.x_mean, self.x_std
        y_mean = float(w @ y / wsum)
        xty = np.zeros(len(mean))
        step = 500_000
        for a in range(0, len(y), step):
            xty += (X[a:a + step].astype(np.float64) * w[a:a + step, None]).T @ (y[a:a + step] - y_mean)
        # centred, standardized Gram matrix and right-hand side (per row)
        cov = (gram / wsum - np.outer(mean, mean)) / np.outer(std, std)
        rhs = xty / wsum / std
        d = len(mean)
        l2 = opts.l2_reg / wsum
        history = []
        if opts.l1_reg == 0:
            a = cov + l2 * np.eye(d)
            beta, *_ = np.linalg.lstsq(a, rhs, rcond=1e-10)
            iters = [beta]
        else:  # proximal gradient (ISTA) on the quadratic form
            l1 = opts.l1_reg / wsum
            lip = float(np.linalg.eigvalsh(cov + l2 * np.eye(d)).max()) or 1.0
            beta = np.zeros(d)
            iters = []
            for _ in range(max(opts.max_iterations, 1) * 10):
                g = (cov + l2 * np.eye(d)) @ beta - rhs
                z = beta - g / lip
                beta = np.sign(z) * np.maximum(np.abs(z) - l1 / lip, 0.0)
                iters.append(beta.copy())
            iters = iters[9::10]
        for i, b in enumerate(iters, start=1):
            self._set_from_standardized(b[None, :], np.array([y_mean]))
            loss = float(np.average((self._margin(X)[:, 0] - y) ** 2, weights=w))
            ev = float(np.mean((self._margin(X_eval)[:, 0] - y_eval) ** 2)) if X_eval is not None else None
            now = time.perf_counter()
            row = {"iteration": i, "loss": loss, "eval_loss": ev, "learning_rate": None,
                   "duration_ms": (now - t0) * 1000.0}
            t0 = now
            history.append(row)
            if progress is not None:
                progress(i, len(iters), row)
        self.link = "identity"
        return history

    def _fit_logistic(self, X, y, w, X_eval, y_eval, opts, k, progress, t0):
        from scipy.optimize import minimize

        mean, std = self.x_mean, self.x_std
        n, d = X.shape
        wsum = float(w.sum())
        n_out = 1 if k == 2 else k
        l2, l1 = opts.l2_reg / n, opts.l1_reg / n

        last: dict[bytes, tuple] = {}  # the callback asks again for the point L-BFGS-B just evaluated

        def loss_grad(theta):
            key = theta.tobytes()
            if key not in last:
                W = theta[: n_out * d].reshape(n_out, d)
                b = theta[n_out * d:]
                loss, gW, gb = 0.0, np.zeros((n_out, d)), np.zeros(n_out)
                for a in range(0, n, LOGISTIC_CHUNK):
                    part = logistic_sums(X[a:a + LOGISTIC_CHUNK], y[a:a + LOGISTIC_CHUNK], w[a:a + LOGISTIC_CHUNK],
                                         mean, std, W, b, k)
                    loss, gW, gb = loss + part[0], gW + part[1], gb + part[2]
                last.clear()
                last[key] = logistic_objective(loss, gW, gb, wsum, W, l2, l1)
            return last[key]

        history: list[dict] = []
        state = {"t0": t0}
        self.link = "sigmoid" if k == 2 else "softmax"

        def callback(theta):
            W = theta[: n_out * d].reshape(n_out, d)
            self._set_from_standardized(W, theta[n_out * d:])
            loss = loss_grad(theta)[0]
            ev = None
            if X_eval is not None:
                p = self.predict_raw(X_eval)
                ev = float(-np.mean(np.log(np.clip(p[np.arange(len(y_eval)), y_eval], 1e-15, 1))))
            now = time.perf_counter()
            row = {"iteration": len(history) + 1, "loss": float(loss), "eval_loss": ev,
                   "learning_rate": None, "duration_ms": (now - state["t0"]) * 1000.0}
            state["t0"] = now
            history.append(row)
            if progress is not None:
                progress(len(history), opts.max_iterations, row)

        theta0 = np.zeros(n_out * d + n_out)
        res = minimize(loss_grad, theta0, jac=True, method="L-BFGS-B", callback=callback,
                       options={"maxiter": opts.max_iterations, "gtol": LOGISTIC_GTOL})
        W = res.x[: n_out * d].reshape(n_out, d)
        self._set_from_standardized(W, res.x[n_out * d:])
        self.link = "sigmoid" if k == 2 else "softmax"
        if not history:
            callback(res.x)
        return history

    def _set_from_standardized(self, W, b):
        """Coefficients on standardized inputs → coefficients on the encoded matrix as is."""
        W = np.atleast_2d(W)
        self.coef = W / self.x_std
        self.intercept = np.asarray(b, dtype=np.float64) - self.coef @ self.x_mean

    # -- prediction --------------------------------------------------------------
    def _margin(self, X):
        return X.astype(np.float64, copy=False) @ self.coef.T + self.intercept

    def predict_raw(self, X):
        m = self._margin(X)
        if self.link == "identity":
            return m[:, 0]
        if self.link == "sigmoid":
            p = _sigmoid(m[:, 0])
            return np.stack([1.0 - p, p], axis=1)
        return _softmax(m)

    def contributions(self, X):
        """Exact attributions in the margin: coef * (x - training mean); last column = baseline."""
        Xd = X.astype(np.float64, copy=False)
        contrib = (Xd - self.x_mean)[:, None, :] * self.coef[None, :, :]
        base = self.intercept + self.coef @ self.x_mean
        base = np.broadcast_to(base[None, :, None], (len(X), len(base), 1))
        return np.concatenate([contrib, base], axis=2)

    def importance(self):
        return None

    def save(self, folder):
        folder = Path(folder)
        np.savez(folder / "linear.npz", coef=self.coef, intercept=self.intercept,
                 x_mean=self.x_mean, x_std=self.x_std)
        (folder / "estimator.json").write_text(json.dumps({"kind": self.kind, "link": self.link}))

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        meta = json.loads((folder / "estimator.json").read_text())
        z = np.load(folder / "linear.npz")
        return cls(z["coef"], z["intercept"], meta["link"], z["x_mean"], z["x_std"])


def make_estimator(opts):
    fam = opts.family
    if fam in ("boosted_tree", "random_forest"):  # a forest: xgboost's random-forest mode (mlsql.ml.options)
        return XGBEstimator()
    if fam == "linear":
        return LinearEstimator()
    try:
        from mlsql.ml.dnn import DNNEstimator
    except ImportError as exc:
        raise TrainingError(
            f"model_type = '{opts.model_type}' needs PyTorch, which is not installed",
            hint="pip install 'mlsql[torch]'",
        ) from exc
    return DNNEstimator()


def load_estimator(folder):
    meta = json.loads((Path(folder) / "estimator.json").read_text())
    kind = meta["kind"]
    if kind == "xgboost":
        return XGBEstimator.load(folder)
    if kind == "linear":
        return LinearEstimator.load(folder)
    if kind == "kmeans":
        from mlsql.ml.kmeans import KMeansEstimator

        return KMeansEstimator.load(folder)
    if kind == "pca":
        from mlsql.ml.pca import PCAEstimator

        return PCAEstimator.load(folder)
    from mlsql.ml.dnn import DNNEstimator

    return DNNEstimator.load(folder)

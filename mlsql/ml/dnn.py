"""dnn_classifier / dnn_regressor: a torch MLP on the encoded matrix, trained from minibatches.

torch is imported here only, when such a model is trained or loaded. The network
is plain Linear + activation layers with input standardization folded in, so the
ONNX exporter writes it as MatMul/Add ops (and can quantize them).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

ACTIVATIONS = ("relu", "relu6", "tanh", "sigmoid", "gelu", "elu", "selu", "crelu")


def _np_act(name: str, z: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.maximum(z, 0)
    if name == "relu6":
        return np.clip(z, 0, 6)
    if name == "tanh":
        return np.tanh(z)
    if name == "sigmoid":
        return 0.5 * (1 + np.tanh(0.5 * z))
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))
    if name == "selu":
        return 1.0507009873554805 * np.where(z > 0, z, 1.6732632423543772 * np.expm1(np.minimum(z, 0)))
    if name == "gelu":
        from math import sqrt

        from scipy.special import erf

        return 0.5 * z * (1 + erf(z / sqrt(2)))
    if name == "crelu":
        return np.concatenate([np.maximum(z, 0), np.maximum(-z, 0)], axis=1)
    raise ValueError(name)


class DNNEstimator:
    kind = "dnn"
    encoding = "onehot"

    def __init__(self, config: dict | None = None, weights: list[tuple[np.ndarray, np.ndarray]] | None = None,
                 x_mean=None, x_std=None):
        self.config = config or {}
        self.weights = weights or []  # [(W [out, in], b [out])], last = output layer
        self.x_mean = x_mean
        self.x_std = x_std

    @property
    def activation(self) -> str:
        return self.config.get("activation", "relu")

    @property
    def link(self) -> str:
        return self.config.get("link", "identity")

    # -- training ------------------------------------------------------------------
    def fit(self, X, y, w, X_eval, y_eval, opts, task, n_classes, progress):
        import torch
        from torch import nn

        torch.manual_seed(opts.random_seed)
        n, d = X.shape
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        std[std < 1e-12] = 1.0
        # 0/1 columns (one-hot categories, booleans) stay as they are: standardizing a rare category
        # gives it huge values, which would also coarsen int8 quantization of the first layer
        head = X[: min(len(X), 20_000)]
        binary = np.all((head == 0) | (head == 1), axis=0)
        mean[binary], std[binary] = 0.0, 1.0
        self.x_mean, self.x_std = mean.astype(np.float32), std.astype(np.float32)
        n_out = 1 if task == "regression" else (1 if n_classes == 2 else n_classes)
        link = "identity" if task == "regression" else ("sigmoid" if n_classes == 2 else "softmax")
        act = opts.activation_fn
        acts = {"relu": nn.ReLU, "relu6": nn.ReLU6, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
                "elu": nn.ELU, "selu": nn.SELU}
        layers: list = []
        width = d
        for h in opts.hidden_units:
            layers.append(nn.Linear(width, h))
            if act == "crelu":
                layers.append(_CReLU())
                width = 2 * h
            else:
                layers.append(acts[act]())
                width = h
            if opts.dropout:
                layers.append(nn.Dropout(opts.dropout))
        layers.append(nn.Linear(width, n_out))
        net = nn.Sequential(*layers)
        params = net.parameters()
        lr = opts.learn_rate
        opt = {
            "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=opts.l2_reg),
            "adagrad": lambda: torch.optim.Adagrad(params, lr=lr, weight_decay=opts.l2_reg),
            "sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=opts.l2_reg),
            "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr, weight_decay=opts.l2_reg),
            "ftrl": lambda: torch.optim.Adagrad(params, lr=lr, weight_decay=opts.l2_reg),
        }[opts.optimizer]()
        Xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        m_t, s_t = torch.from_numpy(self.x_mean), torch.from_numpy(self.x_std)
        if task == "regression":
            y_mu, y_sd = float(np.mean(y)), float(np.std(y)) or 1.0  # train on a standardized target
            yt = torch.from_numpy(((y - y_mu) / y_sd).astype(np.float32))
            loss_fn = nn.MSELoss(reduction="none")
        else:
            y_mu, y_sd = 0.0, 1.0
            if n_classes == 2:
                yt = torch.from_numpy(y.astype(np.float32))
                loss_fn = nn.BCEWithLogitsLoss(reduction="none")
            else:
                yt = torch.from_numpy(y.astype(np.int64))
                loss_fn = nn.CrossEntropyLoss(reduction="none")
        wt = torch.from_numpy(np.asarray(w, dtype=np.float32)) if w is not None else None

        def batch_loss(xb, yb, wb):
            out = net((xb - m_t) / s_t)
            if n_out == 1:
                out = out[:, 0]
            loss = loss_fn(out, yb)
            return (loss * wb).sum() / wb.sum() if wb is not None else loss.mean()

        history: list[dict] = []
        t0 = time.perf_counter()
        bs = opts.batch_size
        gen = torch.Generator().manual_seed(opts.random_seed)
        for epoch in range(1, opts.max_iterations + 1):
            net.train()
            perm = torch.randperm(n, generator=gen)
            total, seen = 0.0, 0
            for a in range(0, n, bs):
                idx = perm[a:a + bs]
                opt.zero_grad()
                loss = batch_loss(Xt[idx], yt[idx], wt[idx] if wt is not None else None)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            self._snapshot(net, n_out, link, act, y_mu, y_sd)
            ev = None
            if X_eval is not None:
                ev = self._eval_loss(X_eval, y_eval, task)
            now = time.perf_counter()
            train_loss = total / max(seen, 1) * (y_sd**2 if task == "regression" else 1.0)
            row = {"iteration": epoch, "loss": train_loss, "eval_loss": ev, "learning_rate": lr,
                   "duration_ms": (now - t0) * 1000.0}
            t0 = now
            history.append(row)
            if progress is not None:
                progress(epoch, opts.max_iterations, row)
            if opts.early_stop and len(history) >= 3:
                key = "eval_loss" if ev is not None else "loss"
                prev, cur = history[-2][key], history[-1][key]
                if prev > 0 and (prev - cur) / prev < opts.min_rel_progress * 0.1:
                    if progress is not None:  # the bar ends as a finished run, saying why it is short
                        from mlsql.ml.options import early_stop_reason

                        progress(epoch, opts.max_iterations,
                                 {**row, "stopped": early_stop_reason(key, opts.min_rel_progress * 0.1, "epoch")})
                    break
        return history

    def _snapshot(self, net, n_out, link, act, y_mu, y_sd):
        from torch import nn

        lin = [m for m in net if isinstance(m, nn.Linear)]
        ws = [(m.weight.detach().numpy().astype(np.float32).copy(), m.bias.detach().numpy().astype(np.float32).copy())
              for m in lin]
        # fold the target scaling of regressors into the output layer
        W, b = ws[-1]
        ws[-1] = ((W * y_sd).astype(np.float32), (b * y_sd + y_mu).astype(np.float32))
        self.weights = ws
        self.config = {"kind": "dnn", "n_out": n_out, "link": link, "activation": act}

    def _eval_loss(self, X, y, task):
        p = self.predict_raw(X)
        if task == "regression":
            return float(np.mean((p - y) ** 2))
        return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-15, 1))))

    # -- inference (numpy, float32 like the exported graph) --------------------------
    def margin(self, X) -> np.ndarray:
        z = (X.astype(np.float32, copy=False) - self.x_mean) / self.x_std
        for i, (W, b) in enumerate(self.weights):
            z = z @ W.T + b
            if i < len(self.weights) - 1:
                z = _np_act(self.activation, z).astype(np.float32)
        return z.astype(np.float64)

    def predict_raw(self, X):
        m = self.margin(X)
        if self.link == "identity":
            return m[:, 0]
        if self.link == "sigmoid":
            p = 0.5 * (1 + np.tanh(0.5 * m[:, 0]))
            return np.stack([1 - p, p], axis=1)
        m = m - m.max(axis=1, keepdims=True)
        e = np.exp(m)
        return e / e.sum(axis=1, keepdims=True)

    def contributions(self, X):
        """Gradient × (input − mean), by finite differences of the margin; last column = margin at the mean."""
        Xd = X.astype(np.float64)
        n, d = Xd.shape
        base_row = self.x_mean.astype(np.float64)[None, :]
        base = self.margin(base_row)[0]  # [n_out]
        full = self.margin(Xd)  # [n, n_out]
        contrib = np.zeros((n, full.shape[1], d))
        for j in range(d):  # integrated along one straight path: exact for linear parts
            Xj = Xd.copy()
            Xj[:, j] = base_row[0, j]
            contrib[:, :, j] = full - self.margin(Xj)
        # rescale so that attributions add up to the margin exactly
        s = contrib.sum(axis=2)
        gap = full - base[None, :]
        scale = np.where(np.abs(s) > 1e-12, gap / np.where(np.abs(s) > 1e-12, s, 1), 1.0)
        contrib *= scale[:, :, None]
        base_col = np.broadcast_to(base[None, :, None], (n, full.shape[1], 1))
        return np.concatenate([contrib, base_col], axis=2)

    def importance(self):
        return None

    def save(self, folder):
        folder = Path(folder)
        arrays = {"x_mean": self.x_mean, "x_std": self.x_std}
        for i, (W, b) in enumerate(self.weights):
            arrays[f"W{i}"], arrays[f"b{i}"] = W, b
        np.savez(folder / "dnn.npz", **arrays)
        (folder / "estimator.json").write_text(json.dumps({**self.config, "kind": "dnn", "layers": len(self.weights)}))

    @classmethod
    def load(cls, folder):
        folder = Path(folder)
        cfg = json.loads((folder / "estimator.json").read_text())
        z = np.load(folder / "dnn.npz")
        ws = [(z[f"W{i}"], z[f"b{i}"]) for i in range(cfg["layers"])]
        return cls(cfg, ws, z["x_mean"], z["x_std"])


def _CReLU():
    from torch import nn

    class CReLU(nn.Module):
        def forward(self, x):
            import torch

            return torch.cat([torch.relu(x), torch.relu(-x)], dim=1)

    return CReLU()

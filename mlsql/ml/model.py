"""TrainedModel: training, prediction, evaluation and explanation on Arrow tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import ModelError, TrainingError, UnknownColumnError
from mlsql.ml import metrics as M
from mlsql.ml.estimators import load_estimator, make_estimator
from mlsql.ml.features import FeatureSpec, encode, encoded_names, feature_of_column, fit_features
from mlsql.ml.options import Options

AUTO_SPLIT_SMALL = 500
AUTO_SPLIT_MEDIUM = 50_000
AUTO_SPLIT_EVAL_ROWS = 10_000
EVALUATION_FILE = "evaluation.json"

TRAINING_INFO_SCHEMA = pa.schema([
    ("iteration", pa.int64()), ("loss", pa.float64()), ("eval_loss", pa.float64()),
    ("learning_rate", pa.float64()), ("duration_ms", pa.float64()),
])


def _find(table: pa.Table, name: str) -> str | None:
    by_lower = {c.lower(): c for c in table.column_names}
    return by_lower.get(name.lower())


def _split_column(table: pa.Table, opts: Options) -> str:
    col = _find(table, opts.data_split_col)
    if col is None:
        raise UnknownColumnError(opts.data_split_col, table.column_names,
                                 message=f"data_split_col '{opts.data_split_col}' is not a column of the training data")
    return col


def _eval_mask(table: pa.Table, opts: Options, n: int) -> np.ndarray | None:
    """True for evaluation rows, following BigQuery ML's data_split_* options."""
    method = opts.data_split_method
    rng = np.random.default_rng(opts.random_seed)
    if method == "no_split":
        return None
    if method == "auto_split":
        if n < AUTO_SPLIT_SMALL:
            return None
        k = int(round(n * 0.2)) if n <= AUTO_SPLIT_MEDIUM else AUTO_SPLIT_EVAL_ROWS
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=k, replace=False)] = True
        return mask
    if method == "random":
        return rng.random(n) < opts.data_split_eval_fraction
    if method == "custom":
        col = _split_column(table, opts)
        return pc.fill_null(table.column(col).cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
    # seq: the last fraction of rows, ordered by data_split_col when given
    k = int(round(n * opts.data_split_eval_fraction))
    mask = np.zeros(n, dtype=bool)
    if opts.data_split_col:
        col = _split_column(table, opts)
        order = pc.sort_indices(table.column(col)).to_numpy()
        mask[order[n - k:]] = True
    else:
        mask[n - k:] = True
    return mask


# model types with their own TrainedModel class (no label: what they give is not a prediction of one)
MODEL_CLASSES = {"kmeans": ("mlsql.ml.unsupervised", "KMeansModel"), "pca": ("mlsql.ml.unsupervised", "PCAModel")}


def model_class(model_type: str) -> type[TrainedModel]:
    """The class that trains, loads and scores models of ``model_type`` (imported on first use)."""
    where = MODEL_CLASSES.get(model_type)
    if where is None:
        return TrainedModel
    import importlib

    return getattr(importlib.import_module(where[0]), where[1])


class TrainedModel:
    """A trained model and everything needed to reuse it: encoding, classes, metrics."""

    def __init__(self, *, model_type, task, label, label_type, classes, features, estimator,
                 eval_metrics, training_info, options, n_train=0, n_eval=0):
        self.model_type = model_type
        self.task = task
        self.label = label
        self.label_type = label_type
        self.classes = classes
        self.features: list[FeatureSpec] = features
        self.estimator = estimator
        self.eval_metrics: dict = eval_metrics
        self.training_info: pa.Table = training_info
        self.options = options
        self.n_train, self.n_eval = n_train, n_eval
        # a classifier's ROC curve(s) and confusion matrix on its evaluation rows (ML.EVALUATE(MODEL m))
        self.evaluation: M.Evaluation | None = None

    # -- encoding ------------------------------------------------------------------
    @property
    def encoded_names(self) -> list[str]:
        return encoded_names(self.features)

    @property
    def is_classifier(self) -> bool:
        return self.task == "classification"

    @property
    def supervised(self) -> bool:
        """Trained to predict a label (every type but kmeans and pca)."""
        return self.label is not None

    def prediction_schema(self, func: str = "PREDICT") -> pa.Schema:
        """The columns ML.PREDICT (``func``: or ML.EXPLAIN_PREDICT, ML.DETECT_ANOMALIES) puts before the input's."""
        name = f"predicted_{self.label}"
        if self.is_classifier:
            t = self._label_arrow_type()
            fields = [pa.field(name, t),
                      pa.field(f"{name}_probs", pa.list_(pa.struct([("label", t), ("prob", pa.float64())])))]
        else:
            fields = [pa.field(name, pa.float64())]
        if func == "EXPLAIN_PREDICT":
            fields += [pa.field("top_feature_attributions",
                                pa.list_(pa.struct([("feature", pa.string()), ("attribution", pa.float64())]))),
                       pa.field("baseline_prediction_value", pa.float64()),
                       pa.field("prediction_value", pa.float64()),
                       pa.field("approximation_error", pa.float64())]
        return pa.schema(fields)

    def detect_anomalies(self, features: pa.Table, contamination: float) -> pa.Table:
        raise ModelError(f"ML.DETECT_ANOMALIES is available for kmeans and pca models, not {self.model_type}",
                         hint="Train a kmeans or pca model on the rows, then ML.DETECT_ANOMALIES(MODEL m, "
                              "STRUCT(0.02 AS contamination), TABLE t).")

    def encode(self, table: pa.Table) -> np.ndarray:
        return encode(table, self.features)

    def _label_arrow_type(self) -> pa.DataType:
        return _type_from_str(self.label_type)

    def _class_array(self) -> pa.Array:
        return pa.array(self.classes, type=self._label_arrow_type())

    def _codes(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Class codes of the label column and a mask of rows whose label is known."""
        col = table.column(_find(table, self.label))
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        want = self._label_arrow_type()
        if col.type != want:
            try:
                col = col.cast(want)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ModelError(f"Label column '{self.label}' has type {col.type}; the model was trained on {want}") from exc
        codes = pc.index_in(col, value_set=self._class_array())
        valid = pc.is_valid(codes).to_numpy(zero_copy_only=False)
        return pc.fill_null(codes, -1).to_numpy(zero_copy_only=False), valid

    def _probs(self, X) -> np.ndarray:
        return self.estimator.predict_raw(X)

    # -- prediction ------------------------------------------------------------------
    def predict(self, features: pa.Table, threshold: float | None = None) -> pa.Table:
        X = self.encode(features)
        name = f"predicted_{self.label}"
        if not self.is_classifier:
            return pa.table({name: pa.array(self.estimator.predict_raw(X), pa.float64())})
        probs = self._probs(X)
        return pa.table({name: self._labels_for(probs, threshold),
                         f"{name}_probs": self._probs_array(probs)})

    def _pred_codes(self, probs, threshold=None) -> np.ndarray:
        if probs.shape[1] == 2 and threshold is not None:
            return (probs[:, 1] >= threshold).astype(np.int64)
        return probs.argmax(axis=1)

    def _labels_for(self, probs, threshold=None) -> pa.Array:
        return self._class_array().take(pa.array(self._pred_codes(probs, threshold)))

    def _probs_array(self, probs: np.ndarray) -> pa.Array:
        n, k = probs.shape
        labels = self._class_array().take(pa.array(np.tile(np.arange(k), n)))
        structs = pa.StructArray.from_arrays([labels, pa.array(probs.ravel(), pa.float64())], names=["label", "prob"])
        return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), structs)

    # -- evaluation ----------------------------------------------------------------
    def _labelled(self, table: pa.Table):
        if _find(table, self.label) is None:
            raise UnknownColumnError(self.label, table.column_names,
                                     message=f"Input has no label column '{self.label}'")
        if self.is_classifier:
            codes, valid = self._codes(table)
        else:
            y = table.column(_find(table, self.label))
            yv = y.cast(pa.float64()).to_numpy(zero_copy_only=False)
            valid = ~np.isnan(yv)
            codes = yv
        if not valid.all():
            table = table.filter(pa.array(valid))
            codes = codes[valid]
        if table.num_rows == 0:
            raise ModelError(f"No rows with a known label '{self.label}' to evaluate on")
        return table, codes

    def evaluate(self, table: pa.Table, threshold: float | None = None) -> dict:
        return self.evaluation_of(table, threshold).metrics

    def evaluation_of(self, table: pa.Table, threshold: float | None = None) -> M.Evaluation:
        """Metrics of ``table`` and, for a classifier, the ROC curve(s) and confusion matrix behind them."""
        table, y = self._labelled(table)
        X = self.encode(table)
        if self.is_classifier:
            return M.evaluation(y, self._probs(X), self.classes, threshold)
        return M.Evaluation(M.regression_metrics(y, self.estimator.predict_raw(X)), rows=len(y))

    def confusion_matrix(self, table: pa.Table, threshold: float | None = None) -> pa.Table:
        if not self.is_classifier:
            raise ModelError("ML.CONFUSION_MATRIX needs a classification model", hint="Use ML.EVALUATE for regressors.")
        table, y = self._labelled(table)
        pred = self._pred_codes(self._probs(self.encode(table)), threshold)
        k = len(self.classes)
        cm = M.confusion(y, pred, k)
        cols = {"expected_label": self._class_array()}
        for j, c in enumerate(self.classes):
            cols[str(c)] = pa.array(cm[:, j], pa.int64())
        return pa.table(cols)

    def roc_curve(self, table: pa.Table) -> pa.Table:
        if not self.is_classifier or len(self.classes) != 2:
            raise ModelError("ML.ROC_CURVE needs a binary classification model")
        table, y = self._labelled(table)
        probs = self._probs(self.encode(table))
        return pa.table(M.roc_points(y == 1, probs[:, 1]))

    # -- explanation ---------------------------------------------------------------
    def explain_predict(self, features: pa.Table, top_k: int = 5) -> pa.Table:
        X = self.encode(features)
        contrib = self.estimator.contributions(X)  # [n, n_out, f+1]
        n = len(X)
        pred = self.predict(features)
        if self.is_classifier:
            probs = self._probs(X)
            codes = probs.argmax(axis=1)
            if contrib.shape[1] == 1:  # binary margin is for class 1: flip sign for class 0
                c = contrib[:, 0, :] * np.where(codes == 1, 1.0, -1.0)[:, None]
            else:
                c = contrib[np.arange(n), codes, :]
        else:
            c = contrib[:, 0, :]
        base = c[:, -1]
        per_col = c[:, :-1]
        groups = feature_of_column(self.features)
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(groups) else np.array([], int)
        per_feat = np.add.reduceat(per_col, starts, axis=1) if len(starts) else np.zeros((n, 0))
        k = min(top_k, per_feat.shape[1])
        order = np.argsort(-np.abs(per_feat), axis=1, kind="stable")[:, :k]
        vals = np.take_along_axis(per_feat, order, axis=1)
        names = pa.array([f.name for f in self.features], pa.string()).take(pa.array(order.ravel()))
        structs = pa.StructArray.from_arrays([names, pa.array(vals.ravel(), pa.float64())],
                                             names=["feature", "attribution"])
        attrs = pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), structs)
        value = base + per_feat.sum(axis=1)
        cols = {c_: pred.column(c_) for c_ in pred.column_names}
        cols.update({
            "top_feature_attributions": attrs,
            "baseline_prediction_value": pa.array(base, pa.float64()),
            "prediction_value": pa.array(value, pa.float64()),
            "approximation_error": pa.array(np.zeros(n), pa.float64()),
        })
        return pa.table(cols)

    def feature_importance(self) -> pa.Table:
        imp = self.estimator.importance()
        if imp is None:
            raise ModelError(
                f"ML.FEATURE_IMPORTANCE is available for boosted tree and random forest models, not {self.model_type}",
                hint="Use ML.EXPLAIN_PREDICT for per-row attributions.",
            )
        groups = feature_of_column(self.features)
        n_feat = len(self.features)
        acc = np.zeros((n_feat, 3))
        for key, v in imp.items():
            j = int(key[1:]) if key.startswith("f") and key[1:].isdigit() else None
            if j is None or j >= len(groups):
                continue
            acc[groups[j]] += [v["weight"], v["gain"], v["cover"]]
        return pa.table({
            "feature": [f.name for f in self.features],
            "importance_weight": pa.array(acc[:, 0], pa.float64()),
            "importance_gain": pa.array(acc[:, 1], pa.float64()),
            "importance_cover": pa.array(acc[:, 2], pa.float64()),
        })

    def weights(self, standardize: bool = False) -> pa.Table:
        """ML.WEIGHTS: a linear or logistic model's coefficients per input as the model reads it,
        BigQuery ML's columns: ``processed_input``, ``weight`` (numbers, booleans, dates) and
        ``category_weights`` (a string input: one {category, weight} per category it learnt, the
        NULL category standing for NULL and any value unseen in training), the intercept as
        ``__INTERCEPT__``. ``standardize``: the weights of standardized inputs (each times its
        training standard deviation; the intercept is then the prediction's margin at the training
        mean), so their magnitudes compare. A multiclass model has one row per class and input,
        with ``class_label`` first."""
        est = self.estimator
        if est.kind != "linear":
            raise ModelError(f"ML.WEIGHTS is available for linear_reg and logistic_reg models, not {self.model_type}",
                             hint="For boosted trees, ML.FEATURE_IMPORTANCE; for any model, ML.EXPLAIN_PREDICT.")
        coef = np.atleast_2d(est.coef) * (est.x_std if standardize else 1.0)
        intercept = np.asarray(est.intercept, dtype=np.float64) + (
            np.atleast_2d(est.coef) @ est.x_mean if standardize else 0.0)
        classes = [str(c) for c in self.classes] if coef.shape[0] > 1 else [None]
        rows = []
        for k, label in enumerate(classes):
            j = 0
            for f in self.features:
                if f.encoding == "onehot":
                    cats = [*f.categories, None]  # the last column: NULL and unseen values
                    rows.append((label, f.name, None, [{"category": c, "weight": float(w)}
                                                       for c, w in zip(cats, coef[k, j:j + len(cats)])]))
                    j += len(cats)
                else:
                    rows.append((label, f.name, float(coef[k, j]), None))
                    j += 1
            rows.append((label, "__INTERCEPT__", float(intercept[k]), None))
        cw = pa.list_(pa.struct([("category", pa.string()), ("weight", pa.float64())]))
        cols = {"processed_input": pa.array([r[1] for r in rows], pa.string()),
                "weight": pa.array([r[2] for r in rows], pa.float64()),
                "category_weights": pa.array([r[3] for r in rows], cw)}
        if classes != [None]:
            cols = {"class_label": pa.array([r[0] for r in rows], pa.string()), **cols}
        return pa.table(cols)

    # -- persistence ---------------------------------------------------------------
    def save(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.estimator.save(folder)
        meta = {
            "format": 1, "model_type": self.model_type, "task": self.task, "label": self.label,
            "label_type": self.label_type, "classes": self.classes,
            "features": [f.to_dict() for f in self.features],
            "eval_metrics": self.eval_metrics, "options": self.options,
            "n_train": self.n_train, "n_eval": self.n_eval,
        }
        (folder / "model.json").write_text(json.dumps(meta, indent=1, default=str))
        if self.evaluation is not None:
            (folder / EVALUATION_FILE).write_text(json.dumps(self.evaluation.to_dict(), default=str))
        import pyarrow.parquet as pq

        pq.write_table(self.training_info, folder / "training_info.parquet")

    @classmethod
    def load(cls, folder) -> TrainedModel:
        import pyarrow.parquet as pq

        folder = Path(folder)
        meta = json.loads((folder / "model.json").read_text())
        if meta["model_type"] == "arima_plus":  # a time-series model: its own class and files
            from mlsql.ml.forecast import ArimaPlusModel

            return ArimaPlusModel.load(folder)
        model = model_class(meta["model_type"])(
            model_type=meta["model_type"], task=meta["task"], label=meta["label"],
            label_type=meta["label_type"], classes=meta["classes"],
            features=[FeatureSpec(**f) for f in meta["features"]],
            estimator=load_estimator(folder), eval_metrics=meta["eval_metrics"],
            training_info=pq.read_table(folder / "training_info.parquet"), options=meta.get("options", {}),
            n_train=meta.get("n_train", 0), n_eval=meta.get("n_eval", 0),
        )
        ev = folder / EVALUATION_FILE
        if ev.exists():
            model.evaluation = M.Evaluation.from_dict(json.loads(ev.read_text()), model.eval_metrics)
        return model


def _type_from_str(s: str) -> pa.DataType:
    simple = {"string": pa.string(), "large_string": pa.string(), "bool": pa.bool_(), "double": pa.float64(),
              "float": pa.float32(), "int64": pa.int64(), "int32": pa.int32(), "int16": pa.int16(),
              "int8": pa.int8(), "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(),
              "uint64": pa.uint64()}
    return simple.get(s, pa.string())


def _label_values(col) -> tuple[pa.Array, str]:
    """The label column normalized for classification: bools and integers keep their type, the rest → string."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = t.value_type
    if pa.types.is_boolean(t):
        return col, "bool"
    if pa.types.is_integer(t):
        return col.cast(pa.int64()), "int64"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        f = col.cast(pa.float64())
        vals = f.drop_null().to_numpy(zero_copy_only=False)
        if np.all(vals == np.round(vals)):  # none at all (an empty batch) is no fractional value either
            return f.cast(pa.int64()), "int64"
        raise TrainingError(
            f"The label column has fractional values ({t}); a classifier needs discrete classes",
            hint="Use a regressor model_type, or CAST the label to an integer or string.",
        )
    return col.cast(pa.string()), "string"


def class_weights(opts: Options, classes, counts: np.ndarray, n_fit: int, label: str) -> list[float]:
    """One weight per class: ``auto_class_weights`` (n / (k * count), 0 for an absent class) or
    the ``class_weights`` the user named (1.0 for the others; a name that is no class is an error)."""
    if opts.auto_class_weights:
        return np.where(counts > 0, n_fit / (len(classes) * np.maximum(counts, 1)), 0.0).tolist()
    by_str = {str(k): v for k, v in opts.class_weights.items()}
    unknown = [k for k in by_str if k not in {str(c) for c in classes}]
    if unknown:
        raise TrainingError(f"class_weights names label {unknown[0]!r}, which is not a class of '{label}'",
                            hint=f"Classes: {', '.join(map(str, classes))}.")
    return [float(by_str.get(str(c), 1.0)) for c in classes]


def train(table: pa.Table, opts: Options, progress=None) -> TrainedModel:
    """Train the model ``opts`` describes on ``table`` (features + label, as Arrow)."""
    if table.num_rows == 0:
        raise TrainingError("The training query returned no rows")
    if not opts.supervised:  # kmeans, pca: every column is a feature
        return model_class(opts.model_type).train(table, opts, progress)
    label = _find(table, opts.label)
    if label is None:
        raise UnknownColumnError(
            opts.label, table.column_names,
            message=f"Label column '{opts.label}' (input_label_cols) is not a column of the training query",
        )
    split_col = _find(table, opts.data_split_col) if opts.data_split_col else None
    feature_names = [c for c in table.column_names if c not in (label, split_col)]
    if not feature_names:
        raise TrainingError("The training query has no feature columns besides the label")
    # rows with a NULL label cannot teach anything
    lab = table.column(label)
    if lab.null_count:
        table = table.filter(pc.is_valid(lab))
    n = table.num_rows
    if n == 0:
        raise TrainingError(f"Every row of the training data has a NULL label '{label}'")

    task = "classification" if opts.is_classifier else "regression"
    classes = None
    label_type = str(table.column(label).type)
    if task == "classification":
        values, label_type = _label_values(table.column(label))
        uniq = pc.unique(values)
        classes = sorted(uniq.to_pylist())
        if len(classes) < 2:
            raise TrainingError(f"The label '{label}' has a single value ({classes[0]!r}); a classifier needs at least two")
        y_all = pc.index_in(values, value_set=pa.array(classes, values.type)).to_numpy(zero_copy_only=False)
        y_all = y_all.astype(np.int64)
    else:
        t = table.column(label).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)):
            raise TrainingError(f"A regressor needs a numeric label; '{label}' is {t}",
                                hint="Use a classifier model_type for categorical labels.")
        y_all = table.column(label).cast(pa.float64()).to_numpy()
        label_type = "double"

    eval_mask = _eval_mask(table, opts, n)
    if eval_mask is not None and not eval_mask.any():
        eval_mask = None  # nothing held out: evaluate on the training rows
    elif eval_mask is not None and eval_mask.all():
        raise TrainingError("The data split leaves no training rows")
    train_mask = None if eval_mask is None else ~eval_mask

    estimator = make_estimator(opts)
    specs = fit_features(table, feature_names, estimator.encoding, train_mask)
    X = encode(table, specs)
    w_all = None
    if task == "classification" and (opts.class_weights or opts.auto_class_weights):
        y_fit = y_all if eval_mask is None else y_all[train_mask]
        counts = np.bincount(y_fit, minlength=len(classes)).astype(np.float64)
        cw = np.array(class_weights(opts, classes, counts, len(y_fit), label))
        w_all = cw[y_all]
    if eval_mask is None:
        X_tr, y_tr, w, X_ev, y_ev = X, y_all, w_all, None, None
    else:
        X_ev, y_ev = X[eval_mask], y_all[eval_mask]
        if estimator.kind == "xgboost":
            # no copy of the training rows: evaluation rows stay in the matrix with weight 0
            X_tr, y_tr = X, y_all
            w = (w_all if w_all is not None else np.ones(n)) * train_mask
        else:
            X_tr, y_tr = X[train_mask], y_all[train_mask]
            w = None if w_all is None else w_all[train_mask]
        del X
    n_train = n if eval_mask is None else int(train_mask.sum())

    history = estimator.fit(X_tr, y_tr, w, X_ev, y_ev, opts, task, len(classes) if classes else 1, progress)
    model = TrainedModel(
        model_type=opts.model_type, task=task, label=label, label_type=label_type, classes=classes,
        features=specs, estimator=estimator, eval_metrics={},
        training_info=pa.Table.from_pylist(history, schema=TRAINING_INFO_SCHEMA),
        options=opts.given, n_train=n_train, n_eval=0 if y_ev is None else len(y_ev),
    )
    Xm, ym = (X_ev, y_ev) if X_ev is not None else (X_tr, y_tr)
    if task == "classification":
        model.evaluation = M.evaluation(ym, estimator.predict_raw(Xm), classes)
        model.eval_metrics = model.evaluation.metrics
    else:
        model.eval_metrics = M.regression_metrics(ym, estimator.predict_raw(Xm))
    return model

"""CREATE MODEL on Spark, in the executors: no training rows reach the driver.

The training query stays a Spark DataFrame. When the data split depends on positions, rows
are counted per partition (in the JVM) and each row's position is its partition's offset plus
its place in it, as ``RDD.zipWithIndex`` numbers rows, so the split picks the rows DuckDB's
path picks for the same order of rows (``random`` draws the same numpy numbers, the generator
advanced to each row's position); those rows are cached so every pass sees them in the same
places. Then (``mapInArrow``, Arrow batches) the statistics the feature encoding learns
(means, categories, classes), computed with ``mlsql.ml.features`` on each batch, and the
encoded matrix.

- ``boosted_tree_*`` and ``random_forest_*``: ``xgboost.spark`` across the executors
  (``num_workers`` = the session's task slots; a forest is its random-forest mode, one round of
  ``num_parallel_tree`` trees); its booster is an ordinary ``xgboost.Booster``, so the model is the
  same ``XGBEstimator`` the DuckDB path makes.
- ``linear_reg`` / ``logistic_reg``: the same ``LinearEstimator`` as on DuckDB, its sums
  computed on the cluster: the weighted Gram matrix and moments for least squares (one pass),
  the loss and gradient of each L-BFGS step for the logistic model (one pass over the cached
  encoded rows per evaluation, as Spark ML's own L-BFGS does). The model is the one DuckDB's
  path fits on the same rows, up to the order of floating-point sums.
- ``dnn_*``: not trained on Spark (an error says how to train it on DuckDB).

The evaluation metrics are aggregated on the cluster (``spark_score.metrics``).
Nothing here is imported by ``import mlsql``.
"""

from __future__ import annotations

import json
import time
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql import logs
from mlsql.engines.spark import score as S
from mlsql.errors import TrainingError, UnknownColumnError
from mlsql.ml.estimators import (
    LOGISTIC_GTOL,
    LinearEstimator,
    XGBEstimator,
    _sigmoid,
    _softmax,
    logistic_margin,
    logistic_objective,
    logistic_sums,
)
from mlsql.ml.features import MAX_CATEGORIES, FeatureSpec, _kind, encode, numeric_values, string_values
from mlsql.ml.model import (
    AUTO_SPLIT_EVAL_ROWS,
    AUTO_SPLIT_MEDIUM,
    AUTO_SPLIT_SMALL,
    TRAINING_INFO_SCHEMA,
    TrainedModel,
    _label_values,
)
from mlsql.ml.model import class_weights as model_class_weights  # the local class_weights holds the result
from mlsql.ml.options import Options, early_stop_reason

IDX, EVAL, LABEL, WEIGHT = "__mlsql_idx", "__mlsql_eval", "__mlsql_label", "__mlsql_weight"


def _find(columns: list[str], name: str) -> str | None:
    return {c.lower(): c for c in columns}.get(name.lower())


def _struct(fields):
    return S._struct(pa.schema(fields))


# -- executor side -------------------------------------------------------------------------------


def _random_split(seed: int, fraction: float, batches):
    """``data_split_method = 'random'``: numpy's ``default_rng(seed).random(n) < fraction`` for the
    rows at these positions (the generator advanced to the batch's first row: one 64-bit draw a number)."""
    for b in batches:
        if b.num_rows == 0:
            continue
        idx = b.column(b.schema.get_field_index(IDX)).to_numpy(zero_copy_only=False)
        rng = np.random.default_rng(seed)
        rng.bit_generator.advance(int(idx[0]))  # positions within a partition are consecutive
        ev = rng.random(b.num_rows) < fraction
        yield pa.RecordBatch.from_arrays(list(b.columns) + [pa.array(ev)], names=list(b.schema.names) + [EVAL])


def add_column_summaries(t: pa.Table, numeric: list[str], categorical: list[str], sums: dict, cats: dict) -> None:
    """Add ``t``'s rows to the running summaries the encoding is learnt from: per numeric column its
    sum, count and whether any value is finite (``sums``), per string column its values (``cats``)."""
    for c in numeric:
        x = numeric_values(t.column(c))
        s = sums[c]
        s[0] += float(np.nansum(x))
        s[1] += int(np.count_nonzero(~np.isnan(x)))
        s[2] = s[2] or bool(np.isfinite(x).any())
    for c in categorical:
        cats[c].update(pc.unique(string_values(t.column(c)).drop_null()).to_pylist())


def _statistics(numeric: list[str], categorical: list[str], label: str, classifier: bool, has_eval: bool, batches):
    """What the encoding learns, summed over this partition's training rows (all rows for the classes)."""
    sums = {c: [0.0, 0, False] for c in numeric}
    cats: dict[str, set] = {c: set() for c in categorical}
    labels_all: dict = {}
    labels_train: dict = {}
    y_sum, n_train, n_eval, fractional = 0.0, 0, 0, False
    for b in batches:
        t = pa.Table.from_batches([b])
        train = ~t.column(EVAL).to_numpy(zero_copy_only=False) if has_eval else np.ones(b.num_rows, bool)
        tt = t.filter(pa.array(train)) if not train.all() else t
        n_train += tt.num_rows
        n_eval += t.num_rows - tt.num_rows
        add_column_summaries(tt, numeric, categorical, sums, cats)
        if classifier:
            try:
                values, _ = _label_values(t.column(label))
            except TrainingError:
                fractional = True
                continue
            for into, vs in ((labels_all, values), (labels_train, values.filter(pa.array(train)))):
                counts = pc.value_counts(vs)
                for v, k in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
                    into[v] = into.get(v, 0) + k
        else:
            y = tt.column(label).cast(pa.float64()).to_numpy(zero_copy_only=False)
            y_sum += float(y.sum())
    blob = {"sums": sums, "cats": {c: sorted(v) for c, v in cats.items()},
            "labels_all": list(labels_all.items()), "labels_train": list(labels_train.items()),
            "y_sum": y_sum, "n_train": n_train, "n_eval": n_eval, "fractional": fractional}
    yield pa.RecordBatch.from_arrays([pa.array([json.dumps(blob, default=str)])], names=["stats"])


def _encode(specs: list[dict], label: str, label_info: dict, batches):
    """The float32 design matrix (columns f0, f1, ...), the label (class code or value), weight, eval flag."""
    specs = [FeatureSpec(**s) for s in specs]
    width = sum(s.width for s in specs)
    classes = label_info.get("classes")
    cw = label_info.get("class_weights")
    for b in batches:
        t = pa.Table.from_batches([b])
        X = encode(t, specs)
        if classes is not None:
            values, _ = _label_values(t.column(label))
            y = pc.index_in(values, value_set=pa.array(classes, values.type)).to_numpy(zero_copy_only=False)
            y = y.astype(np.float64)
        else:
            y = t.column(label).cast(pa.float64()).to_numpy(zero_copy_only=False)
        ev = t.column(EVAL).to_numpy(zero_copy_only=False)
        w = np.ones(len(y)) if cw is None else np.where(ev, 1.0, np.asarray(cw)[y.astype(np.int64)])
        arrays = [pa.array(X[:, j]) for j in range(width)]
        arrays += [pa.array(y), pa.array(w), pa.array(ev)]
        yield pa.RecordBatch.from_arrays(arrays, names=[f"f{j}" for j in range(width)] + [LABEL, WEIGHT, EVAL])


def _matrix(b: pa.RecordBatch, width: int):
    X = np.column_stack([b.column(j).to_numpy(zero_copy_only=False) for j in range(width)]) if width else \
        np.zeros((b.num_rows, 0), np.float32)
    y = b.column(width).to_numpy(zero_copy_only=False)
    w = b.column(width + 1).to_numpy(zero_copy_only=False)
    ev = b.column(width + 2).to_numpy(zero_copy_only=False)
    return X.astype(np.float32, copy=False), y, w, ev


def _moments(width: int, regression: bool, batches):
    """LinearEstimator.fit's sums over training rows: Σw, Σwx, Σwx², Σwxxᵀ, Σwy, Σwxy."""
    d = width
    acc = {"wsum": 0.0, "n": 0, "mean": np.zeros(d), "sq": np.zeros(d), "gram": np.zeros((d, d)),
           "wy": 0.0, "xy": np.zeros(d)}
    for b in batches:
        X, y, w, ev = _matrix(b, width)
        keep = ~ev
        X, y, w = X[keep].astype(np.float64), y[keep], w[keep]
        acc["wsum"] += float(w.sum())
        acc["n"] += len(y)
        acc["mean"] += w @ X
        acc["sq"] += w @ (X * X)
        if regression:
            acc["gram"] += (X * w[:, None]).T @ X
            acc["wy"] += float(w @ y)
            acc["xy"] += (X * w[:, None]).T @ y
    yield pa.RecordBatch.from_arrays([pa.array([json.dumps({k: np.asarray(v).tolist() for k, v in acc.items()})])],
                                     names=["m"])


def _residuals(width: int, coefs: list, batches):
    """Σw·(margin − y)² on training rows and Σ(margin − y)², count on evaluation rows, per iterate."""
    out = np.zeros((len(coefs), 3))
    for b in batches:
        X, y, w, ev = _matrix(b, width)
        Xd = X.astype(np.float64)
        for i, (coef, intercept) in enumerate(coefs):
            r = (Xd @ np.asarray(coef).T + np.asarray(intercept))[:, 0] - y
            out[i, 0] += float(w[~ev] @ (r[~ev] ** 2))
            out[i, 1] += float((r[ev] ** 2).sum())
            out[i, 2] += int(ev.sum())
    yield pa.RecordBatch.from_arrays([pa.array([json.dumps(out.tolist())])], names=["r"])


def _logistic(width: int, mean, std, theta, k: int, batches):
    """The unnormalized loss and gradient of LinearEstimator._fit_logistic at ``theta`` (training rows,
    ``estimators.logistic_sums``), and the evaluation rows' summed log loss."""
    d = width
    n_out = 1 if k == 2 else k
    W = theta[: n_out * d].reshape(n_out, d)
    bias = theta[n_out * d:]
    mean, std = np.asarray(mean), np.asarray(std)
    loss, gW, gb, ev_loss, ev_n = 0.0, np.zeros((n_out, d)), np.zeros(n_out), 0.0, 0
    for b in batches:
        X, y, w, ev = _matrix(b, width)
        tr = ~ev
        part = logistic_sums(X[tr], y[tr], w[tr], mean, std, W, bias, k)
        loss, gW, gb = loss + part[0], gW + part[1], gb + part[2]
        if ev.any():
            m = logistic_margin(X[ev], mean, std, W, bias)[0]
            yi = y[ev].astype(np.int64)
            if k == 2:
                p = _sigmoid(m[:, 0])
                p_true = np.where(yi == 1, p, 1.0 - p)
            else:
                p_true = _softmax(m)[np.arange(len(yi)), yi]
            ev_loss += float(-np.log(np.clip(p_true, 1e-15, 1)).sum())
            ev_n += int(ev.sum())
    yield pa.RecordBatch.from_arrays(
        [pa.array([json.dumps({"loss": loss, "gW": gW.tolist(), "gb": gb.tolist(), "ev": ev_loss, "ev_n": ev_n})])],
        names=["g"])


class _RelativeProgressStop:
    """xgboost callback: MLSQL's early stop (relative improvement below min_rel_progress), run on
    every worker alike since they see the same allreduced metric."""

    def __new__(cls, metric: str, min_rel: float, use_eval: bool):
        import xgboost as xgb

        class Stop(xgb.callback.TrainingCallback):
            def __init__(self):
                self.history: list[float] = []

            def after_iteration(self, model, epoch, evals_log):
                logs = evals_log.get("validation" if use_eval else "training") or \
                    evals_log.get("eval" if use_eval else "train") or next(iter(evals_log.values()), {})
                vals = logs.get(metric)
                if not vals:
                    return False
                v = vals[-1] ** 2 if metric == "rmse" else vals[-1]
                self.history.append(v)
                if len(self.history) >= 2:
                    prev, cur = self.history[-2], self.history[-1]
                    if prev > 0 and (prev - cur) / prev < min_rel:
                        return True
                return False

        return Stop()


# -- in the JVM ----------------------------------------------------------------------------------
# Plain columns (numbers, booleans, strings) and labels need no Python to learn their encoding or
# to encode: the same statistics and the same float32 matrix come from Spark expressions, so the
# rows never cross to a Python worker before xgboost.spark's own hand-over. Other columns (dates,
# timestamps, many categories) take the Arrow path above, which is the DuckDB path's code.

JVM_MAX_CATEGORIES = 256  # categories (and classes) looked up in a literal array: a linear scan a row


def _jvm_type(t: pa.DataType, kind: str) -> bool:
    if kind == "numeric":
        return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _jvm_statistics(F, idf, numeric, categorical, label, classifier, has_eval, schema) -> list[dict]:
    """``_statistics``'s summary from one aggregation (plus a count per label value for a
    classifier), in the shape its per-partition blobs have.

    The categories come from a ``groupBy`` over (column, value) pairs, each row given once per
    string column (``inline``), which Spark's hash aggregation does about twice as fast as
    ``collect_set`` (that copies every value it sees); the numeric sums ride on the first
    column's pairs, where each row appears once."""
    tr = ~F.col(EVAL) if has_eval else F.lit(True)
    if categorical:
        frame = idf.select("*", F.inline(F.array(*[F.struct(F.lit(i).alias("__mlsql_i"),
                                                            F.col(f"`{c}`").alias("__mlsql_v"))
                                                   for i, c in enumerate(categorical)])))
        first = F.col("__mlsql_i") == 0
    else:
        frame, first = idf, F.lit(True)
    aggs = [F.count(F.when(first & tr, 1)).alias("n_train"), F.count(F.when(first & ~tr, 1)).alias("n_eval")]
    for i, c in enumerate(numeric):
        x = F.col(f"`{c}`").cast("double")
        valid = first & tr & x.isNotNull() & ~F.isnan(x)
        aggs += [F.sum(F.when(valid, x)).alias(f"s{i}"), F.count(F.when(valid, 1)).alias(f"c{i}"),
                 F.max(F.when(valid & (F.abs(x) != F.lit(float("inf"))), 1)).alias(f"f{i}")]
    if not classifier:
        aggs.append(F.sum(F.when(first & tr, F.col(f"`{label}`").cast("double"))).alias("y_sum"))
    if categorical:
        aggs.append(F.count(F.when(tr, 1)).alias("seen"))  # the pair's count among training rows
        rows = frame.groupBy("__mlsql_i", "__mlsql_v").agg(*aggs).collect()
    else:
        rows = [frame.agg(*aggs).first()]

    def total(key):
        return sum(r[key] or 0 for r in rows)

    blob = {"sums": {c: [float(total(f"s{i}")), int(total(f"c{i}")), any(r[f"f{i}"] is not None for r in rows)]
                     for i, c in enumerate(numeric)},
            "cats": {c: sorted(r["__mlsql_v"] for r in rows
                               if r["__mlsql_i"] == i and r["__mlsql_v"] is not None and r["seen"])
                     for i, c in enumerate(categorical)},
            "labels_all": [], "labels_train": [], "y_sum": float(total("y_sum")) if not classifier else 0.0,
            "n_train": int(total("n_train")), "n_eval": int(total("n_eval")), "fractional": False}
    if classifier:
        ev = F.col(EVAL) if has_eval else F.lit(False)
        counts = idf.groupBy(F.col(f"`{label}`").alias("v"), ev.alias("e")).count().collect()
        try:
            values, _ = _label_values(pa.array([r["v"] for r in counts], schema.field(label).type))
        except TrainingError:
            blob["fractional"] = True
            return [blob]
        alls: dict = {}
        train: dict = {}
        for v, r in zip(values.to_pylist(), counts):
            alls[v] = alls.get(v, 0) + r["count"]
            if not r["e"]:
                train[v] = train.get(v, 0) + r["count"]
        blob["labels_all"], blob["labels_train"] = list(alls.items()), list(train.items())
    return [blob]


def _position(F, col, values: list, type_name: str):
    """1-based place of ``col`` in ``values`` (a literal array), 0 when absent, NULL for NULL."""
    return F.array_position(F.array(*[F.lit(v).cast(type_name) for v in values]), col.cast(type_name))


def _jvm_encode(F, idf, specs: list[FeatureSpec], label: str, info: dict, task: str):
    """``_encode``'s columns as Spark expressions: f0, f1, ... (float), label, weight, eval flag."""
    cols = []
    for s in specs:
        c = F.col(f"`{s.name}`")
        if s.kind == "numeric":
            x = c.cast("double")
            cols.append(F.when(x.isNull() | F.isnan(x), F.lit(s.mean)).otherwise(x).cast("float"))
            continue
        pos = F.coalesce(_position(F, c, s.categories, "string"), F.lit(0))
        code = F.when(pos > 0, pos - 1).otherwise(F.lit(len(s.categories)))
        if s.encoding == "ordinal":
            cols.append(code.cast("float"))
        else:
            cols += [(code == j).cast("float") for j in range(s.width)]
    if task == "classification":
        classes = info["classes"]
        y = F.col(f"`{label}`")
        if isinstance(classes[0], bool):
            code = y.cast("int")  # classes [False, True]
        elif isinstance(classes[0], int):
            code = _position(F, y, classes, "long") - 1
        else:
            code = _position(F, y, classes, "string") - 1
        y = code.cast("double")
    else:
        code = None
        y = F.col(f"`{label}`").cast("double")
    cw = info.get("class_weights")
    if cw is None:
        w = F.lit(1.0)
    else:
        w = F.when(F.col(EVAL), F.lit(1.0)).otherwise(
            F.element_at(F.array(*[F.lit(float(v)) for v in cw]), code.cast("int") + 1))
    return idf.select(*[e.alias(f"f{j}") for j, e in enumerate(cols)], y.alias(LABEL), w.cast("double").alias(WEIGHT),
                      F.col(EVAL))


# -- driver side ---------------------------------------------------------------------------------


def _collect_json(df, column: str) -> list:
    return [json.loads(r[column]) for r in df.collect()]


def _split_plan(engine, df, opts: Options, n: int, columns: list[str]) -> dict:
    method = opts.data_split_method
    if method == "no_split":
        return {"method": "none"}
    if method == "auto_split":
        if n < AUTO_SPLIT_SMALL:
            return {"method": "none"}
        k = int(round(n * 0.2)) if n <= AUTO_SPLIT_MEDIUM else AUTO_SPLIT_EVAL_ROWS
        rng = np.random.default_rng(opts.random_seed)
        return {"method": "chosen", "chosen": np.sort(rng.choice(n, size=k, replace=False))}
    if method == "random":
        return {"method": "random", "seed": opts.random_seed, "fraction": opts.data_split_eval_fraction}
    if method == "custom":
        return {"method": "custom", "col": _split_col(columns, opts)}
    k = int(round(n * opts.data_split_eval_fraction))
    if opts.data_split_col:
        return {"method": "seq_col", "col": _split_col(columns, opts), "k": k}
    return {"method": "tail", "first_eval": n - k}


def _split_col(columns: list[str], opts: Options) -> str:
    col = _find(columns, opts.data_split_col)
    if col is None:
        raise UnknownColumnError(opts.data_split_col, columns,
                                 message=f"data_split_col '{opts.data_split_col}' is not a column of the training data")
    return col


def _seq_by_column(F, idf, col: str, k: int, n: int):
    """The last ``k`` rows in the order of ``col`` (NULLs last, ties by position), as DuckDB's path
    orders them (pyarrow's stable sort_indices)."""
    if k <= 0:
        return idf.withColumn(EVAL, F.lit(False))
    if k >= n:
        return idf.withColumn(EVAL, F.lit(True))
    first = (idf.select(col, IDX).orderBy(F.col(col).asc_nulls_last(), F.col(IDX)).offset(n - k).limit(1).first())
    bc, bi = first[0], first[1]
    c, i = F.col(col), F.col(IDX)
    if bc is None:
        cond = c.isNull() & (i >= bi)
    else:
        cond = c.isNull() | (c > F.lit(bc)) | ((c == F.lit(bc)) & (i >= bi))
    return idf.withColumn(EVAL, cond)


def train(engine, df, opts: Options, progress=None) -> TrainedModel:
    """Train the model ``opts`` describes on the Spark DataFrame ``df`` (features + label)."""
    F = engine._functions()
    if opts.family == "dnn":
        raise TrainingError(
            f"model_type = '{opts.model_type}' does not train on the Spark engine",
            hint="Train it on DuckDB: SET mlsql_engine = 'duckdb', with the rows in the workspace (e.g. a sample "
                 "written from Spark to a parquet file and read with read_parquet); the model then scores on "
                 "Spark like any other.")
    columns = df.columns
    label = _find(columns, opts.label)
    if label is None:
        raise UnknownColumnError(
            opts.label, columns,
            message=f"Label column '{opts.label}' (input_label_cols) is not a column of the training query")
    split_col = _find(columns, opts.data_split_col) if opts.data_split_col else None
    feature_names = [c for c in columns if c not in (label, split_col)]
    if not feature_names:
        raise TrainingError("The training query has no feature columns besides the label")
    schema = S.arrow_schema(df)
    for name in feature_names:
        if _kind(schema.field(name).type) is None:
            raise TrainingError(
                f"Column '{name}' has type {schema.field(name).type}, which cannot be a model feature",
                hint="Use numbers, booleans, dates or strings; turn lists and structs into columns first.")
    task = "classification" if opts.is_classifier else "regression"
    t = schema.field(label).type
    if task == "regression" and not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
                                     or pa.types.is_boolean(t)):
        raise TrainingError(f"A regressor needs a numeric label; '{label}' is {t}",
                            hint="Use a classifier model_type for categorical labels.")

    df = df.where(F.col(f"`{label}`").isNotNull())
    if opts.data_split_method == "no_split":  # no positions: nothing to count, number or keep in place
        return _train_indexed(engine, df.withColumn(EVAL, F.lit(False)), opts, task, label, feature_names,
                              schema, None, {"method": "none"}, progress)
    # rows per partition, counted in the JVM; a row's position = its partition's offset + its place
    # there (monotonically_increasing_id holds the partition in its upper 31 bits, the place below)
    counts = {r[0]: r[1] for r in df.groupBy(F.spark_partition_id()).count().collect()}
    n = int(sum(counts.values()))
    if n == 0:
        raise TrainingError(f"Every row of the training data has a NULL label '{label}'")
    plan = _split_plan(engine, df, opts, n, columns)
    if plan["method"] == "none":  # no position needed: nothing to number, nothing to keep in place
        return _train_indexed(engine, df.withColumn(EVAL, F.lit(False)), opts, task, label, feature_names,
                              schema, n, plan, progress)
    offsets, acc = [], 0
    for p in sorted(counts):
        offsets += [F.lit(p), F.lit(acc)]
        acc += counts[p]
    pid = F.spark_partition_id()
    idf = df.withColumn(IDX, F.monotonically_increasing_id() - pid.cast("long") * F.lit(1 << 33)
                        + F.element_at(F.create_map(*offsets), pid))
    m = plan["method"]
    if m == "random":  # numpy's numbers, drawn in the executors
        idx_schema = pa.schema(list(schema) + [pa.field(IDX, pa.int64()), pa.field(EVAL, pa.bool_())])
        idf = idf.mapInArrow(partial(_random_split, plan["seed"], plan["fraction"]), S._struct(idx_schema))
    elif m == "chosen":
        idf = idf.withColumn(EVAL, F.col(IDX).isin([int(i) for i in plan["chosen"]]))
    elif m == "tail":
        idf = idf.withColumn(EVAL, F.col(IDX) >= F.lit(int(plan["first_eval"])))
    elif m == "custom":
        idf = idf.withColumn(EVAL, F.coalesce(F.col(f"`{plan['col']}`").cast("boolean"), F.lit(False)))
    else:
        idf = _seq_by_column(F, idf, plan["col"], plan["k"], n)
    idf = idf.persist()  # every later pass sees the same rows in the same places
    try:
        return _train_indexed(engine, idf, opts, task, label, feature_names, schema, n, plan, progress)
    finally:
        idf.unpersist()


def _train_indexed(engine, idf, opts, task, label, feature_names, schema, n, plan, progress):
    numeric = [c for c in feature_names if _kind(schema.field(c).type) == "numeric"]
    categorical = [c for c in feature_names if c not in numeric]
    has_eval = plan["method"] != "none"
    F = engine._functions()
    label_t = schema.field(label).type
    jvm = (all(_jvm_type(schema.field(c).type, "numeric") for c in numeric)
           and all(_jvm_type(schema.field(c).type, "categorical") for c in categorical)
           and (_jvm_type(label_t, "numeric") or _jvm_type(label_t, "categorical")))
    if jvm:
        stats = _jvm_statistics(F, idf, numeric, categorical, label, task == "classification", has_eval, schema)
    else:
        stats = _collect_json(idf.mapInArrow(
            partial(_statistics, numeric, categorical, label, task == "classification", has_eval), "stats string"),
            "stats")
    n_train = sum(s["n_train"] for s in stats)
    n_eval = sum(s["n_eval"] for s in stats)
    if n is None:  # not counted before: no split needed positions
        n = n_train + n_eval
        if n == 0:
            raise TrainingError(f"Every row of the training data has a NULL label '{label}'")
    if has_eval and n_eval == 0:
        has_eval = False  # nothing held out: evaluate on the training rows
    elif has_eval and n_train == 0:
        raise TrainingError("The data split leaves no training rows")

    classes, label_type, class_weights = None, "double", None
    if task == "classification":
        if any(s["fractional"] for s in stats):
            raise TrainingError(
                f"The label column has fractional values ({schema.field(label).type}); a classifier needs discrete classes",
                hint="Use a regressor model_type, or CAST the label to an integer or string.")
        _, label_type = _label_values(pa.array([], schema.field(label).type))
        all_counts: dict = {}
        for s in stats:
            for v, k in s["labels_all"]:
                all_counts[v] = all_counts.get(v, 0) + k
        classes = sorted(all_counts)
        if len(classes) < 2:
            raise TrainingError(f"The label '{label}' has a single value ({classes[0]!r}); a classifier needs at least two")
        if opts.class_weights or opts.auto_class_weights:
            train_counts = dict.fromkeys(classes, 0)
            for s in stats:
                for v, k in s["labels_train" if has_eval else "labels_all"]:
                    train_counts[v] += k
            cnt = np.array([train_counts[c] for c in classes], dtype=np.float64)
            n_fit = n_train if has_eval else n
            class_weights = model_class_weights(opts, classes, cnt, n_fit, label)

    if not has_eval:
        idf = idf.withColumn(EVAL, F.lit(False))
        n_train = n
    encoding = "ordinal" if opts.xgboost else "onehot"
    specs = []
    for name in feature_names:
        at = str(schema.field(name).type)
        if name in numeric:
            s0, c0, finite = 0.0, 0, False
            for s in stats:
                a, b, f = s["sums"][name]
                s0, c0, finite = s0 + a, c0 + b, finite or f
            mean = s0 / c0 if finite and c0 else 0.0
            specs.append(FeatureSpec(name, "numeric", at, mean=mean, encoding="value"))
        else:
            cats = sorted({v for s in stats for v in s["cats"][name]})
            if len(cats) > MAX_CATEGORIES:
                raise TrainingError(
                    f"Column '{name}' has {len(cats):,} distinct values; at most {MAX_CATEGORIES:,} are supported",
                    hint="Group rare values, hash them into buckets, or leave the column out.")
            specs.append(FeatureSpec(name, "categorical", at, categories=cats,
                                     encoding="onehot" if encoding == "onehot" else "ordinal"))
    width = sum(s.width for s in specs)
    enc_schema = [(f"f{j}", pa.float32()) for j in range(width)] + [(LABEL, pa.float64()), (WEIGHT, pa.float64()),
                                                                     (EVAL, pa.bool_())]
    info = {"classes": classes, "class_weights": class_weights}
    jvm_encoded = jvm and all(len(s.categories or ()) <= JVM_MAX_CATEGORIES for s in specs) \
        and len(classes or ()) <= JVM_MAX_CATEGORIES
    if jvm_encoded:
        encoded = _jvm_encode(F, idf, specs, label, info, task)
    else:
        encoded = idf.mapInArrow(partial(_encode, [s.to_dict() for s in specs], label, info), _struct(enc_schema))
    k = len(classes) if classes else 1
    if opts.xgboost:  # boosted trees, and random forests (xgboost's random-forest mode: one round)
        y_mean = sum(s["y_sum"] for s in stats) / n_train if task == "regression" else None
        estimator, history = _fit_xgboost(engine, encoded, width, opts, task, k, has_eval, class_weights, y_mean,
                                          progress)
    else:
        encoded = encoded.persist()
        try:
            estimator, history = _fit_linear(encoded, width, opts, task, k, n_train, has_eval, progress)
        finally:
            encoded.unpersist()

    model = TrainedModel(
        model_type=opts.model_type, task=task, label=label, label_type=label_type, classes=classes,
        features=specs, estimator=estimator, eval_metrics={},
        training_info=pa.Table.from_pylist(history, schema=TRAINING_INFO_SCHEMA),
        options=opts.given, n_train=n_train, n_eval=n_eval if has_eval else 0,
    )
    if jvm_encoded:  # score the matrix the model was trained on: no second encoding, no strings shipped
        rows = encoded.where(F.col(EVAL)) if has_eval else encoded
        evaluation = S.metrics(engine, model, rows.select(*[f"f{j}" for j in range(width)], LABEL), None,
                               encoded_width=width)
    else:
        rows = idf.where(F.col(EVAL)) if has_eval else idf
        evaluation = S.metrics(engine, model, rows, {c: c for c in feature_names + [label]})
    model.eval_metrics = evaluation.metrics
    if task == "classification":
        model.evaluation = evaluation
    return model


def _fit_xgboost(engine, encoded, width, opts, task, k, has_eval, class_weights, y_mean, progress):
    from xgboost.spark import SparkXGBClassifier, SparkXGBRegressor

    if task == "regression":
        objective, metric = "reg:squarederror", "rmse"
    elif k == 2:
        objective, metric = "binary:logistic", "logloss"
    else:
        objective, metric = "multi:softprob", "mlogloss"
    params = dict(
        features_col=[f"f{j}" for j in range(width)], label_col=LABEL, num_workers=engine.workers(),
        n_estimators=opts.max_iterations, learning_rate=opts.learn_rate, max_depth=opts.max_tree_depth,
        reg_alpha=opts.l1_reg, reg_lambda=opts.l2_reg, subsample=opts.subsample,
        colsample_bytree=opts.colsample_bytree, colsample_bylevel=opts.colsample_bylevel,
        colsample_bynode=opts.colsample_bynode, gamma=opts.min_split_loss,
        min_child_weight=opts.min_tree_child_weight, num_parallel_tree=opts.num_parallel_tree,
        tree_method=opts.tree_method, booster=opts.booster_type, random_state=opts.random_seed,
        eval_metric=metric, verbosity=0, device="cpu",
        # no per-round evaluation lines unless mlsql_log_level asks: the workers send them to the tracker,
        # which prints them on the driver's stdout, i.e. into the cell (MLSQL's progress bar shows rounds)
        verbose=logs.verbose(),
    )
    if has_eval:
        # xgboost.spark needs training and evaluation rows in every partition: a split by position
        # (seq) leaves the last partitions with evaluation rows only unless the rows are dealt anew
        params["validation_indicator_col"] = EVAL
        params["force_repartition"] = True
    if class_weights is not None:
        params["weight_col"] = WEIGHT
    if task == "regression":
        params["base_score"] = float(y_mean)
        est = SparkXGBRegressor(objective=objective, **params)
    else:
        est = SparkXGBClassifier(**params)
    if opts.early_stop:
        params_cb = [_RelativeProgressStop(metric, opts.min_rel_progress, has_eval)]
        est.set(est.callbacks, params_cb)
    import logging

    log = logging.getLogger("XGBoost-PySpark")  # its INFO lines would land in the notebook's stderr
    level = log.level
    log.setLevel(logs.library_level())
    t0 = time.perf_counter()
    try:
        fitted = est.fit(encoded)
    finally:
        log.setLevel(level)
    elapsed = time.perf_counter() - t0
    booster = fitted.get_booster()
    booster.feature_names = None  # f0, f1, ... as the DuckDB path's booster (importance keys, ONNX export)
    summary = fitted.training_summary
    train_h = (summary.train_objective_history if summary else {}).get(metric, [])
    eval_h = (summary.validation_objective_history if summary else {}).get(metric, [])
    history = []
    for i, loss in enumerate(train_h):
        ev = eval_h[i] if i < len(eval_h) else None
        if metric == "rmse":  # MSE, like BigQuery ML's loss for regressors
            loss, ev = loss**2, (None if ev is None else ev**2)
        row = {"iteration": i + 1, "loss": float(loss), "eval_loss": None if ev is None else float(ev),
               "learning_rate": opts.learn_rate, "duration_ms": elapsed * 1000.0 / max(len(train_h), 1)}
        history.append(row)
        if progress is not None:
            progress(i + 1, opts.max_iterations, row)
            if i + 1 == len(train_h) < opts.max_iterations and opts.early_stop:  # the bar says why it is short
                progress(i + 1, opts.max_iterations, {**row, "stopped": early_stop_reason(
                    "eval_loss" if has_eval else "loss", opts.min_rel_progress, "iteration")})
    return XGBEstimator(booster, objective, k if objective == "multi:softprob" else 1), history


def _fit_linear(encoded, width, opts, task, k, n_train, has_eval, progress):
    est = LinearEstimator()
    m = _collect_json(encoded.mapInArrow(partial(_moments, width, task == "regression"), "m string"), "m")
    tot = {key: sum(np.asarray(x[key], dtype=np.float64) for x in m) for key in m[0]}
    wsum = float(tot["wsum"])
    mean = tot["mean"] / wsum
    std = np.sqrt(np.maximum(tot["sq"] / wsum - mean**2, 0.0))
    std[std < 1e-12] = 1.0
    est.x_mean, est.x_std = mean, std
    t0 = time.perf_counter()
    if task == "regression":
        return est, _least_squares(est, encoded, width, tot, wsum, opts, has_eval, progress, t0)
    return est, _logistic_fit(est, encoded, width, opts, k, n_train, has_eval, progress, t0)


def _least_squares(est, encoded, width, tot, wsum, opts, has_eval, progress, t0):
    """LinearEstimator._fit_least_squares on the summed moments."""
    mean, std = est.x_mean, est.x_std
    y_mean = float(tot["wy"]) / wsum
    xty = tot["xy"] - y_mean * tot["mean"]
    cov = (tot["gram"] / wsum - np.outer(mean, mean)) / np.outer(std, std)
    rhs = xty / wsum / std
    d = len(mean)
    l2 = opts.l2_reg / wsum
    if opts.l1_reg == 0:
        beta, *_ = np.linalg.lstsq(cov + l2 * np.eye(d), rhs, rcond=1e-10)
        iters = [beta]
    else:
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
    coefs = []
    for b in iters:
        est._set_from_standardized(b[None, :], np.array([y_mean]))
        coefs.append((est.coef.tolist(), est.intercept.tolist()))
    parts = _collect_json(encoded.mapInArrow(partial(_residuals, width, coefs), "r string"), "r")
    res = np.sum([np.asarray(p) for p in parts], axis=0)
    history = []
    for i in range(1, len(iters) + 1):
        now = time.perf_counter()
        ev = float(res[i - 1, 1] / res[i - 1, 2]) if has_eval and res[i - 1, 2] else None
        row = {"iteration": i, "loss": float(res[i - 1, 0] / wsum), "eval_loss": ev, "learning_rate": None,
               "duration_ms": (now - t0) * 1000.0}
        t0 = now
        history.append(row)
        if progress is not None:
            progress(i, len(iters), row)
    est._set_from_standardized(iters[-1][None, :], np.array([y_mean]))
    est.link = "identity"
    return history


def _logistic_fit(est, encoded, width, opts, k, n, has_eval, progress, t0):
    """LinearEstimator._fit_logistic, each loss and gradient summed over the executors."""
    from scipy.optimize import minimize

    d = width
    n_out = 1 if k == 2 else k
    l2, l1 = opts.l2_reg / n, opts.l1_reg / n
    wsum = None
    seen: dict[bytes, tuple] = {}

    def sums(theta):
        key = theta.tobytes()
        if key not in seen:
            parts = _collect_json(encoded.mapInArrow(
                partial(_logistic, width, est.x_mean.tolist(), est.x_std.tolist(), theta, k), "g string"), "g")
            seen.clear()
            seen[key] = (sum(p["loss"] for p in parts), sum(np.asarray(p["gW"]) for p in parts),
                         sum(np.asarray(p["gb"]) for p in parts), sum(p["ev"] for p in parts),
                         sum(p["ev_n"] for p in parts))
        return seen[key]

    def loss_grad(theta):
        loss, gW, gb, _, _ = sums(theta)
        return logistic_objective(loss, gW, gb, wsum, theta[: n_out * d].reshape(n_out, d), l2, l1)

    F_sum = _collect_json(encoded.mapInArrow(partial(_weight_sum, width), "s string"), "s")
    wsum = float(sum(F_sum))
    history: list[dict] = []
    state = {"t0": t0}

    def callback(theta):
        W = theta[: n_out * d].reshape(n_out, d)
        est._set_from_standardized(W, theta[n_out * d:])
        loss = loss_grad(theta)[0]
        _, _, _, ev_sum, ev_n = sums(theta)
        ev = float(ev_sum / ev_n) if has_eval and ev_n else None
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
    est._set_from_standardized(W, res.x[n_out * d:])
    est.link = "sigmoid" if k == 2 else "softmax"
    if not history:
        callback(res.x)
    return history


def _weight_sum(width: int, batches):
    s = 0.0
    for b in batches:
        _, _, w, ev = _matrix(b, width)
        s += float(w[~ev].sum())
    yield pa.RecordBatch.from_arrays([pa.array([json.dumps(s)])], names=["s"])


def prepare(engine, step, query_params, temps: list[str]):
    """CREATE MODEL's reading on Spark, nothing collected but 50 example rows: the training query
    as a temporary view, its TRANSFORM fitted (aggregates only come back), its fingerprint.
    ``(transform, raw Arrow schema, fingerprint, the DataFrame to train on, example rows as the
    query gives them, the same rows as the model reads them)``; the examples give the registered
    version its MLflow signature."""
    from mlsql.errors import MLSQLError

    data = engine.dataframe(step.query, query_params)
    raw_name = engine.temp_name("train")
    engine.register(raw_name, data)
    temps.append(raw_name)
    fp = engine.fingerprint(raw_name)
    if fp.rows == 0:
        raise MLSQLError(f"The training query for model {step.model} returned no rows")
    transform = None
    features = data
    if step.transform:
        from mlsql.plan.transform import fit_transform

        transform = fit_transform(step.transform, raw_name, data.columns, engine.query)
        features = engine.dataframe(transform.select_sql(raw_name, data.columns))
    examples = data.limit(50).toArrow()
    example_features = examples
    if transform is not None:
        ex_name = engine.temp_name("examples")
        engine.register(ex_name, examples)
        temps.append(ex_name)
        example_features = engine.query(transform.select_sql(ex_name, data.columns))
    return transform, S.arrow_schema(data), fp, features, examples, example_features

"""BigQuery ML's data validation functions: ``ML.VALIDATE_DATA_SKEW`` (serving rows against the
training statistics stored with the model), ``ML.VALIDATE_DATA_DRIFT`` (two sets of rows) and
``ML.DESCRIBE_DATA``. Every statistic of the rows is an aggregate the engine computes
(``mlsql.runtime.steps.stats``): only counts and summaries come back, on DuckDB and Spark alike.

How two columns are compared (docs/LANGUAGE.md, Data validation):

- numbers: both sides' non-NULL values are counted into the baseline's bins (equal-width from the
  baseline's minimum to its maximum, plus one bin below and one above, which the baseline leaves
  empty); the value is the Jensen-Shannon divergence of the two histograms, log base 2, so it lies
  in [0, 1]. That is the divergence, not scipy's ``jensenshannon``, which is its square root.
- strings: the shares of the non-NULL rows per value the baseline lists (its ``TOP_VALUES`` most
  frequent) and one share for every other value (the baseline's ``other_share``); the value is the
  L-infinity distance, the largest difference of a share (or, as asked, their Jensen-Shannon
  divergence).
"""

from __future__ import annotations

import math
from typing import Any

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError, ModelError, OptionError, UnknownColumnError, did_you_mean
from mlsql.plan import planner as P
from mlsql.runtime.steps import stats as S

_OUTPUT = ("input", "metric", "threshold", "value", "is_anomaly")


def jensen_shannon(p: list[float], q: list[float]) -> float:
    """The Jensen-Shannon divergence (log base 2, in [0, 1]) of two histograms or distributions
    over the same bins, each normalized to sum 1."""
    sp, sq = float(sum(p)), float(sum(q))
    out = 0.0
    for a, b in zip(p, q, strict=True):
        a, b = a / sp, b / sq
        m = (a + b) / 2
        if a > 0:
            out += 0.5 * a * math.log2(a / m)
        if b > 0:
            out += 0.5 * b * math.log2(b / m)
    return out


def l_infinity(p: list[float], q: list[float]) -> float:
    """The largest absolute difference of two distributions over the same categories."""
    return max(abs(a - b) for a, b in zip(p, q, strict=True))


def _relation(tree, params: dict | None) -> tuple[str, dict | None]:
    return f"({P.sql_text(tree)})", P.params_for(tree, params)


def _schema(engine, relation: str, params: dict | None) -> pa.Schema:
    return engine.query(f"SELECT * FROM {relation} AS __t LIMIT 0", params).schema


def _by_lower(names) -> dict[str, str]:
    return {n.lower(): n for n in names}


def _thresholds(settings: dict, columns: list[str], func: str) -> dict[str, float]:
    """The per-column thresholds, each for a column that is compared (else an error naming it)."""
    given = settings.get("thresholds") or {}
    cols = _by_lower(columns)
    out = {}
    for name, t in given.items():
        if name.lower() not in cols:
            near = did_you_mean(name, columns)
            err = OptionError(f"Option thresholds names column '{name}', which ML.{func} does not compare",
                              hint=(f"Did you mean '{near}'? " if near else "") + "It compares: " + ", ".join(columns) + ".")
            err.option, err.statement_kind = "thresholds", f"ML.{func}"
            raise err
        out[cols[name.lower()]] = t
    return out


def compare(engine, baseline: dict[str, dict], relation: str, params: dict | None, schema: pa.Schema,
            settings: dict, func: str, against: str) -> pa.Table:
    """One row per column of ``baseline`` (statistics as ``stats.training_statistics`` writes them)
    present in ``schema`` (the study rows of ``relation``): input, metric, threshold, value, is_anomaly."""
    fields = _by_lower(f.name for f in schema)
    types = {f.name: f.type for f in schema}
    columns = [c for c, st in baseline.items() if c.lower() in fields and st["kind"] in ("number", "string")]
    if not columns:
        raise UnknownColumnError(next(iter(baseline), "?"), list(fields.values()),
                                 message=f"ML.{func}: the rows have none of the columns of {against}",
                                 hint=f"{against} has: {', '.join(baseline)}.")
    per_column = _thresholds(settings, columns, func)
    cat_metric = str(settings.get("categorical_metric_type") or "l_infty").upper()
    num_metric = str(settings.get("numerical_metric_type") or "jensen_shannon_divergence").upper()
    cat_default = float(settings.get("categorical_default_threshold", 0.3))
    num_default = float(settings.get("numerical_default_threshold", 0.3))
    for c in columns:
        kind = S._kind(types[fields[c.lower()]])
        if kind != baseline[c]["kind"]:
            raise MLSQLError(f"ML.{func}: column '{c}' holds {'numbers' if kind == 'number' else kind + 's'} here "
                             f"but {'numbers' if baseline[c]['kind'] == 'number' else 'strings'} in {against}")
    edges = {fields[c.lower()]: baseline[c]["histogram"]["edges"] for c in columns
             if baseline[c]["kind"] == "number" and baseline[c]["count"]}
    study_bins = S.bin_counts(engine, relation, params, edges)
    rows: dict[str, list] = {k: [] for k in _OUTPUT}
    for c in columns:
        st = baseline[c]
        value: float | None = None
        if st["kind"] == "number":
            metric, threshold = num_metric, per_column.get(c, num_default)
            q = study_bins.get(fields[c.lower()])
            if q is not None and sum(q):
                value = jensen_shannon([0, *st["histogram"]["counts"], 0], q)
        else:
            metric, threshold = cat_metric, per_column.get(c, cat_default)
            listed = list(st["values"])
            counts, other = S.category_counts(engine, relation, params, fields[c.lower()], listed)
            n = sum(counts.values()) + other
            if st["count"] and n:
                p = [st["freq"][v] for v in listed] + [st["other_share"]]
                q = [counts.get(v, 0) / n for v in listed] + [other / n]
                value = l_infinity(p, q) if metric == "L_INFTY" else jensen_shannon(p, q)
        rows["input"].append(c)
        rows["metric"].append(metric)
        rows["threshold"].append(threshold)
        rows["value"].append(value)
        rows["is_anomaly"].append(None if value is None else value > threshold)
    return pa.table({"input": pa.array(rows["input"], pa.string()), "metric": pa.array(rows["metric"], pa.string()),
                     "threshold": pa.array(rows["threshold"], pa.float64()),
                     "value": pa.array(rows["value"], pa.float64()),
                     "is_anomaly": pa.array(rows["is_anomaly"], pa.bool_())})


def validate_skew(c) -> pa.Table:
    """ML.VALIDATE_DATA_SKEW: the serving rows against the training statistics of the model's inputs."""
    lm, step = c.lm, c.step
    if step.input is None:
        raise MLSQLError("ML.VALIDATE_DATA_SKEW needs serving rows",
                         hint=f"Write ML.VALIDATE_DATA_SKEW(MODEL {step.model}, TABLE t) or (SELECT ...).")
    ref = lm.version.ref
    stats = lm.meta.get("training_stats") or {}
    inputs = lm.meta.get("input_columns") or lm.feature_names
    have = _by_lower(stats)
    baseline = {have[n.lower()]: stats[have[n.lower()]] for n in inputs if n.lower() in have}
    if not baseline:
        raise ModelError(f"Model {ref} has no training statistics, which ML.VALIDATE_DATA_SKEW compares with",
                         hint=f"Retrain it (CREATE OR REPLACE MODEL {lm.version.name} ...) with this version of MLSQL.")
    old = [n for n, st in baseline.items() if st["kind"] == "number" and st["count"] and "histogram" not in st]
    if old:
        raise ModelError(f"Model {ref} was trained before MLSQL stored histograms of its numeric inputs "
                         f"({', '.join(old)}): ML.VALIDATE_DATA_SKEW has no bins to compare with",
                         hint=f"Retrain it (CREATE OR REPLACE MODEL {lm.version.name} ...), or compare with the "
                              "training rows themselves: ML.VALIDATE_DATA_DRIFT((training query), TABLE t).")
    relation, params = _relation(step.input, c.params)
    schema = _schema(c.s.engine, relation, params)
    return compare(c.s.engine, baseline, relation, params, schema, c.settings, step.func,
                   f"the training data of model {ref}")


def validate_drift(c) -> pa.Table:
    """ML.VALIDATE_DATA_DRIFT: the study rows (second input) against the base rows (first input),
    over the columns both have."""
    step, engine = c.step, c.s.engine
    base, base_params = _relation(step.input, c.params)
    study, study_params = _relation(step.study, c.params)
    base_schema = _schema(engine, base, base_params)
    study_names = _by_lower(f.name for f in _schema(engine, study, study_params))
    common = [f.name for f in base_schema if f.name.lower() in study_names]
    if not common:
        raise MLSQLError("ML.VALIDATE_DATA_DRIFT: the two inputs have no column in common")
    bins = int(c.settings.get("num_histogram_buckets", S.HISTOGRAM_BINS))
    baseline = S.training_statistics(engine, base, base_params, base_schema, common, bins=bins)
    study_schema = _schema(engine, study, study_params)
    return compare(engine, baseline, study, study_params, study_schema, c.settings, step.func, "the base rows")


def describe_data(c) -> pa.Table:
    """ML.DESCRIBE_DATA: one row of statistics per column of its input."""
    step, engine = c.step, c.s.engine
    if step.input is None:
        raise MLSQLError("ML.DESCRIBE_DATA needs rows: ML.DESCRIBE_DATA(TABLE t) or ML.DESCRIBE_DATA((SELECT ...))")
    relation, params = _relation(step.input, c.params)
    schema = _schema(engine, relation, params)
    nq = int(c.settings.get("num_quantiles", 2))
    top_k = int(c.settings.get("top_k", 1))
    parts = ["count(*) AS __n"]
    kinds = []
    for i, f in enumerate(schema):
        col = S._ident(f.name)
        kind = "nested" if pa.types.is_nested(f.type) else S._kind(f.type)
        kinds.append(kind)
        parts.append(f"count({col}) AS nn_{i}")
        if kind == "nested":
            continue
        parts += [f"min({col}) AS mn_{i}", f"max({col}) AS mx_{i}", f"count(DISTINCT {col}) AS u_{i}"]
        if kind == "number":
            x = f"CAST({col} AS DOUBLE)"
            parts += [f"count(CASE WHEN {x} = 0 THEN 1 END) AS z_{i}", f"avg({x}) AS mean_{i}",
                      f"stddev_samp({x}) AS sd_{i}", f"quantile_cont({x}, 0.5) AS med_{i}"]
            parts += [f"quantile_cont({x}, {S._double(j / nq)}) AS q_{i}_{j}" for j in range(nq + 1)]
        elif kind == "string":
            parts.append(f"avg(CAST(length({col}) AS DOUBLE)) AS len_{i}")
    row = engine.query(f"SELECT {', '.join(parts)} FROM {relation} AS __t", params).to_pylist()[0]
    total = int(row["__n"])
    out: dict[str, list] = {k: [] for k in ("name", "num_rows", "num_nulls", "num_zeros", "min", "max", "mean",
                                            "stddev", "median", "quantiles", "unique", "avg_string_length",
                                            "num_values", "top_values")}
    for i, (f, kind) in enumerate(zip(schema, kinds)):
        nn = int(row[f"nn_{i}"])
        number, string = kind == "number", kind == "string"
        top = None
        if string:
            col = S._ident(f.name)
            got = engine.query(f"SELECT CAST({col} AS VARCHAR) AS value, count(*) AS count FROM {relation} AS __t "
                               f"WHERE {col} IS NOT NULL GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {top_k}", params)
            top = [{"value": r["value"], "count": int(r["count"])} for r in got.to_pylist()]
        flat = kind != "nested"
        out["name"].append(f.name)
        out["num_rows"].append(total)
        out["num_nulls"].append(total - nn)
        out["num_zeros"].append(int(row[f"z_{i}"]) if number else None)
        out["min"].append(_text(row[f"mn_{i}"]) if flat else None)
        out["max"].append(_text(row[f"mx_{i}"]) if flat else None)
        out["mean"].append(row[f"mean_{i}"] if number else None)
        out["stddev"].append(row[f"sd_{i}"] if number else None)
        out["median"].append(row[f"med_{i}"] if number else None)
        out["quantiles"].append([row[f"q_{i}_{j}"] for j in range(nq + 1)] if number and nn else None)
        out["unique"].append(int(row[f"u_{i}"]) if flat else None)
        out["avg_string_length"].append(row[f"len_{i}"] if string else None)
        out["num_values"].append(nn)
        out["top_values"].append(top)
    top_type = pa.list_(pa.struct([("value", pa.string()), ("count", pa.int64())]))
    types: dict[str, Any] = {"name": pa.string(), "num_rows": pa.int64(), "num_nulls": pa.int64(),
                             "num_zeros": pa.int64(), "min": pa.string(), "max": pa.string(), "mean": pa.float64(),
                             "stddev": pa.float64(), "median": pa.float64(), "quantiles": pa.list_(pa.float64()),
                             "unique": pa.int64(), "avg_string_length": pa.float64(), "num_values": pa.int64(),
                             "top_values": top_type}
    return pa.table({k: pa.array(v, types[k]) for k, v in out.items()})


def _text(v) -> str | None:
    """A minimum or maximum as BigQuery ML shows it: text (numbers as Python writes them)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)

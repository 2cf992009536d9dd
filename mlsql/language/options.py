"""Every statement's OPTIONS in one table, one checker for them, and one reader of SQL literals.

``OPTIONS`` declares, per statement kind (``CREATE MODEL``, ``EXPORT MODEL``, ``DEPLOY MODEL``,
``CREATE DEVICE``, ``CREATE DEVICE GROUP``, ``CREATE JOB`` and the ``STRUCT(...)`` settings of
the ML table functions), each option's name, type, allowed values or range, default, the model
types it applies to and a one-line doc. ``validate`` checks what a user wrote against it;
``options_for`` lists it (completion); ``markdown`` writes it (docs/LANGUAGE.md's reference is
generated from it). The statements' own resolvers (``mlsql.ml.resolve_options``,
``mlsql.export.resolve_export_options``, ``mlsql.deploy.remote.resolve_deploy_options``,
``mlsql.jobs.options.resolve_job_options``, ``mlsql.deploy.devices``) start with ``validate`` and add
only the checks that tie several options together.

Light on purpose: no sqlglot, numpy or pyarrow at import.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlsql.errors import MLSQLError, OptionError, UnknownOptionError, did_you_mean

if TYPE_CHECKING:
    from sqlglot import exp

TYPES = ("int", "float", "bool", "str", "list", "enum", "struct", "duration")

MODEL_TYPES = ("boosted_tree_classifier", "boosted_tree_regressor", "random_forest_classifier",
               "random_forest_regressor", "linear_reg", "logistic_reg", "dnn_classifier", "dnn_regressor",
               "kmeans", "pca", "arima_plus")
FORECASTERS = ("arima_plus",)  # time-series models (mlsql/ml/forecast.py): no label, no tuning
# models trained elsewhere, imported from a file (CREATE MODEL m OPTIONS (model_type = 'onnx', model_path = ...))
IMPORTED = ("onnx", "torch", "xgboost")
CLASSIFIERS = ("boosted_tree_classifier", "random_forest_classifier", "logistic_reg", "dnn_classifier")
BOOSTED = ("boosted_tree_classifier", "boosted_tree_regressor")
FORESTS = ("random_forest_classifier", "random_forest_regressor")
TREES = BOOSTED + FORESTS  # xgboost's trees: boosted, or a random forest (num_parallel_tree trees in one round)
LINEAR = ("linear_reg", "logistic_reg")
DNN = ("dnn_classifier", "dnn_regressor")
KMEANS = ("kmeans",)
PCA = ("pca",)
UNSUPERVISED = KMEANS + PCA  # no label: no input_label_cols, no data split, no tuning objective
SUPERVISED = TREES + LINEAR + DNN
ITERATIVE = BOOSTED + LINEAR + DNN + KMEANS  # max_iterations and learn_rate have a meaning (a forest grows once)
QUANTIZE = ("none", "int8", "int8_static", "fp16")
TREE_FORMATS = ("ensemble", "tensor", "gemm")
PROVIDERS = ("nnapi", "cuda", "tensorrt", "coreml", "openvino", "dml", "rocm", "qnn", "xnnpack", "cpu")
MAX_METRIC_DROP = 0.005


@dataclass(frozen=True)
class Option:
    """One option of one statement kind."""

    name: str
    type: str  # one of TYPES
    doc: str
    default: Any = None
    choices: tuple[str, ...] = ()  # enum: the allowed values (lower case)
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min itself is not allowed
    max_open: bool = False
    items: str | None = None  # list: the type of its items ('str', 'int', 'float', 'struct')
    min_items: int = 0
    max_items: int | None = None
    model_types: tuple[str, ...] = ()  # CREATE MODEL: the model types it applies to (empty: all)
    required: bool = False
    struct_ok: bool = False  # a number option that also takes a STRUCT(...), which its check reads
    default_doc: str | None = None  # how docs show the default, where the value alone does not say
    check: Callable[[str, Any], Any] | None = None  # a further check of the typed value; returns it
    # hyperparameter tuning (num_trials): BigQuery ML's default search space and its scale, for an option
    # that takes HPARAM_RANGE / HPARAM_CANDIDATES; () for one that cannot be tuned
    tune: tuple = ()  # ('range', lo, hi, 'linear' | 'log') or ('candidates', [values])

    def applies_to(self, model_type: str | None) -> bool:
        return not model_type or not self.model_types or model_type.lower() in self.model_types

    def allowed(self) -> str:
        """What the option takes, in words ('a whole number >= 1', "one of 'a', 'b'")."""
        if self.type == "enum":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.type == "bool":
            return "TRUE or FALSE"
        if self.type == "duration":
            return "a duration such as '90 seconds', '5 minutes', '1h', or a number of seconds"
        if self.type == "struct":
            return "a STRUCT(...)"
        if self.type == "str":
            return "a string"
        if self.type == "list":
            what = {"str": "strings", "int": "whole numbers", "float": "numbers", "struct": "STRUCTs"}[self.items or "str"]
            if self.min_items == self.max_items == 1:
                return f"one {what[:-1]} (or a list of one)"
            size = "" if self.max_items is None else f" of at most {self.max_items}"
            return f"a list{size} of {what}" + _range_text(self, " each")
        return ("a whole number" if self.type == "int" else "a number") + _range_text(self)


def _range_text(o: Option, each: str = "") -> str:
    if o.min is not None and o.max is not None:
        lo, hi = ("(" if o.min_open else "["), (")" if o.max_open else "]")
        return f"{each} in {lo}{o.min:g}, {o.max:g}{hi}"
    if o.min is not None:
        return f"{each} {'>' if o.min_open else '>='} {o.min:g}"
    if o.max is not None:
        return f"{each} {'<' if o.max_open else '<='} {o.max:g}"
    return ""


# -- hyperparameter search spaces -------------------------------------------------------------
@dataclass(frozen=True)
class HParamRange:
    """``HPARAM_RANGE(lo, hi)``: a continuous (or whole-number) search space for one option."""

    lo: float
    hi: float
    scale: str = "linear"  # 'linear' or 'log', from the option's BigQuery ML scale

    def __str__(self) -> str:
        return f"HPARAM_RANGE({self.lo:g}, {self.hi:g})"


@dataclass(frozen=True)
class HParamCandidates:
    """``HPARAM_CANDIDATES([a, b, ...])``: a discrete search space for one option."""

    values: tuple

    def __str__(self) -> str:
        return "HPARAM_CANDIDATES([" + ", ".join(repr(v) for v in self.values) + "])"


HPARAM_FUNCTIONS = ("HPARAM_RANGE", "HPARAM_CANDIDATES")


def _hparam(name: str, args: list) -> HParamRange | HParamCandidates:
    if name == "HPARAM_RANGE":
        if len(args) == 1 and isinstance(args[0], list):
            args = args[0]
        if len(args) != 2:
            raise OptionError(f"HPARAM_RANGE takes two numbers (min, max), got {len(args)}",
                              hint="For example: learn_rate = HPARAM_RANGE(0.01, 0.3).")
        return HParamRange(*args)
    if len(args) == 1 and isinstance(args[0], list):
        args = args[0]
    return HParamCandidates(tuple(tuple(a) if isinstance(a, list) else a for a in args))


# -- reading SQL literals ------------------------------------------------------------------
def read_literal(e: exp.Expression | None, *, where: str | None = None) -> Any:
    """A SQL literal as Python: 'x' → str, 12 → int, 1.5 → float, TRUE → bool, NULL → None,
    -x, (x), CAST(x AS t) → x, [a, b] and (a, b) → list, STRUCT(1 AS a) → dict (positional
    fields → list), a bare name → its text.

    Anything else is returned as its DuckDB SQL text. With ``where`` (a place that needs a
    literal, e.g. "ML.IMPUTER: argument 2"), anything else, bare names included, is an
    ``OptionError`` naming ``where``."""
    from sqlglot import exp

    if e is None:
        return None
    if isinstance(e, exp.Literal):
        if e.is_string:
            return e.this
        try:
            return int(e.this)
        except ValueError:
            return float(e.this)
    if isinstance(e, exp.Boolean):
        return bool(e.this)
    if isinstance(e, exp.Null):
        return None
    if isinstance(e, exp.Neg):
        v = read_literal(e.this, where=where)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return -v
        if where:
            raise OptionError(f"{where} must be a literal, got {e.sql('duckdb')}")
        return f"-{v}"
    if isinstance(e, exp.Paren | exp.Cast):
        return read_literal(e.this, where=where)
    if isinstance(e, exp.Array | exp.Tuple):
        return [read_literal(x, where=where) for x in e.expressions]
    if isinstance(e, exp.Struct):
        out: dict[str, Any] = {}
        positional = []
        for x in e.expressions:
            if isinstance(x, exp.PropertyEQ | exp.EQ | exp.Slice):
                out[x.this.name] = read_literal(x.expression, where=where)
            elif isinstance(x, exp.Alias):
                out[x.alias] = read_literal(x.this, where=where)
            else:
                positional.append(read_literal(x, where=where))
        if positional and not out:
            return positional
        if positional:
            out["_"] = positional
        return out
    if isinstance(e, exp.Column | exp.Identifier | exp.Var) and not where:
        return e.name
    if isinstance(e, exp.Anonymous) and str(e.this).upper() in HPARAM_FUNCTIONS and not where:
        return _hparam(str(e.this).upper(), [read_literal(x) for x in e.expressions])
    if where:
        raise OptionError(f"{where} must be a literal, got {e.sql('duckdb')}")
    return e.sql("duckdb")


# -- checking values -------------------------------------------------------------------------
def _bad(o: Option, v, problem: str | None = None, hint: str | None = None) -> OptionError:
    return OptionError(f"Option {o.name} = {v!r} {problem or 'must be ' + o.allowed()}", hint=hint)


def _number(o: Option, v, whole: bool):
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not math.isfinite(v)):
        raise _bad(o, v)
    if whole:
        if int(v) != v:
            raise _bad(o, v)
        v = int(v)
    else:
        v = float(v)
    if o.min is not None and (v < o.min or (o.min_open and v == o.min)):
        raise _bad(o, v)
    if o.max is not None and (v > o.max or (o.max_open and v == o.max)):
        raise _bad(o, v)
    return v


def _item(o: Option, kind: str, v):
    if kind == "str":
        if not isinstance(v, str):
            raise _bad(o, v)
        return v
    if kind == "struct":
        return v
    return _number(o, v, whole=kind == "int")


def _convert(o: Option, v):
    if isinstance(v, HParamRange | HParamCandidates):
        return _convert_space(o, v)
    t = o.type
    if t in ("int", "float") and o.struct_ok and isinstance(v, dict):
        return v  # its check reads the STRUCT
    if t in ("int", "float"):
        return _number(o, v, whole=t == "int")
    if t == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise _bad(o, v)
    if t == "str":
        if not isinstance(v, str):
            raise _bad(o, v)
        return v
    if t == "enum":
        if not isinstance(v, str) or v.lower() not in o.choices:
            near = did_you_mean(str(v), o.choices)
            raise _bad(o, v, f"is not one of {', '.join(repr(c) for c in o.choices)}",
                       hint=f"Did you mean '{near}'?" if near else None)
        return v.lower()
    if t == "list":
        if not isinstance(v, list):
            v = [v]  # a single value stands for a list of one
        if len(v) < o.min_items or (o.max_items is not None and len(v) > o.max_items):
            raise _bad(o, v)
        try:
            return [_item(o, o.items or "str", x) for x in v]
        except OptionError:
            raise _bad(o, v) from None  # name the whole list, as the user wrote it
    if t == "duration":
        return parse_duration(o.name, v, allow_zero=o.min == 0)
    if t == "struct":
        if not isinstance(v, dict | list):
            raise _bad(o, v)
        return v
    raise AssertionError(t)


def _convert_space(o: Option, v):
    """An HPARAM_RANGE / HPARAM_CANDIDATES given for ``o``: each bound or candidate is checked as a
    value of the option would be; the range takes the option's BigQuery ML scale."""
    if not o.tune:
        raise OptionError(f"Option {o.name} cannot be tuned ({v})",
                          hint="Tunable options: " + ", ".join(t.name for t in OPTIONS["CREATE MODEL"] if t.tune) + ".")
    if isinstance(v, HParamRange):
        if o.type not in ("int", "float"):
            raise OptionError(f"Option {o.name} takes HPARAM_CANDIDATES([...]), not a range", hint=f"{o.name} is {o.allowed()}.")
        lo, hi = _number(o, v.lo, whole=o.type == "int"), _number(o, v.hi, whole=o.type == "int")
        if not lo < hi:
            raise OptionError(f"Option {o.name} = {v}: the minimum must be below the maximum")
        scale = o.tune[3] if o.tune[0] == "range" else "linear"
        if scale == "log" and lo <= 0:  # BigQuery ML's (0, x] on a log scale: its lowest value is tiny, not 0
            lo = LOG_FLOOR
        return HParamRange(lo, hi, scale)
    if not v.values:
        raise OptionError(f"Option {o.name} = {v} needs at least one candidate")
    values = []
    for c in v.values:
        c = list(c) if isinstance(c, tuple) else c
        values.append(_convert(o, c))
    if len({repr(x) for x in values}) != len(values):
        raise OptionError(f"Option {o.name} = {v} lists a candidate twice")
    return HParamCandidates(tuple(tuple(x) if isinstance(x, list) else x for x in values))


LOG_FLOOR = 1e-5  # where a log-scale range written from 0 starts


def parse_duration(option: str, value, *, allow_zero: bool = False) -> float:
    """Seconds in ``value`` ('90 seconds', '1h', 2.5); an OptionError naming ``option`` otherwise."""
    import re

    units = {"ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
             "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
             "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
             "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
             "d": 86400.0, "day": 86400.0, "days": 86400.0, "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
             "": 1.0}
    help_ = "a duration such as '2s', '90 seconds', '5 minutes', '1h', '1 day', or a number of seconds"
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.match(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", value, re.IGNORECASE)
        if m and m.group(2).lower() in units:
            seconds = float(m.group(1)) * units[m.group(2).lower()]
    if seconds is None or not math.isfinite(seconds):
        raise OptionError(f"Option {option} = {value!r} is not a duration", hint=f"Use {help_}.")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise OptionError(f"Option {option} = {value!r} must be {'0 or more' if allow_zero else 'more than 0'} "
                          "seconds", hint=f"Use {help_}.")
    return seconds


# -- checks beyond type and range -------------------------------------------------------------
def _class_weights(name: str, v) -> dict:
    """``[STRUCT('a', 0.5), ...]`` or ``STRUCT(0.5 AS a, ...)`` → {label: weight}."""
    if isinstance(v, dict):
        items = list(v.items())
    elif isinstance(v, list) and all(isinstance(x, list | tuple) and len(x) == 2 for x in v):
        items = [tuple(x) for x in v]
    else:
        raise OptionError(f"Option {name} = {v!r} must be [STRUCT('label', weight), ...]")
    out: dict[Any, float] = {}
    for label, w in items:
        if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
            raise OptionError(f"Option {name} = {v!r}: the weight of {label!r} must be a number > 0, got {w!r}")
        out[label] = float(w)
    return out


def _no_cloud_uri(name: str, uri: str) -> str:
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme and scheme != "file":
        raise OptionError(f"uri = {uri!r}: {scheme}:// is not supported; MLSQL writes exports to local "
                          "paths (copy the file to cloud storage afterwards)")
    return uri


def _providers(name: str, v: list) -> list:
    from device_bridge.providers import SHORT_NAMES, ProviderError, to_ort_name

    for p in v:
        try:
            to_ort_name(p)
        except ProviderError:
            near = did_you_mean(p, SHORT_NAMES)
            raise OptionError(f"Option {name} = {v!r}: {p!r} is not an execution provider; use "
                              + ", ".join(repr(x) for x in PROVIDERS) + " or a full ONNX Runtime name",
                              hint=f"Did you mean '{near}'?" if near else None) from None
    return v


def _http_url(name: str, v: str) -> str:
    if not v.lower().startswith(("http://", "https://")):
        raise OptionError(f"Option {name} = {v!r} must be an http:// or https:// URL")
    return v


def _notify_urls(name: str, value: list) -> list:
    """Each a URL with a scheme (which service, apprise checks when the alert is created)."""
    for url in value:
        if "://" not in url or not url.split("://", 1)[0].replace("+", "").isalnum():
            raise OptionError(f"Option {name}: {url!r} is not a notification URL",
                              hint="Use an apprise URL: 'json://host:port/path' (a JSON webhook), "
                                   "'mailto://user:password@example.com', 'slack://...' (https://github.com/"
                                   "caronc/apprise/wiki lists them all).")
    return value


def _parameters(name: str, value) -> dict:
    import json

    if not isinstance(value, dict):
        raise OptionError(f"Option {name} = {value!r} must be a STRUCT of name = value",
                          hint="For example: parameters = STRUCT(10 AS n, 'eu' AS region), "
                               "or parameters = {'n': 10, 'region': 'eu'}.")
    for k, v in value.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise OptionError(f"Option {name}: {k!r} is not a valid Python variable name",
                              hint="Each parameter becomes a variable assigned in the notebook.")
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise OptionError(f"Option {name}: {k} = {v!r} is not a plain value",
                              hint="Use numbers, strings, booleans, NULL, lists and structs of those.") from None
    return dict(value)


def _thresholds(name: str, v: list) -> dict:
    """``[('col', 0.1), ...]`` or ``[STRUCT('col' AS name, 0.1 AS threshold), ...]`` → {column: threshold}
    (BigQuery ML's ARRAY<STRUCT<STRING, FLOAT64>>); each threshold in [0, 1)."""
    out: dict[str, float] = {}
    for item in v:
        if isinstance(item, dict) and set(item) <= {"name", "threshold"} and len(item) == 2:
            col, t = item["name"], item["threshold"]
        elif isinstance(item, list | tuple) and len(item) == 2:
            col, t = item
        else:
            raise OptionError(f"Option {name}: {item!r} must be ('column', threshold) or "
                              "STRUCT('column' AS name, threshold AS threshold)",
                              hint="For example: [('dep_delay', 0.1), ('carrier', 0.2)] AS thresholds.")
        if not isinstance(col, str):
            raise OptionError(f"Option {name}: the column of {item!r} must be a string, got {col!r}")
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < 1:
            raise OptionError(f"Option {name}: the threshold of column {col!r} must be a number in [0, 1), got {t!r}")
        if col.lower() in {c.lower() for c in out}:
            raise OptionError(f"Option {name}: column {col!r} is given twice")
        out[col] = float(t)
    return out


# the metrics an experiment reads out (mlsql/ml/experiments.py says which test each gets)
EXPERIMENT_METRICS = ("accuracy", "error_rate", "log_loss", "mean_absolute_error", "mean_squared_error", "latency_ms",
                      "p50_latency_ms", "p95_latency_ms", "p99_latency_ms")


def _arms(name: str, v: list) -> list:
    """``[STRUCT('m@3' AS model, 0.5 AS share), ...]`` → [{"model", "share"}]: versions named, shares
    in (0, 1] summing to 1, no model twice."""
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, dict) or set(item) != {"model", "share"}:
            raise OptionError(f"Option {name}: arm {i + 1} must be STRUCT('model@version' AS model, share AS share), "
                              f"got {item!r}")
        model, share = item["model"], item["share"]
        if not isinstance(model, str) or "@" not in model or not model.rsplit("@", 1)[1].isdigit():
            raise OptionError(f"Option {name}: arm {i + 1}'s model must name a version, 'model@3', got {model!r}")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise OptionError(f"Option {name}: arm {i + 1}'s share must be a number in (0, 1], got {share!r}")
        out.append({"model": model, "share": float(share)})
    total = sum(a["share"] for a in out)
    if abs(total - 1.0) > 1e-9:
        raise OptionError(f"Option {name}: the arms' shares sum to {total:g}, not 1",
                          hint="For two arms: 0.5 and 0.5, or 0.9 and 0.1.")
    models = [a["model"].lower() for a in out]
    if len(set(models)) != len(models):
        raise OptionError(f"Option {name}: an arm is given twice ({sorted(m for m in models if models.count(m) > 1)[0]})")
    return out


def _experiment_metrics(name: str, v: list) -> list:
    out = []
    for m in v:
        if m.lower() not in EXPERIMENT_METRICS:
            near = did_you_mean(m, EXPERIMENT_METRICS)
            raise OptionError(f"Option {name}: unknown metric {m!r}",
                              hint=(f"Did you mean '{near}'? " if near else "") + "Metrics: "
                              + ", ".join(EXPERIMENT_METRICS) + ".")
        if m.lower() not in out:
            out.append(m.lower())
    return out


QUALITY_METRICS = ("accuracy", "error_rate", "log_loss", "mean_absolute_error", "mean_squared_error")


def _metric_drop(name: str, v):
    """A number (the export's quantization bound), or STRUCT('accuracy' AS metric, 0.02 AS drop): the
    rollout's quality gate."""
    if not isinstance(v, dict):
        return v
    if set(v) != {"metric", "drop"}:
        raise OptionError(f"Option {name} = {v!r}: the quality gate is STRUCT('accuracy' AS metric, 0.02 AS drop)")
    metric, drop = v["metric"], v["drop"]
    if not isinstance(metric, str) or metric.lower() not in QUALITY_METRICS:
        near = did_you_mean(str(metric), QUALITY_METRICS)
        raise OptionError(f"Option {name}: unknown metric {metric!r}",
                          hint=(f"Did you mean '{near}'? " if near else "") + "Metrics: " + ", ".join(QUALITY_METRICS) + ".")
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not 0 <= drop or not math.isfinite(drop):
        raise OptionError(f"Option {name}: drop must be a number >= 0, got {drop!r}")
    return {"metric": metric.lower(), "drop": float(drop)}


def _unsupported(name: str, v):
    """An option of BigQuery ML's that MLSQL does not implement: refused, not silently ignored."""
    if v is False:
        return v
    raise OptionError(f"Option {name} = {v!r} is not supported by MLSQL's arima_plus",
                      hint="Leave it out (docs/LANGUAGE.md, Time series, lists what is modelled).")


REGRESSION_OBJECTIVES = ("mean_absolute_error", "mean_squared_error", "mean_squared_log_error",
                         "median_absolute_error", "r2_score", "explained_variance")
CLASSIFICATION_OBJECTIVES = ("precision", "recall", "accuracy", "f1_score", "log_loss", "roc_auc")
MINIMIZED = ("mean_absolute_error", "mean_squared_error", "mean_squared_log_error", "median_absolute_error",
             "log_loss")


def _objectives(name: str, v: list) -> list:
    out = []
    for m in v:
        if m.lower() not in REGRESSION_OBJECTIVES + CLASSIFICATION_OBJECTIVES:
            near = did_you_mean(m.lower(), REGRESSION_OBJECTIVES + CLASSIFICATION_OBJECTIVES)
            raise OptionError(f"Option {name}: {m!r} is not a tuning objective",
                              hint=(f"Did you mean '{near}'? " if near else "") + "Regressors: "
                              + ", ".join(REGRESSION_OBJECTIVES) + "; classifiers: " + ", ".join(CLASSIFICATION_OBJECTIVES)
                              + ".")
        out.append(m.lower())
    return out


_O = Option
_FRACTION = {"min": 0, "max": 1, "min_open": True, "max_open": True}
_UNIT = {"min": 0, "max": 1, "min_open": True}

_VALIDATE = (
    _O("categorical_default_threshold", "float", "the value above which a categorical feature is an anomaly",
       0.3, min=0, max=1, max_open=True),
    _O("categorical_metric_type", "enum", "how categorical distributions are compared", "l_infty",
       choices=("l_infty", "jensen_shannon_divergence"), default_doc="'L_INFTY'"),
    _O("numerical_default_threshold", "float", "the value above which a numerical feature is an anomaly",
       0.3, min=0, max=1, max_open=True),
    _O("numerical_metric_type", "enum", "how numerical distributions are compared (binned)",
       "jensen_shannon_divergence", choices=("jensen_shannon_divergence",),
       default_doc="'JENSEN_SHANNON_DIVERGENCE'"),
    _O("thresholds", "list", "per-column thresholds in [0, 1): [('col', 0.1), ...]", [], items="struct",
       check=_thresholds),
)

OPTIONS: dict[str, tuple[Option, ...]] = {
    "CREATE MODEL": (
        _O("model_type", "enum", "the kind of model to train (or, with model_path, to import)",
          choices=MODEL_TYPES + IMPORTED, required=True),
        _O("input_label_cols", "list", "the label column (one)", ["label"], items="str", min_items=1, max_items=1,
           model_types=SUPERVISED + IMPORTED),
        _O("max_iterations", "int", "boosting rounds (boosted trees), L-BFGS iterations (logistic), epochs (dnn), "
                                    "Lloyd iterations (kmeans)", 20, min=1, model_types=ITERATIVE),
        _O("learn_rate", "float", "step size", 0.3, min=0, min_open=True, model_types=BOOSTED + LINEAR + DNN,
          default_doc="0.3 (trees), 0.1 (linear), 0.001 (dnn)", tune=("range", 0.0, 1.0, "linear")),
        _O("max_tree_depth", "int", "maximum depth of a tree", 6, min=1, model_types=TREES,
          default_doc="6 (boosted trees), 20 (random forests)", tune=("range", 1, 10, "linear")),
        _O("l1_reg", "float", "L1 regularization (linear_reg with l1_reg is a lasso)", 0.0, min=0,
          model_types=SUPERVISED, tune=("range", 0.0, 10.0, "log")),
        _O("l2_reg", "float", "L2 regularization", 0.0, min=0, model_types=SUPERVISED,
          default_doc="1.0 (trees, forests), 0 (others)", tune=("range", 0.0, 10.0, "log")),
        _O("early_stop", "bool", "stop when the relative improvement of the (eval) loss falls below min_rel_progress",
          True, model_types=SUPERVISED + KMEANS),
        _O("min_rel_progress", "float", "the improvement early_stop asks of each iteration", 0.01, min=0,
           model_types=SUPERVISED + KMEANS),
        _O("data_split_method", "enum", "how rows are held out for evaluation", "auto_split",
          choices=("auto_split", "random", "seq", "custom", "no_split"), model_types=SUPERVISED),
        _O("data_split_eval_fraction", "float", "share held out for 'random' and 'seq'", 0.2, model_types=SUPERVISED,
           **_FRACTION),
        _O("data_split_col", "str", "ordering column for 'seq', BOOL flag column for 'custom' (TRUE = evaluation)",
           model_types=SUPERVISED),
        _O("class_weights", "struct", "weight per label: [STRUCT('a', 0.2), STRUCT('b', 0.8)] or STRUCT(0.2 AS a, ...)",
          model_types=CLASSIFIERS, check=_class_weights),
        _O("auto_class_weights", "bool", "weights inversely proportional to class frequency", False,
          model_types=CLASSIFIERS),
        _O("subsample", "float", "share of rows each tree sees", 1.0, model_types=TREES, **_UNIT,
          default_doc="1.0 (boosted trees), 0.8 (random forests)", tune=("range", 0.0, 1.0, "linear")),
        _O("colsample_bytree", "float", "share of columns each tree sees", 1.0, model_types=TREES, **_UNIT,
          tune=("range", 0.0, 1.0, "linear")),
        _O("colsample_bylevel", "float", "share of columns each tree level sees", 1.0, model_types=TREES, **_UNIT,
          tune=("range", 0.0, 1.0, "linear")),
        _O("colsample_bynode", "float", "share of columns each split sees", 1.0, model_types=TREES, **_UNIT,
          default_doc="1.0 (boosted trees), 0.8 (random forests)", tune=("range", 0.0, 1.0, "linear")),
        _O("min_split_loss", "float", "loss reduction a split needs (xgboost's gamma)", 0.0, min=0, model_types=TREES,
          tune=("range", 0.0, 20.0, "linear")),
        _O("min_tree_child_weight", "float", "hessian weight a leaf needs", 1.0, min=0, model_types=TREES,
          tune=("range", 0.0, 20.0, "linear")),
        _O("num_parallel_tree", "int", "trees grown per round (random-forest boosting); a random forest's trees "
                                       "(at least 2)", 1, min=1, model_types=TREES,
          default_doc="1 (boosted trees), 100 (random forests)", tune=("range", 1, 10, "linear")),
        _O("tree_method", "enum", "xgboost's tree construction", "hist", choices=("hist", "approx", "exact", "auto"),
          model_types=TREES, tune=("candidates", ["hist", "approx", "exact", "auto"])),
        _O("booster_type", "enum", "xgboost's booster", "gbtree", choices=("gbtree", "dart"), model_types=BOOSTED,
          tune=("candidates", ["gbtree", "dart"])),
        _O("enable_global_explain", "bool", "accepted for compatibility with BigQuery ML", False,
           model_types=SUPERVISED),
        _O("hidden_units", "list", "layer sizes", [128, 64], items="int", min=1, min_items=1, model_types=DNN,
          tune=("candidates", [[128, 64]])),
        _O("activation_fn", "enum", "activation of the hidden layers", "relu",
          choices=("relu", "relu6", "tanh", "sigmoid", "gelu", "elu", "selu", "crelu"), model_types=DNN,
          tune=("candidates", ["relu", "relu6", "tanh", "sigmoid", "gelu", "elu", "selu", "crelu"])),
        _O("dropout", "float", "dropout rate", 0.0, min=0, max=1, max_open=True, model_types=DNN,
          tune=("range", 0.0, 0.8, "linear")),
        _O("batch_size", "int", "rows per minibatch", 1024, min=1, model_types=DNN, tune=("range", 16, 1024, "log")),
        _O("optimizer", "enum", "the optimizer", "adam", choices=("adam", "adagrad", "sgd", "rmsprop", "ftrl"),
          model_types=DNN, tune=("candidates", ["adam", "adagrad", "sgd", "rmsprop", "ftrl"])),
        # k-means (mlsql/ml/kmeans.py): BigQuery ML's options
        _O("num_clusters", "int", "how many clusters", None, min=2, max=100, model_types=KMEANS,
           default_doc="round(log10(rows)), at least 2"),
        _O("kmeans_init_method", "enum", "the first centroids: random training rows, k-means++ (scikit-learn's; "
                                         "Spark ML's k-means|| on Spark), or the rows kmeans_init_col marks",
           "random", choices=("random", "kmeans++", "custom"), model_types=KMEANS, default_doc="'RANDOM'"),
        _O("kmeans_init_col", "str", "'custom': a BOOL column, TRUE on the num_clusters rows that are the first "
                                     "centroids (not a feature)", model_types=KMEANS),
        _O("distance_type", "enum", "the distance between a row and a centroid (cosine: 1 - cosine similarity)",
           "euclidean", choices=("euclidean", "cosine"), model_types=KMEANS, default_doc="'EUCLIDEAN'"),
        _O("standardize_features", "bool", "scale each numerical feature to mean 0 and standard deviation 1 first",
           True, model_types=KMEANS),
        # principal component analysis (mlsql/ml/pca.py): BigQuery ML's options
        _O("num_principal_components", "int", "how many principal components to keep", None, min=1, max=10_000,
           model_types=PCA, default_doc="— (this or pca_explained_variance_ratio)"),
        _O("pca_explained_variance_ratio", "float", "keep the fewest components that explain at least this share "
                                                    "of the variance", None, min=0, max=1, min_open=True,
           max_open=True, model_types=PCA, default_doc="— (this or num_principal_components)"),
        _O("scale_features", "bool", "scale each numerical feature to unit variance (features are always centred)",
           True, model_types=PCA),
        _O("pca_solver", "enum", "'full' (exact SVD), 'randomized' (randomized SVD) or 'auto' (scikit-learn's "
                                 "choice by size)", "auto", choices=("full", "randomized", "auto"), model_types=PCA,
           default_doc="'AUTO'"),
        _O("random_seed", "int", "seed of the data split and the trainer (MLSQL extension)", 42),
        # hyperparameter tuning, BigQuery ML's names (docs/LANGUAGE.md, Hyperparameter tuning)
        _O("num_trials", "int", "tune: train this many trials, each with hyperparameters from the search space "
                                "(HPARAM_RANGE / HPARAM_CANDIDATES options), and keep the best", None, min=1, max=100,
           default_doc="no tuning", model_types=SUPERVISED),
        _O("max_parallel_trials", "int", "tune: trials run at once, each in its own process with its share of "
                                         "the cores", 1, min=1, max=50, model_types=SUPERVISED),
        _O("hparam_tuning_algorithm", "enum", "tune: how trials pick hyperparameters: Optuna's TPE, random or "
                                             "grid sampler", "vizier_default",
           choices=("vizier_default", "random_search", "grid_search"), default_doc="'VIZIER_DEFAULT'",
           model_types=SUPERVISED),
        _O("hparam_tuning_objectives", "list", "tune: the metric on the evaluation split that picks the best trial",
           None, items="str", min_items=1, max_items=1, check=_objectives,
           default_doc="['r2_score'] (regressors), ['roc_auc'] (classifiers)", model_types=SUPERVISED),
        _O("data_split_test_fraction", "float", "tune: share held out as the test split, which no trial sees "
                                               "(ML.EVALUATE without input reports it)", None, min=0, max=1,
           max_open=True, default_doc="0.1 when tuning ('auto_split', 'random')", model_types=SUPERVISED),
        _O("resume", "bool", "tune: continue the interrupted tuning of this model (its stored Optuna study) "
                             "instead of starting over (MLSQL extension)", False, model_types=SUPERVISED),
        _O("num_threads", "int", "CPU threads (MLSQL extension)", None, min=1, model_types=TREES + LINEAR,
          default_doc="all cores"),
        # importing a model trained elsewhere (docs/LANGUAGE.md, Importing models)
        _O("model_path", "str", "import: the ONNX, torch (torch.export / TorchScript) or xgboost (JSON / UBJ) "
                                "file, or an MLflow URI models:/name/version, runs:/id/path", model_types=IMPORTED),
        _O("output_cols", "list", "import: the column name of each graph output, in the graph's order", None,
          items="str", min_items=1, model_types=("onnx", "torch"), default_doc="as ML.PREDICT names them"),
        _O("class_labels", "list", "import: the label of each class of a classifier's probabilities, in order",
          None, min_items=2, model_types=("onnx", "torch"), default_doc="0, 1, ..."),
        # arima_plus (mlsql/ml/forecast.py; docs/LANGUAGE.md, Time series)
        _O("time_series_timestamp_col", "str", "arima_plus: the DATE or TIMESTAMP column of the series' points",
           model_types=FORECASTERS, default_doc="required"),
        _O("time_series_data_col", "str", "arima_plus: the numeric column to forecast", model_types=FORECASTERS,
           default_doc="required"),
        _O("time_series_id_col", "list", "arima_plus: the column(s) naming each series: one model, one ARIMA per "
                                         "series", None, items="str", min_items=1, model_types=FORECASTERS,
           default_doc="one series"),
        _O("horizon", "int", "arima_plus: steps forecast at training; ML.FORECAST may ask for up to this many",
           1000, min=1, max=10_000, model_types=FORECASTERS),
        _O("auto_arima", "bool", "arima_plus: choose the ARIMA order per series (statsforecast's AutoARIMA, "
                                 "stepwise by AICc); FALSE: non_seasonal_order", True, model_types=FORECASTERS),
        _O("auto_arima_max_order", "int", "arima_plus: the largest p + q auto_arima tries", 5, min=1, max=5,
           model_types=FORECASTERS),
        _O("non_seasonal_order", "list", "arima_plus with auto_arima = FALSE: (p, d, q)", None, items="int", min=0,
           min_items=3, max_items=3, model_types=FORECASTERS, default_doc="(0, 1, 1)"),
        _O("include_drift", "bool", "arima_plus with auto_arima = FALSE: a drift term (d = 1)", False,
           model_types=FORECASTERS),
        _O("data_frequency", "enum", "arima_plus: the series' frequency; auto_frequency: the median step",
           "auto_frequency", choices=("auto_frequency", "per_minute", "hourly", "daily", "weekly", "monthly",
                                      "quarterly", "yearly"), model_types=FORECASTERS, default_doc="'AUTO_FREQUENCY'"),
        _O("decompose_time_series", "bool", "arima_plus: take out seasonal components (MSTL) before the ARIMA",
           True, model_types=FORECASTERS),
        _O("clean_spikes_and_dips", "bool", "arima_plus: replace points whose remainder is > 8 robust standard "
                                            "deviations from its median", True, model_types=FORECASTERS),
        _O("adjust_step_changes", "bool", "arima_plus: not supported (BigQuery ML's default is TRUE); TRUE is "
                                          "refused", False, model_types=FORECASTERS, check=_unsupported),
        _O("holiday_region", "str", "arima_plus: not supported (holiday effects are not modelled); refused",
           model_types=FORECASTERS, check=_unsupported),
        _O("aliases", "list", "registry aliases to point at the new version, e.g. ['champion']", [], items="str"),
        _O("alias", "list", "the same as aliases", [], items="str"),
    ),
    "EXPORT MODEL": (
        _O("uri", "str", "where to write the ONNX file (a local path; relative to <workspace>/exports)", None,
          default_doc="<workspace>/exports/<name>_v<version>[_<quantize>].onnx", check=_no_cloud_uri),
        _O("format", "enum", "the export format: onnx, or also ONNX Runtime's ORT format optimized offline (.ort "
                             "beside the .onnx)", "onnx", choices=("onnx", "ort")),
        _O("quantize", "enum", "int8 (dynamic), int8_static (calibrated QDQ), fp16 weights, or none", "none",
          choices=QUANTIZE),
        _O("tree_format", "enum", "boosted trees as a TreeEnsemble, tensor ops (tensor) or GEMMs (gemm)",
          "ensemble", choices=TREE_FORMATS),
        _O("max_metric_drop", "float", "how much of its metric a quantized model may lose before it is refused",
          MAX_METRIC_DROP, min=0),
        _O("calibration_query", "str", "rows (raw columns) that calibrate int8_static", None,
          default_doc="2,000 rows sampled from the training query"),
        _O("calibrate", "str", "calibrate = (SELECT ...): the same as calibration_query, the query written in the "
                               "statement", None, default_doc="calibration_query's"),
        _O("opset", "int", "ONNX opset of the file (a graph that needs a newer one is refused)", 17, min=13, max=21),
        _O("package", "bool", "also write a signed device package <file>.mlpkg", False),
        _O("providers", "list", "preferred execution providers recorded in the package (implies package = TRUE)",
          None, items="str", min_items=1, check=_providers),
        _O("trial_id", "int", "a tuned model: export this trial's model instead of the optimal one (the ONNX "
                              "file only: a device package holds the version's optimal trial)", None, min=1,
           default_doc="the optimal trial"),
    ),
    "DEPLOY MODEL": (
        _O("providers", "list", "ordered provider preference; the agent falls back down the list", ["cpu"],
          items="str", min_items=1, check=_providers),
        _O("trial_id", "int", "a tuned model: deploy this trial, registered first as a version of its own "
                              "(once; the next DEPLOY of it finds that version)", None, min=1,
           default_doc="the optimal trial"),
        _O("strict_providers", "bool", "fail the deploy instead of falling back to another provider", False),
        _O("quantize", "enum", "the exported form, as EXPORT", "none", choices=QUANTIZE),
        _O("tree_format", "enum", "the exported form of boosted trees, as EXPORT", "ensemble", choices=TREE_FORMATS),
        _O("calibration_query", "str", "rows that calibrate int8_static, as EXPORT"),
        _O("calibrate", "str", "calibrate = (SELECT ...): rows that calibrate int8_static, as EXPORT"),
        _O("format", "enum", "the form the device loads: onnx, or ONNX Runtime's ORT format optimized offline",
           "onnx", choices=("onnx", "ort")),
        _O("max_metric_drop", "float", "as EXPORT: a quantized form that loses more is refused before sending; "
                                       "groups: STRUCT('accuracy' AS metric, 0.02 AS drop) gates each wave on the "
                                       "online metric from late outcomes (docs/DEVICE.md, Staged rollout)",
           MAX_METRIC_DROP, min=0, struct_ok=True, check=_metric_drop),
        _O("notify", "list", "groups: where a stopped rollout is announced, with its reason: apprise URLs "
                             "('json://host/path', 'mailto://...', 'slack://...'), as CREATE ALERT's", None,
           items="str", check=_notify_urls, default_doc="none"),
        _O("min_outcomes", "int", "groups, with max_metric_drop = STRUCT(...): labelled rows of the new version on "
                                  "a wave's devices (and of the previous version) before the quality gate",
           500, min=1),
        _O("only_if_better", "str", "a metric name: deploy only if this version beats the one active on the device"),
        _O("rollout_percent", "float", "groups: wave size as a share of the fleet", None, min=0, max=100,
          min_open=True, default_doc="one wave"),
        _O("batch_size", "int", "groups: wave size as a number of devices", None, min=1, default_doc="one wave"),
        _O("max_error_rate", "float", "groups: a wave fails when the new version's error rate passes this", None,
          min=0, max=1),
        _O("max_p95_ms", "float", "groups: a wave fails when a device's p95 latency passes this", None,
          min=0, min_open=True),
        _O("max_drift", "float", "groups: a wave fails when an input's mean moves more training stddevs than this",
          None, min=0),
        _O("required_provider", "str", "groups: the provider every device must really run the model on"),
        _O("wave_timeout_s", "float", "groups: seconds for a wave to activate", 60.0, min=0, min_open=True),
        _O("observe_s", "float", "groups: seconds to observe a wave before its gates", 0.0, min=0),
        _O("min_requests", "int", "groups: requests per device to wait for before the gates", 0, min=0),
        # how the deployment shares the device (the agent's class defaults for what is not given;
        # docs/DEVICE.md, Sharing one device): sent with the install, kept per version on the agent
        _O("priority", "enum", "the scheduling class: realtime first, batch in what is left", None,
          choices=("realtime", "normal", "batch"), default_doc="the agent's 'normal'"),
        _O("max_concurrency", "int", "runs of this model at once", None, min=1, max=64,
          default_doc="the class's (cores for realtime and normal, 2 for batch)"),
        _O("max_queue", "int", "requests that may wait for a run; one more is answered 429", None, min=0, max=4096,
          default_doc="the class's"),
        _O("timeout_ms", "int", "each request's deadline from its arrival: later, 504", None, min=1, max=600_000,
          default_doc="the class's (100 realtime, 10 000 normal, 60 000 batch)"),
        _O("memory_mb", "int", "the model's memory budget (enforced for a worker process)", None, min=1,
          max=1 << 20, default_doc="the class's (256; 1024 batch)"),
        _O("isolation", "enum", "'process': its own worker process, restarted if it crashes; 'thread': in the agent",
          None, choices=("thread", "process"), default_doc="'process' for batch, else 'thread'"),
        # what comes back from the device (docs/DEVICE.md, Device data): nothing unless asked
        _O("sample_rate", "float", "share of prediction requests whose rows the device keeps and sends back "
                                   "(ML.DEVICE_DATA); 0 keeps nothing: the privacy default", None, min=0, max=1,
           default_doc="0"),
        _O("sample_max_mb", "int", "bytes of samples and outcomes the device keeps for this model; the oldest "
                                   "are dropped first, and counted", None, min=1, max=4096, default_doc="64"),
        _O("sample_exclude", "list", "input columns never stored or sent", None, items="str", default_doc="none"),
        _O("sample_hash", "list", "input columns stored as a keyed hash (HMAC-SHA256 with the workspace's "
                                  "salt), never the raw value", None, items="str", default_doc="none"),
        # the state of the feature views the package carries (docs/DEVICE.md, Feature views on the device)
        _O("max_keys", "int", "keys each feature view of the model keeps on the device; over it the keys with "
                              "the oldest events are evicted first (counted in /v1/metrics)", None, min=1,
           max=1 << 31, default_doc="1 000 000"),
        _O("max_state_mb", "int", "bytes of each feature view's state on the device; over it the keys with the "
                                  "oldest events are evicted first", None, min=1, max=1 << 16, default_doc="256"),
        _O("trigger", "struct", "run the model on the device when a matching event arrives, keeping the latest "
                                "answer per key: STRUCT('app_events' AS on_table, 'kind = ''purchase''' AS "
                                "when_sql)", None, default_doc="none"),
    ),
    "CREATE EXPERIMENT": (
        _O("arms", "list", "the arms, control first: [STRUCT('m@3' AS model, 0.5 AS share), ...], versions of one "
                           "model, shares summing to 1", required=True, items="struct", min_items=2, max_items=16,
           check=_arms),
        _O("unit", "str", "what is assigned to an arm: 'device' (each device serves one arm), 'request', or an input "
           "column's name ('user_id': each value's rows go to one arm)",
           "device"),
        _O("metrics", "list", "what the readout compares (each with its test: docs/LANGUAGE.md, Experiments)",
           ["accuracy", "log_loss", "p95_latency_ms"], items="str", min_items=1, check=_experiment_metrics),
        _O("primary_metric", "str", "the metric the decision is about; one of metrics", None,
           default_doc="the first of metrics"),
        _O("min_samples_per_arm", "int", "labelled rows each arm needs before its result counts", 1000, min=1),
        _O("alpha", "float", "the significance level of each comparison with the control", 0.05, min=0, max=0.5,
           min_open=True, max_open=True),
        _O("power", "float", "the power samples_needed is computed for", 0.8, min=0, max=1, min_open=True,
           max_open=True),
        _O("mde", "float", "the minimum detectable effect samples_needed is computed for (absolute)", None, min=0,
           min_open=True, default_doc="0.02 for a proportion, 5 % of the control's value otherwise"),
        _O("sample_rate", "float", "share of requests whose rows each device keeps for the readout", 1.0, min=0,
           max=1, min_open=True),
    ),
    "CREATE DEVICE": (
        _O("url", "str", "the agent's address, http://host:port", required=True, check=_http_url),
        _O("token", "str", "the agent's device token", ""),
        _O("providers", "list", "the default provider preference", [], items="str", check=_providers),
        _O("description", "str", "free text", ""),
        _O("timeout_s", "float", "seconds an HTTP call to the agent may take", 30.0, min=0, min_open=True),
        _O("verify_tls", "bool", "check the agent's TLS certificate (https)", True),
    ),
    "CREATE DEVICE GROUP": (
        _O("devices", "list", "the agents' names at the hub (empty: every agent of the group)", [], items="str"),
        _O("hub", "str", "the hub's address, http://host:port", "", check=_http_url),
        _O("hub_token", "str", "the hub's operator token", ""),
        _O("description", "str", "free text", ""),
    ),
    "CREATE JOB": (
        _O("schedule", "str", "a 5-field cron string: minute hour day-of-month month day-of-week"),
        _O("every", "duration", "a fixed interval ('10 minutes', '1h', or seconds)"),
        _O("timezone", "str", "the IANA time zone the cron schedule is read in", "UTC"),
        _O("parameters", "struct", "values for the notebook's parameters cell: STRUCT(7 AS days)", {},
          check=_parameters),
        _O("timeout", "duration", "time for the whole run"),
        _O("retries", "int", "how many times a failed or timed-out run is tried again", 0, min=0),
        _O("retry_backoff", "duration", "wait before the first retry; doubles for each next one", 10.0, min=0,
           default_doc="'10s'"),
        _O("max_concurrent", "int", "runs of the job at once, across all processes", 1, min=1),
        _O("kernel", "str", "a Jupyter kernel name; none: the notebook's own", None),
        _O("description", "str", "free text", None),
    ),
    "CREATE ALERT": (
        _O("every", "duration", "how often the alert's query is checked ('5 minutes', '1h', or seconds)",
           required=True),
        _O("notify", "list", "where a fired alert is sent: apprise URLs ('json://host/path', 'mailto://...', "
                             "'slack://...')", required=True, items="str", min_items=1, check=_notify_urls),
        _O("message", "str", "the notification's text before the rows; {alert} and {rows} are replaced", None),
        _O("max_rows", "int", "how many of the query's rows the notification and the history show", 5, min=0,
           max=100),
        _O("cooldown", "duration", "after a notification, checks that fire again within this time are recorded "
                                   "but not sent", 0.0, min=0, default_doc="0 (every firing check is sent)"),
        _O("retries", "int", "how many times a failed notification is tried again within one check", 2, min=0,
           max=10),
        _O("retry_backoff", "duration", "wait before the first retry; doubles for each next one", 1.0, min=0,
           default_doc="'1s'"),
        _O("timeout", "duration", "time for the query of one check", 300.0,
           default_doc="'5 minutes'"),
        _O("description", "str", "free text", None),
    ),
    "CREATE FEATURE VIEW": (
        _O("key", "str", "the event table's column the view is partitioned by: every window's PARTITION BY",
           required=True),
        _O("time_col", "str", "the event table's TIMESTAMP column: every window's ORDER BY", required=True),
        _O("ttl", "duration", "how long a key's events matter: every window must be at most this long; a device "
                              "may drop a key's state once its newest event is older (INTERVAL 30 DAYS, '30 days')",
           required=True),
        _O("max_distinct", "int", "count(DISTINCT x) features: at most this many distinct values are counted per "
                                  "key and window (the value is capped there, offline and on the device)", 64,
           min=1, max=65536),
    ),
    "ML.PREDICT": (
        _O("threshold", "float", "binary classifiers: the probability from which the positive label is predicted",
          0.5, min=0, max=1),
        _O("device", "str", "a registered device: predict there instead of in the notebook"),
        _O("trial_id", "int", "a tuned model: use this trial's model instead of the optimal one", None, min=1,
           default_doc="the optimal trial"),
    ),
    "ML.EXPLAIN_PREDICT": (
        _O("top_k_features", "int", "how many attributions to return per row", 5, min=1),
        _O("threshold", "float", "binary classifiers: the probability from which the positive label is predicted",
          0.5, min=0, max=1),
        _O("trial_id", "int", "a tuned model: use this trial's model instead of the optimal one", None, min=1,
           default_doc="the optimal trial"),
    ),
    "ML.EVALUATE": (
        _O("threshold", "float", "binary classifiers: the probability from which the positive label is predicted",
          0.5, min=0, max=1),
        _O("trial_id", "int", "a tuned model: use this trial's model instead of the optimal one", None, min=1,
           default_doc="the optimal trial"),
    ),
    "ML.COMPARE_MODELS": (
        _O("threshold", "float", "binary classifiers: the probability from which the positive label is predicted",
          0.5, min=0, max=1),
        _O("order_by", "str", "the metric that ranks the models (the best first; lower is better for errors "
                              "and log_loss)", None, default_doc="'roc_auc' (classifiers), 'r2_score' (regressors)"),
    ),
    "ML.PROFILE": (
        _O("device", "str", "a registered device: profile the model deployed there", None,
           default_doc="in the notebook's process"),
        _O("batch_sizes", "list", "rows per run; each is profiled", [1, 32], items="int", min=1, max=1024,
           min_items=1, max_items=4),
        _O("runs", "int", "timed runs per batch size (after 3 warm-up runs)", 50, min=1, max=200),
        _O("provider", "enum", "the execution provider to run on", "cpu", choices=PROVIDERS),
    ),
    "ML.CENTROIDS": (
        _O("standardize", "bool", "the centroids of standardized numerical features (mean 0, standard deviation 1), "
                                  "so their magnitudes compare", False),
    ),
    "ML.DETECT_ANOMALIES": (
        _O("contamination", "float", "kmeans, pca: the share of the training rows that count as anomalies: a row is "
                                     "one when its score passes that quantile of the training rows' scores", None,
           min=0, max=0.5, default_doc="required for kmeans and pca"),
        _O("anomaly_prob_threshold", "float", "arima_plus: a point is an anomaly when its anomaly_probability is "
                                              "above this", 0.95, min=0, max=1, max_open=True),
    ),
    "ML.WEIGHTS": (
        _O("standardize", "bool", "the weights of standardized inputs (mean 0, standard deviation 1), so "
                                  "their magnitudes compare", False),
    ),
    "ML.DEVICE_DATA": (
        _O("since", "str", "only predictions made at or after this time: TIMESTAMP '2026-12-01 10:00' (UTC)"),
        _O("max_rows", "int", "at most this many rows, the latest", 100_000, min=1, max=1_000_000),
    ),
    "ML.FORECAST": (
        _O("horizon", "int", "steps to forecast (at most the model's horizon option)", 3, min=1, max=10_000),
        _O("confidence_level", "float", "the share of the prediction interval", 0.95, min=0, max=1, max_open=True),
    ),
    "ML.EXPLAIN_FORECAST": (
        _O("horizon", "int", "steps to forecast (at most the model's horizon option)", 3, min=1, max=10_000),
        _O("confidence_level", "float", "the share of the prediction interval", 0.95, min=0, max=1, max_open=True),
    ),
    "ML.CONFUSION_MATRIX": (
        _O("threshold", "float", "binary classifiers: the probability from which the positive label is predicted",
          0.5, min=0, max=1),
    ),
    # BigQuery ML's data validation functions (docs/LANGUAGE.md, Data validation)
    "ML.VALIDATE_DATA_SKEW": _VALIDATE,
    "ML.VALIDATE_DATA_DRIFT": (
        _O("num_histogram_buckets", "int", "equal-width bins between the baseline's minimum and maximum, over which "
                                           "numerical features are compared", 10, min=1, max=1000),
        *_VALIDATE,
    ),
    "ML.DESCRIBE_DATA": (
        _O("num_quantiles", "int", "quantiles of numerical columns: num_quantiles + 1 values, minimum to maximum",
          2, min=1, max=100_000),
        _O("top_k", "int", "most frequent values listed per column in top_values", 1, min=1, max=10_000),
    ),
}
del _O

# what each kind is called where a user writes it, for error messages
_WHERE = {k: (f"in {k}'s STRUCT(...)" if k.startswith("ML.") else f"in {k} OPTIONS") for k in OPTIONS}
_SHORT = {"model": "CREATE MODEL", "export": "EXPORT MODEL", "deploy": "DEPLOY MODEL", "device": "CREATE DEVICE",
          "group": "CREATE DEVICE GROUP", "device group": "CREATE DEVICE GROUP", "device_group": "CREATE DEVICE GROUP",
          "job": "CREATE JOB", "alert": "CREATE ALERT", "experiment": "CREATE EXPERIMENT",
          "feature view": "CREATE FEATURE VIEW"}


def kind_of(statement_kind: str) -> str:
    """The table's key for ``statement_kind`` ('CREATE MODEL', 'model', 'ml.predict', 'PREDICT', ...)."""
    k = " ".join(str(statement_kind).split()).upper()
    if k in OPTIONS:
        return k
    if k.replace("_", " ") in OPTIONS:  # 'create_model'
        return k.replace("_", " ")
    if f"ML.{k}" in OPTIONS:
        return f"ML.{k}"
    short = _SHORT.get(k.lower())
    if short:
        return short
    if k.startswith("ML."):
        return k  # an ML function without settings
    near = did_you_mean(k, list(OPTIONS))
    raise MLSQLError(f"No OPTIONS are declared for {statement_kind!r}",
                     hint=f"Did you mean '{near}'?" if near else "Kinds: " + ", ".join(OPTIONS) + ".")


def options_of(statement_kind: str) -> tuple[Option, ...]:
    """The declared options of a statement kind (empty for an ML function without settings)."""
    return OPTIONS.get(kind_of(statement_kind), ())


def options_for(statement_kind: str, model_type: str | None = None) -> list[tuple[str, str, str]]:
    """``(name, type, doc)`` of each option a statement kind takes (for CREATE MODEL, those that
    apply to ``model_type``, when given), in the table's order: what completion offers."""
    return [(o.name, o.type, o.doc) for o in options_of(statement_kind) if o.applies_to(model_type)]


def validate(statement_kind: str, raw: dict[str, Any] | None, *, defaults: bool = False) -> dict[str, Any]:
    """Check what a user wrote in a statement's OPTIONS (or STRUCT settings): names lower-cased,
    values converted to the declared type. An unknown name is an ``UnknownOptionError`` naming the
    statement and the nearest option; a value of the wrong type or out of range is an
    ``OptionError`` naming the option, the value and what is allowed; so is an option given for a
    model type it does not apply to. Every option is checked: the first error raised carries the
    others (``also``), in the order they were written, each naming its option (``option``,
    ``statement_kind``) for the session to point at. NULL means 'not given'. With ``defaults``,
    every declared option not given is filled with its default."""
    kind = kind_of(statement_kind)
    table = {o.name: o for o in OPTIONS.get(kind, ())}
    where = _WHERE.get(kind, f"in {kind} OPTIONS")
    out: dict[str, Any] = {}
    errors: list[MLSQLError] = []

    def bad(err: MLSQLError, name: str, at_name: bool = False) -> None:
        if isinstance(err, OptionError) and err.option is None:
            err.option, err.at_name = name, at_name
        if isinstance(err, OptionError | UnknownOptionError):
            err.statement_kind = kind
        errors.append(err)

    for key, value in (raw or {}).items():
        name = str(key).lower()
        o = table.get(name)
        if o is None:
            if not table and kind.startswith("ML."):
                raise MLSQLError(f"{kind} takes no settings, got STRUCT(... AS {name})")
            bad(UnknownOptionError(name, list(table), where=where), name)
            continue
        if value is None:
            continue
        try:
            v = _convert(o, value)
            out[name] = o.check(name, v) if o.check else v
        except OptionError as exc:
            bad(exc, name)
    model_type = out.get("model_type")
    for name in out:
        if not table[name].applies_to(model_type):  # BigQuery ML refuses these too, rather than ignore them
            bad(OptionError(f"Option {name} applies to {', '.join(table[name].model_types)}, not {model_type}"),
                name, at_name=True)
    if kind == "CREATE MODEL":
        _check_tuning(out, bad)
    given = {str(k).lower() for k, v in (raw or {}).items() if v is not None}
    for o in table.values():
        if o.required and o.name not in given:  # given but wrong is reported above
            errors.append(OptionError(f"{kind} needs OPTIONS ({o.name} = ...)",
                                      hint=("One of: " + ", ".join(f"'{c}'" for c in o.choices) + ".") if o.choices
                                      else f"{o.name}: {o.doc}."))
        if defaults and o.name not in out:
            out[o.name] = copy.deepcopy(o.default)
    if errors:
        raise errors[0].add(errors[1:], f"{len(errors)} bad options {where}") if len(errors) > 1 else errors[0]
    return out


TUNING_OPTIONS = ("max_parallel_trials", "hparam_tuning_algorithm", "hparam_tuning_objectives",
                  "data_split_test_fraction", "resume")


def _check_tuning(out: dict, bad) -> None:
    """A search space and the tuning options need num_trials; the objective must be one of the model
    type's; grid search takes candidates only."""
    spaces = [k for k, v in out.items() if isinstance(v, HParamRange | HParamCandidates)]
    if "num_trials" not in out:
        for k in spaces:
            bad(OptionError(f"Option {k} = {out[k]} needs num_trials (how many trials to tune it with)",
                            hint="Add num_trials = 10 to OPTIONS, or give a single value."), k)
        for k in TUNING_OPTIONS:
            if k in out and k != "resume":
                bad(OptionError(f"Option {k} needs num_trials: it tunes"), k, True)
        return
    mt = str(out.get("model_type") or "")
    objs = out.get("hparam_tuning_objectives") or []
    allowed = CLASSIFICATION_OBJECTIVES if mt in CLASSIFIERS else REGRESSION_OBJECTIVES
    for m in objs:
        if mt and m not in allowed:
            bad(OptionError(f"Option hparam_tuning_objectives: {m!r} is not an objective of {mt}",
                            hint="Use one of: " + ", ".join(allowed) + "."), "hparam_tuning_objectives")
    if out.get("hparam_tuning_algorithm") == "grid_search":
        for k in spaces:
            if isinstance(out[k], HParamRange):
                bad(OptionError(f"Option {k} = {out[k]}: GRID_SEARCH takes HPARAM_CANDIDATES only"), k)


def defaults(statement_kind: str) -> dict[str, Any]:
    """Every option's default for a statement kind."""
    return {o.name: copy.deepcopy(o.default) for o in options_of(statement_kind)}


# -- docs --------------------------------------------------------------------------------------
def _show_default(o: Option) -> str:
    if o.required:
        return "required"
    if o.default_doc is not None:
        return o.default_doc
    v = o.default
    if v is None or v == "" or v == [] or v == {}:
        return "—"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, list):
        return "[" + ", ".join(f"'{x}'" if isinstance(x, str) else f"{x:g}" for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


_APPLIES = {(): "all", TREES: "boosted trees, random forests", BOOSTED: "boosted trees", CLASSIFIERS: "classifiers",
            DNN: "dnn", TREES + LINEAR: "trees, forests, linear", SUPERVISED: "models trained here, but kmeans, pca",
            SUPERVISED + IMPORTED: "all but kmeans, pca", SUPERVISED + KMEANS: "models trained here, but pca",
            ITERATIVE: "boosted trees, linear, dnn, kmeans", BOOSTED + LINEAR + DNN: "boosted trees, linear, dnn"}


def markdown(kinds: Iterable[str] | None = None) -> str:
    """docs/LANGUAGE.md's options reference, written from the table."""
    out = []
    for kind in kinds or OPTIONS:
        out += [f"#### {kind}", "", "| option | type | default | applies to | allowed | meaning |",
                "|---|---|---|---|---|---|"]
        for o in OPTIONS[kind]:
            applies = _APPLIES.get(o.model_types) or ", ".join(o.model_types)
            allowed = o.allowed().replace("|", "\\|")
            out.append(f"| `{o.name}` | {o.type} | {_show_default(o).replace('|', chr(92) + '|')} | {applies} | "
                       f"{allowed} | {o.doc} |")
        out.append("")
    if kinds is None:
        out += tuning_markdown()
    return "\n".join(out).rstrip() + "\n"


def tuning_markdown() -> list[str]:
    """The hyperparameters each model type can tune (HPARAM_RANGE / HPARAM_CANDIDATES), with
    BigQuery ML's default search space and scale, and the tuning objectives (first: the default)."""
    out = ["#### Hyperparameter tuning", "", "| model type | objectives (default first) | hyperparameter | "
           "default search space | scale |", "|---|---|---|---|---|"]
    for mt in (m for m in MODEL_TYPES if m not in FORECASTERS):
        objs = ["roc_auc", *[o for o in CLASSIFICATION_OBJECTIVES if o != "roc_auc"]] if mt in CLASSIFIERS else \
            ["r2_score", *[o for o in REGRESSION_OBJECTIVES if o != "r2_score"]]
        for i, o in enumerate(x for x in OPTIONS["CREATE MODEL"] if x.tune and x.applies_to(mt)):
            if o.tune[0] == "range":
                space, scale = f"[{o.tune[1]:g}, {o.tune[2]:g}]", o.tune[3].upper()
            else:
                space, scale = "candidates " + ", ".join(str(v) for v in o.tune[1]), "—"
            out.append(f"| {mt if i == 0 else ''} | {', '.join(objs) if i == 0 else ''} | `{o.name}` | {space} | {scale} |")
    out.append("")
    return out


if __name__ == "__main__":  # python -m mlsql.language.options: print the reference docs/LANGUAGE.md holds
    print(markdown(), end="")

"""CREATE MODEL options: BigQuery ML's names and defaults, validated before any data is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import OptionError, UnknownOptionError, did_you_mean

MODEL_TYPES = (
    "boosted_tree_classifier",
    "boosted_tree_regressor",
    "linear_reg",
    "logistic_reg",
    "dnn_classifier",
    "dnn_regressor",
)
CLASSIFIERS = ("boosted_tree_classifier", "logistic_reg", "dnn_classifier")
SPLIT_METHODS = ("auto_split", "random", "seq", "custom", "no_split")
ACTIVATIONS = ("relu", "relu6", "tanh", "sigmoid", "gelu", "elu", "selu", "crelu")
OPTIMIZERS = ("adam", "adagrad", "sgd", "rmsprop", "ftrl")


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1:
        raise OptionError(f"Option {name} must be a positive whole number, got {v!r}")
    return int(v)


def _non_negative(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise OptionError(f"Option {name} must be a number ≥ 0, got {v!r}")
    return float(v)


def _positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise OptionError(f"Option {name} must be a number > 0, got {v!r}")
    return float(v)


def _fraction(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise OptionError(f"Option {name} must be a number between 0 and 1 (exclusive), got {v!r}")
    return float(v)


def _unit(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
        raise OptionError(f"Option {name} must be a number in (0, 1], got {v!r}")
    return float(v)


def _dropout(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise OptionError(f"Option {name} must be a number in [0, 1), got {v!r}")
    return float(v)


def _bool(name, v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise OptionError(f"Option {name} must be TRUE or FALSE, got {v!r}")


def _int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise OptionError(f"Option {name} must be a whole number, got {v!r}")
    return int(v)


def _string(name, v):
    if not isinstance(v, str):
        raise OptionError(f"Option {name} must be a string, got {v!r}")
    return v


def _choice(*choices):
    def check(name, v):
        if not isinstance(v, str) or v.lower() not in choices:
            near = did_you_mean(str(v), choices)
            raise OptionError(
                f"Option {name} = {v!r} is not one of {', '.join(repr(c) for c in choices)}",
                hint=f"Did you mean '{near}'?" if near else None,
            )
        return v.lower()

    return check


def _label_cols(name, v):
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or len(v) != 1 or not isinstance(v[0], str):
        raise OptionError(f"Option {name} must name exactly one label column, e.g. ['label'], got {v!r}")
    return v


def _hidden_units(name, v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v:
        raise OptionError(f"Option {name} must be a list of layer sizes, e.g. [128, 64], got {v!r}")
    return [_positive_int(name, x) for x in v]


def _class_weights(name, v):
    """``[STRUCT('a', 0.5), ...]`` or ``STRUCT(0.5 AS a, ...)`` → {label: weight}."""
    out: dict[Any, float] = {}
    if isinstance(v, dict):
        items = list(v.items())
    elif isinstance(v, list) and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in v):
        items = [tuple(x) for x in v]
    else:
        raise OptionError(f"Option {name} must be [STRUCT('label', weight), ...], got {v!r}")
    for label, w in items:
        out[label] = _positive(name, w)
    return out


# name -> validator. Defaults live in Options.
SPEC = {
    "model_type": _choice(*MODEL_TYPES),
    "input_label_cols": _label_cols,
    "max_iterations": _positive_int,
    "learn_rate": _positive,
    "max_tree_depth": _positive_int,
    "l1_reg": _non_negative,
    "l2_reg": _non_negative,
    "early_stop": _bool,
    "min_rel_progress": _non_negative,
    "data_split_method": _choice(*SPLIT_METHODS),
    "data_split_eval_fraction": _fraction,
    "data_split_col": _string,
    "class_weights": _class_weights,
    "auto_class_weights": _bool,
    "subsample": _unit,
    "colsample_bytree": _unit,
    "colsample_bylevel": _unit,
    "colsample_bynode": _unit,
    "min_split_loss": _non_negative,
    "min_tree_child_weight": _non_negative,
    "num_parallel_tree": _positive_int,
    "tree_method": _choice("hist", "approx", "exact", "auto"),
    "booster_type": _choice("gbtree", "dart"),
    "enable_global_explain": _bool,
    "hidden_units": _hidden_units,
    "activation_fn": _choice(*ACTIVATIONS),
    "dropout": _dropout,
    "batch_size": _positive_int,
    "optimizer": _choice(*OPTIMIZERS),
    "random_seed": _int,
    "num_threads": _positive_int,
}


@dataclass
class Options:
    model_type: str
    label: str = "label"
    max_iterations: int = 20
    learn_rate: float = 0.3
    max_tree_depth: int = 6
    l1_reg: float = 0.0
    l2_reg: float = 0.0
    early_stop: bool = True
    min_rel_progress: float = 0.01
    data_split_method: str = "auto_split"
    data_split_eval_fraction: float = 0.2
    data_split_col: str | None = None
    class_weights: dict | None = None
    auto_class_weights: bool = False
    subsample: float = 1.0
    colsample_bytree: float = 1.0
    colsample_bylevel: float = 1.0
    colsample_bynode: float = 1.0
    min_split_loss: float = 0.0
    min_tree_child_weight: float = 1.0
    num_parallel_tree: int = 1
    tree_method: str = "hist"
    booster_type: str = "gbtree"
    enable_global_explain: bool = False
    hidden_units: list[int] = field(default_factory=lambda: [128, 64])
    activation_fn: str = "relu"
    dropout: float = 0.0
    batch_size: int = 1024
    optimizer: str = "adam"
    random_seed: int = 42
    num_threads: int | None = None
    given: dict = field(default_factory=dict)  # what the user wrote, for the registry

    @property
    def is_classifier(self) -> bool:
        return self.model_type in CLASSIFIERS

    @property
    def family(self) -> str:
        if self.model_type.startswith("boosted_tree"):
            return "boosted_tree"
        if self.model_type.startswith("dnn"):
            return "dnn"
        return "linear"


# BigQuery ML defaults that differ by model family.
FAMILY_DEFAULTS = {
    "boosted_tree": {"learn_rate": 0.3, "l2_reg": 1.0, "max_iterations": 20},
    "linear": {"learn_rate": 0.1, "l2_reg": 0.0, "max_iterations": 20},
    "dnn": {"learn_rate": 0.001, "l2_reg": 0.0, "max_iterations": 20},
}


def resolve_options(raw: dict[str, Any]) -> Options:
    """Validate CREATE MODEL options and fill BigQuery ML's defaults."""
    raw = {k.lower(): v for k, v in raw.items()}
    for name in raw:
        if name not in SPEC:
            raise UnknownOptionError(name, list(SPEC), where="in CREATE MODEL OPTIONS")
    if "model_type" not in raw:
        raise OptionError(
            "CREATE MODEL needs OPTIONS (model_type = ...)",
            hint="One of: " + ", ".join(f"'{m}'" for m in MODEL_TYPES) + ".",
        )
    values = {name: SPEC[name](name, v) for name, v in raw.items()}
    model_type = values.pop("model_type")
    opts = Options(model_type=model_type, given=dict(raw))
    for k, v in FAMILY_DEFAULTS[opts.family].items():
        setattr(opts, k, v)
    if "input_label_cols" in values:
        opts.label = values.pop("input_label_cols")[0]
    for k, v in values.items():
        setattr(opts, k, v)
    if opts.data_split_method == "custom" and not opts.data_split_col:
        raise OptionError("data_split_method = 'custom' needs data_split_col (a BOOL column: TRUE = evaluation row)")
    if opts.class_weights and not opts.is_classifier:
        raise OptionError(f"Option class_weights applies to classifiers, not {model_type}")
    if opts.class_weights and opts.auto_class_weights:
        raise OptionError("Give either class_weights or auto_class_weights, not both")
    return opts

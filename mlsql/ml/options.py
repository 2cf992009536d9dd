"""CREATE MODEL options: BigQuery ML's names and defaults, validated before any data is read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlsql.errors import OptionError
from mlsql.language.options import CLASSIFIERS, MODEL_TYPES, UNSUPERVISED, validate

__all__ = ["CLASSIFIERS", "FAMILY_DEFAULTS", "MODEL_TYPES", "Options", "resolve_options"]


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
    # kmeans
    num_clusters: int | None = None  # None: round(log10(rows)), at least 2
    kmeans_init_method: str = "random"
    kmeans_init_col: str | None = None
    distance_type: str = "euclidean"
    standardize_features: bool = True
    # pca
    num_principal_components: int | None = None
    pca_explained_variance_ratio: float | None = None
    scale_features: bool = True
    pca_solver: str = "auto"
    hidden_units: list[int] = field(default_factory=lambda: [128, 64])
    activation_fn: str = "relu"
    dropout: float = 0.0
    batch_size: int = 1024
    optimizer: str = "adam"
    random_seed: int = 42
    num_threads: int | None = None
    # hyperparameter tuning (mlsql.ml.tuning): num_trials None = no tuning
    num_trials: int | None = None
    max_parallel_trials: int = 1
    hparam_tuning_algorithm: str = "vizier_default"
    hparam_tuning_objectives: list[str] | None = None
    data_split_test_fraction: float | None = None
    resume: bool = False
    search_space: dict = field(default_factory=dict)  # option -> HParamRange | HParamCandidates
    given: dict = field(default_factory=dict)  # what the user wrote, for the registry

    @classmethod
    def checked(cls, checked: dict[str, Any], *, given: dict[str, Any]) -> Options:
        """The options of values already checked by the options table (``checked``), BigQuery ML's
        defaults filled in; ``given``: what the user wrote, kept for the registry."""
        return _from_checked(checked, given)

    @property
    def tuned(self) -> bool:
        return self.num_trials is not None

    @property
    def objective(self) -> str:
        """The tuning objective: the one given, or BigQuery ML's default for the model type."""
        if self.hparam_tuning_objectives:
            return self.hparam_tuning_objectives[0]
        return "roc_auc" if self.is_classifier else "r2_score"

    @property
    def is_classifier(self) -> bool:
        return self.model_type in CLASSIFIERS

    @property
    def supervised(self) -> bool:
        """A label to learn (every type but kmeans and pca)."""
        return self.model_type not in UNSUPERVISED

    @property
    def family(self) -> str:
        if self.model_type.startswith("boosted_tree"):
            return "boosted_tree"
        if self.model_type.startswith("random_forest"):
            return "random_forest"
        if self.model_type.startswith("dnn"):
            return "dnn"
        if self.model_type in ("kmeans", "pca"):
            return self.model_type
        return "linear"

    @property
    def xgboost(self) -> bool:
        """Trained by xgboost: boosted trees, and random forests (xgboost's random-forest mode)."""
        return self.family in ("boosted_tree", "random_forest")


# BigQuery ML defaults that differ by model family.
FAMILY_DEFAULTS = {
    "boosted_tree": {"learn_rate": 0.3, "l2_reg": 1.0, "max_iterations": 20},
    # xgboost's random-forest mode, as BigQuery ML trains random forests: num_parallel_tree trees grown in
    # one round with learning rate 1 (each tree's leaves scaled by 1 / num_parallel_tree: their mean),
    # rows and columns subsampled so that the trees differ
    "random_forest": {"learn_rate": 1.0, "l2_reg": 1.0, "max_iterations": 1, "max_tree_depth": 20,
                      "subsample": 0.8, "colsample_bynode": 0.8, "num_parallel_tree": 100},
    "kmeans": {"max_iterations": 20},
    "pca": {},
    "linear": {"learn_rate": 0.1, "l2_reg": 0.0, "max_iterations": 20},
    "dnn": {"learn_rate": 0.001, "l2_reg": 0.0, "max_iterations": 20},
}


def resolve_options(raw: dict[str, Any]) -> Options:
    """Validate CREATE MODEL options (``mlsql.language.options``' table) and fill BigQuery ML's
    defaults: for options written by hand (a statement's are checked by the planner, which hands
    them to ``Options.checked``)."""
    return Options.checked(validate("CREATE MODEL", raw), given=raw)


def _from_checked(checked: dict[str, Any], given: dict[str, Any]) -> Options:
    values = dict(checked)
    for registry_only in ("aliases", "alias"):  # the registry's, not the trainer's
        values.pop(registry_only, None)
    model_type = values.pop("model_type")
    opts = Options(model_type=model_type, given={k.lower(): v for k, v in given.items()})
    for k, v in FAMILY_DEFAULTS[opts.family].items():
        setattr(opts, k, v)
    if "input_label_cols" in values:
        opts.label = values.pop("input_label_cols")[0]
    from mlsql.language.options import HParamCandidates, HParamRange

    for k, v in values.items():
        if isinstance(v, HParamRange | HParamCandidates):
            opts.search_space[k] = v  # the option keeps its default; each trial sets its own value
        else:
            setattr(opts, k, v)
    if opts.data_split_method == "custom" and not opts.data_split_col:
        raise OptionError("data_split_method = 'custom' needs data_split_col (a BOOL column: TRUE = evaluation row)")
    if opts.class_weights and opts.auto_class_weights:
        raise OptionError("Give either class_weights or auto_class_weights, not both")
    if opts.family == "random_forest" and opts.num_parallel_tree < 2 and "num_parallel_tree" not in opts.search_space:
        raise _about("num_parallel_tree", OptionError(
            f"Option num_parallel_tree = {opts.num_parallel_tree}: a random forest has at least 2 trees",
            hint="Use boosted_tree_* for a single tree grown in rounds."))
    if opts.model_type == "kmeans":
        if opts.kmeans_init_method == "custom" and not opts.kmeans_init_col:
            raise _about("kmeans_init_method", OptionError(
                "kmeans_init_method = 'CUSTOM' needs kmeans_init_col (a BOOL column: TRUE on the rows that are the "
                "first centroids)"))
        if opts.kmeans_init_col and opts.kmeans_init_method != "custom":
            raise _about("kmeans_init_col", OptionError(
                "kmeans_init_col is read only with kmeans_init_method = 'CUSTOM'"))
    if opts.model_type == "pca":
        both = opts.num_principal_components is not None and opts.pca_explained_variance_ratio is not None
        if both or (opts.num_principal_components is None and opts.pca_explained_variance_ratio is None):
            raise OptionError("pca needs " + ("one of " if both else "") + "num_principal_components or "
                              "pca_explained_variance_ratio" + (", not both" if both else ""),
                              hint="For example: num_principal_components = 3, or pca_explained_variance_ratio = 0.9.")
    return opts


def _about(option: str, err: OptionError) -> OptionError:
    err.option, err.statement_kind = option, "CREATE MODEL"
    return err


def early_stop_reason(key: str, min_rel: float, unit: str) -> str:
    """Why training stopped before max_iterations, as the progress display says it."""
    where = "on the evaluation rows" if key == "eval_loss" else "on the training rows"
    return f"no improvement of {min_rel * 100:g}% or more in the loss {where} in 1 {unit}"

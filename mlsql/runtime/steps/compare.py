"""``ML.COMPARE_MODELS``: several models evaluated on the same rows, one row each, best first.

vivo's "batch experiments" side by side: the candidates of a tuning, last week's model against this
week's, a boosted tree against a network. Each model is scored exactly as ``ML.EVALUATE`` scores it
(its TRANSFORM, its own metrics code; on Spark in the executors), so a row here equals that model's
``ML.EVALUATE`` on the same query."""

from __future__ import annotations

import re

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError
from mlsql.plan import planner as P

_REF = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(?:@\s*(\w+))?\s*$")
MAX_MODELS = 50


def model_specs(args: list) -> list[tuple[str, P.ModelSpec]]:
    """``['m1', 'm2@3', 'm3@champion']`` (one list, or the names as separate arguments) as model
    specs, each with the text it was given."""
    refs = args[0] if len(args) == 1 and isinstance(args[0], list | tuple) else args
    usage = "ML.COMPARE_MODELS(['m1', 'm2@3'], TABLE t | (SELECT ...))"
    if not refs or not all(isinstance(r, str) for r in refs):
        raise MLSQLError(f"ML.COMPARE_MODELS takes a list of model names first: {usage}")
    if len(refs) > MAX_MODELS:
        raise MLSQLError(f"ML.COMPARE_MODELS compares at most {MAX_MODELS} models; {len(refs)} were given")
    out, seen = [], set()
    for ref in refs:
        m = _REF.match(ref)
        if m is None:
            raise MLSQLError(f"ML.COMPARE_MODELS: '{ref}' is not a model name",
                             hint="Write a name, name@version or name@alias: 'churn', 'churn@3', 'churn@champion'.")
        name, tail = m.group(1), m.group(2)
        spec = P.ModelSpec(name, int(tail)) if tail and tail.isdigit() else P.ModelSpec(name, None, tail)
        if str(spec).lower() in seen:
            raise MLSQLError(f"ML.COMPARE_MODELS: model '{ref}' is listed twice")
        seen.add(str(spec).lower())
        out.append((ref.strip(), spec))
    return out


def one_kind(loaded: list) -> bool:
    """Whether the ``(ref, LoadedModel)`` pairs are classifiers (True) or regressors (False); an error
    when they are a mix."""
    kinds = {lm.model.is_classifier for _, lm in loaded}
    if len(kinds) > 1:
        which = ", ".join(f"{ref} ({'classifier' if lm.model.is_classifier else 'regressor'})" for ref, lm in loaded)
        raise MLSQLError(f"ML.COMPARE_MODELS compares models of one kind: {which}",
                         hint="Compare classifiers with classifiers and regressors with regressors.")
    return kinds.pop()


def comparison(loaded: list, evaluations: list, order_by: str | None, classifier: bool) -> tuple[pa.Table, dict]:
    """The table (best first by ``order_by``) and its charts' data, from each model's evaluation."""
    from mlsql.language.options import MINIMIZED

    order_by = str(order_by or ("roc_auc" if classifier else "r2_score")).lower()
    metric_names: list[str] = []
    for ev in evaluations:
        metric_names += [k for k in ev.metrics if k not in metric_names]
    if order_by not in metric_names:
        from mlsql.errors import UnknownOptionError

        raise UnknownOptionError(order_by, metric_names, message=(
            f"ML.COMPARE_MODELS order_by = '{order_by}': the models have no metric '{order_by}'"))
    values = [ev.metrics.get(order_by) for ev in evaluations]
    lower = order_by in MINIMIZED
    # best first; a model without the metric (NaN: e.g. roc_auc of one class) last; ties keep the given order
    rank_key = [(v is None or v != v, (v if lower else -v) if v is not None and v == v else 0.0, i)
                for i, v in enumerate(values)]
    order = [i for *_, i in sorted(rank_key)]
    out = {
        "model": [loaded[i][0] for i in order],
        "name": [loaded[i][1].version.name for i in order],
        "version": pa.array([loaded[i][1].version.version for i in order], pa.int64()),
        "model_type": [loaded[i][1].model.model_type for i in order],
        "rank": pa.array(range(1, len(order) + 1), pa.int64()),
    }
    for k in metric_names:
        out[k] = pa.array([evaluations[i].metrics.get(k) for i in order], pa.float64())
    table = pa.table(out)
    charts = {"table": table, "metrics": _shown_metrics(metric_names, order_by, classifier),
              "roc": [(loaded[i][0], evaluations[i]) for i in order]}
    return table, charts


def _shown_metrics(names: list[str], order_by: str, classifier: bool) -> list[str]:
    """The metrics charted: the ordering one, then the usual pair for the kind of model."""
    usual = ("roc_auc", "log_loss", "accuracy") if classifier else ("r2_score", "mean_absolute_error")
    out = [order_by]
    out += [m for m in usual if m in names and m not in out]
    return out[:3]

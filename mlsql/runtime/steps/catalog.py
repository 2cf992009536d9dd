"""Catalog views of the registry: ``SHOW MODELS``, ``DESCRIBE MODEL``, ``DROP MODEL``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlsql._lazy import pyarrow as pa
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.steps import SessionState
from mlsql.runtime.steps.ml_functions import load_model

if TYPE_CHECKING:
    from mlsql.runtime.registry import Registry


def models_table(registry: Registry) -> pa.Table:
    """One row per registered model: its latest version, type, label, aliases, training rows."""
    rows = []
    for name in registry.names():
        versions = registry.versions(name)
        if not versions:
            continue
        v = versions[-1]
        rows.append({
            "model": name, "latest_version": v.version, "versions": len(versions),
            "model_type": v.model_type, "label": v.tags.get("mlsql.label", ""),
            "aliases": sorted({a for x in versions for a in x.aliases}),
            "created": v.created, "training_rows": int(v.tags.get("mlsql.data_rows", 0) or 0),
        })
    schema = pa.schema([
        ("model", pa.string()), ("latest_version", pa.int64()), ("versions", pa.int64()),
        ("model_type", pa.string()), ("label", pa.string()), ("aliases", pa.list_(pa.string())),
        ("created", pa.timestamp("ms", tz="UTC")), ("training_rows", pa.int64()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def describe_table(s: SessionState, spec: P.ModelSpec) -> pa.Table:
    """``property``/``value`` rows for one model version (metrics, TRANSFORM, training SQL, ...)."""
    lm = load_model(s, spec)
    mv = lm.version
    all_versions = s.registry.versions(mv.name)
    props: list[tuple[str, str]] = [
        ("name", mv.name), ("version", str(mv.version)),
        ("versions", ", ".join(str(v.version) for v in all_versions)),
        ("aliases", ", ".join(mv.aliases)), ("model_type", lm.model.model_type),
        ("label", lm.label or ""), ("created", mv.created.isoformat(timespec="seconds")),
        ("features", ", ".join(lm.feature_names)),
        ("input_columns", ", ".join(lm.meta.get("input_columns", lm.feature_names))),
    ]
    if lm.transform is not None:
        props += [(f"transform.{n}", sql) for n, sql in lm.transform.items]
    if lm.meta.get("feature_inputs"):  # inputs a device fills in from a feature view (ML.FEATURES_AT)
        props += [(f"feature_view.{c}", v) for c, v in lm.meta["feature_inputs"].items()]
    props += [(f"metric.{k}", f"{v:.6g}") for k, v in lm.model.eval_metrics.items() if v is not None]
    props += [("data_rows", str(lm.meta.get("data_rows", ""))), ("data_hash", lm.meta.get("data_hash", "")),
              ("run_id", mv.run_id)]
    sql_file = s.registry.local_path(mv) / "statement.sql"
    if sql_file.exists():
        props.append(("sql", sql_file.read_text()))
    return pa.table({"property": [p for p, _ in props], "value": [v for _, v in props]})


def show_models(s: SessionState, step: P.ShowModelsStep) -> Result:
    return Result(models_table(s.registry), kind="show")


def describe_model(s: SessionState, step: P.DescribeModelStep) -> Result:
    return Result(describe_table(s, step.model), kind="describe")


def drop_model(s: SessionState, step: P.DropModelStep) -> Result:
    if not s.registry.exists(step.model):
        if step.if_exists:
            return Result(pa.table({}), message=f"Model {step.model} does not exist; nothing dropped.")
        s.registry.drop(step.model)  # raises UnknownModelError with a suggestion
    s.registry.drop(step.model)
    s.loaded_models = {k: v for k, v in s.loaded_models.items() if k[0] != step.model}
    return Result(pa.table({}), message=f"Dropped model {step.model} and all its versions.")

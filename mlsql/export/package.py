"""A signed device package (device_bridge's format) from an export: the graph, its manifest (inputs,
outputs, classes, metrics, the training statistics for drift, the parity report) and the
workspace's Ed25519 signature."""

from __future__ import annotations

from pathlib import Path

from mlsql.export.parity import ExportResult


def build_device_package(result: ExportResult, *, name: str, version: int, key_dir: Path, label: str,
                         classes: list | None, model_type: str, metrics: dict, stats: dict,
                         providers: list[str] | None = None, out: Path | None = None,
                         created_at: str | None = None, feature_views: list[dict] | None = None) -> bytes:
    """Sign the exported model into a device package (device_bridge's format).

    ``created_at``: the model version's registration time, so that the same version exported
    with the same options gives the same bytes (and the same sha256) every time. ``feature_views``: the
    view specs of a model trained on ``ML.FEATURES_AT`` (the agent fills those inputs in from the
    view's state)."""
    from device_bridge.keys import load_or_create_keypair
    from device_bridge.package import build_package

    kp = load_or_create_keypair(key_dir)
    fields = {
        "name": name, "version": int(version),
        "inputs": [{k: v for k, v in i.items() if k in ("name", "type", "shape", "nullable")} for i in result.inputs],
        "outputs": result.outputs, "providers": providers or ["cpu"],
        "metrics": {k: v for k, v in metrics.items() if v is not None},
        "label": label, "classes": classes, "model_type": model_type,
        "quantize": result.options["quantize"], "tree_format": result.options.get("tree_format", "ensemble"),
        "training_stats": stats,
        "parity": {k: v for k, v in result.report.to_dict().items() if k != "latency_ms"},
    }
    if created_at is not None:
        fields["created_at"] = created_at
    if feature_views:
        fields["feature_views"] = feature_views
    return build_package(result.model_bytes, fields, kp.private_key, out=out)

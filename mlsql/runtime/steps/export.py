"""``EXPORT MODEL``: the ONNX graph with its parity report, recorded in the registry, and the signed
device package built from it."""

from __future__ import annotations

import json
from pathlib import Path

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.steps import SessionState
from mlsql.runtime.steps.ml_functions import LoadedModel, load_model, model_features

# what sample_rows' rows are, as the parity report and every message about it say: its figures are
# not ML.EVALUATE's on the held-out rows, and a reader comparing the two must be able to tell
SAMPLE_ROWS_FROM = "rows of the training query (a seeded sample; training and held-out rows alike)"


def sample_rows(s: SessionState, lm: LoadedModel, n: int = 2000) -> pa.Table:
    """Up to ``n`` rows of the model's training query (the same rows for the same data)."""
    query = lm.meta.get("query_sql")
    if not query:
        raise MLSQLError(f"Model {lm.version.ref} does not record its training query; retrain it to export")
    params = lm.meta.get("query_params") or None
    source = lm.meta.get("query_mlsql")
    temps: list[str] = []
    try:
        if source:  # it reads ML table functions (e.g. ML.DEVICE_DATA): run them again first
            query = _with_ml_functions(s, source, params, temps, lm.meta.get("feature_views") or [])
        if n <= 16:  # a probe row: no need to scan the whole training query
            return s.engine.query(f"SELECT * FROM ({query}) AS t LIMIT {int(n)}", params)
        return s.engine.sample(query, n, seed=42, params=params)
    finally:
        for name in temps:
            s.engine.unregister(name)


def _with_ml_functions(s: SessionState, source: str, params, temps: list[str], views: list[dict]) -> str:
    """``source``, a query with ML table functions in it: each function run and registered under
    a temporary name (added to ``temps``), and the query over those names. ``views``: the feature
    view specs the model was trained on, which ML.FEATURES_AT uses rather than the workspace's
    (the view may have been replaced or dropped since)."""
    from mlsql.language.dialect import parse_script
    from mlsql.runtime.steps.ml_functions import run_ml

    stmt = parse_script(source)[0]
    steps, tree = P.Planner(s.engine.temp_name).lift_ml_functions(stmt.expression.copy())
    by_name = {v["name"].lower(): v for v in views}
    for step in steps:
        if step.func == "FEATURES_AT" and step.args and str(step.args[0]).lower() in by_name:
            step.settings = {**step.settings, "view_spec": by_name[str(step.args[0]).lower()]}
        s.engine.register(step.output, run_ml(s, step, params))
        temps.append(step.output)
    return P.sql_text(tree)


def native_predict(s: SessionState, lm: LoadedModel):
    """``run(raw_table)``: TRANSFORM on the engine, encode, the estimator's raw output (parity's reference)."""
    def run(raw: pa.Table):
        feats = model_features(s, lm, raw, need_label=False, func="PREDICT")
        return lm.model.estimator.predict_raw(lm.model.encode(feats))

    return run


def export(s: SessionState, spec: P.ModelSpec, opts: dict, *, quiet: bool = False):
    """Export ``spec`` with ``opts`` (EXPORT MODEL's options, checked, defaults filled in: the planner's,
    or ``mlsql.export.resolve_export_options``' for options from elsewhere): a Result with the parity
    report (``quiet``: the ExportResult)."""
    from mlsql.export import export_model

    trial = opts.get("trial_id")
    if trial is not None and (opts.get("package") or opts.get("providers")):
        raise MLSQLError(f"EXPORT MODEL {spec} OPTIONS (trial_id = {trial}) writes the trial's ONNX file only, "
                         "not a device package",
                         hint=f"A device knows a package by its model version, which holds the optimal trial: "
                              f"DEPLOY MODEL {spec} ... OPTIONS (trial_id = {trial}) registers trial {trial} as a "
                              f"version of its own and deploys it; EXPORT that version to package it.")
    lm = load_model(s, spec, trial)
    mv = lm.version
    if lm.model.model_type == "arima_plus":
        raise MLSQLError(f"EXPORT MODEL {mv.ref}: an arima_plus model has no ONNX form (its forecast is a table, "
                         "not a function of input rows)",
                         hint=f"Save its forecast instead: COPY (SELECT * FROM ML.FORECAST(MODEL {mv.name}, "
                              "STRUCT(30 AS horizon))) TO 'forecast.parquet'.")
    calibration = None
    calib_sql = calibration_sql(opts)
    if calib_sql:
        calibration = s.engine.query(calib_sql)
        if calibration.num_rows == 0:
            raise MLSQLError(f"The calibration rows of the export of {mv.ref} are empty: {calib_sql}")
    if not lm.meta.get("query_sql") and lm.meta.get("imported_from") and calibration is not None:
        sample = calibration  # an import without example rows: its parity is checked on the calibration rows
    elif not lm.meta.get("query_sql") and lm.meta.get("imported_from"):
        raise MLSQLError(f"Model {mv.ref} was imported without example rows, so its export has no rows to check "
                         f"the ONNX graph on",
                         hint="Give the EXPORT OPTIONS (calibrate = (SELECT ...)) rows the model reads, or import it "
                              "again with AS SELECT ... .")
    else:
        sample = sample_rows(s, lm)
    suffix = ("" if trial is None else f"_trial{int(trial)}") + ("" if opts["quantize"] == "none" else f"_{opts['quantize']}")
    # into the workspace, never beside the notebook: a relative uri is relative to <workspace>/exports
    out = Path(str(opts.get("uri") or f"{mv.name}_v{mv.version}{suffix}.onnx")).expanduser()
    uri = str(out if out.is_absolute() else s.workspace.exports_dir / out)
    raw_schema = lm.meta.get("training_schema", {})
    result = export_model(lm.model, lm.transform, raw_schema,
                          {k: v for k, v in opts.items()
                           if k not in ("uri", "calibration_query", "calibrate", "providers", "package", "trial_id")},
                          sample, native_predict(s, lm), Path(uri).expanduser(), calibration,
                          name=mv.ref if trial is None else f"{mv.ref} trial {int(trial)}",
                          rows_from=SAMPLE_ROWS_FROM)
    result.ort = None
    if opts.get("format") == "ort":  # the ORT format beside the .onnx, optimized offline
        from mlsql.export.ortformat import to_ort_format

        result.ort = to_ort_format(result.model_bytes, result.path.with_suffix(".ort"))
    report_path = result.path.with_suffix(".parity.json")
    report = result.report.to_dict()
    if result.ort is not None:
        report["ort_format"] = result.ort.to_dict()
    report_path.write_text(json.dumps(report, indent=1, default=str))
    result.package_path = None
    if opts.get("package") or opts.get("providers"):
        packaged = result
        if result.ort is not None:  # the package carries the ORT file: the device loads it without optimizing
            import dataclasses

            packaged = dataclasses.replace(result, model_bytes=Path(result.ort.path).read_bytes())
        result.package_path = package(s, lm, packaged, opts.get("providers"))
    try:
        s.registry.log_artifact(mv, result.path, "exports")
        s.registry.log_artifact(mv, report_path, "exports")
        if result.package_path is not None:
            s.registry.log_artifact(mv, result.package_path, "exports")
        if result.ort is not None:
            s.registry.log_artifact(mv, Path(result.ort.path), "exports")
        tag = f"export.{opts['quantize']}" + ("" if trial is None else f".trial{int(trial)}")
        s.registry.set_version_tag(mv, tag, str(result.path))
    except Exception as exc:  # the file is written; say the registry could not record it
        raise MLSQLError(f"Exported {mv.ref} to {result.path}, but the registry could not record it: {exc}") from exc
    if quiet:
        return result
    r = result.report
    what = mv.ref if trial is None else f"trial {int(trial)} of {mv.ref}"
    msg = (f"Exported {what} to {result.path} ({r.size_bytes / 1024:.1f} KiB, quantize={r.quantize}); "
           f"parity max diff {r.max_abs_diff:.2g} on {r.rows} {r.rows_from}")
    if result.package_path is not None:
        msg += f"; signed package {result.package_path}"
    if r.metric:
        msg += f"; on those rows {r.metric} {r.metric_native:.4f} native, {r.metric_onnx:.4f} ONNX"
        if r.metric_quantized is not None:
            msg += f", {r.metric_quantized:.4f} {r.quantize}"
    table = r.to_table()
    if result.ort is not None:
        o = result.ort
        msg += (f"; ORT format {o.path}: {o.size_bytes / 1024:.1f} KiB ({o.size_bytes / o.size_bytes_onnx:.2f}× "
                f"the ONNX file), loads in {o.load_ms:.2f} ms against {o.load_ms_onnx:.2f} ms for the ONNX file "
                f"with its optimizations (median of this machine)")
        extra = [(f"ort_format.{k}", f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in o.to_dict().items()]
        table = pa.concat_tables([table, pa.table({"property": [e[0] for e in extra], "value": [e[1] for e in extra]})])
    out = Result(table, kind="export", message=msg)
    out.export = result
    return out


def calibration_sql(opts: dict) -> str | None:
    """The query whose rows calibrate int8_static: ``calibrate = (SELECT ...)`` (a query in the
    statement) or ``calibration_query = 'SELECT ...'`` (a string), or None."""
    q = opts.get("calibrate") or opts.get("calibration_query")
    if not q:
        return None
    q = str(q).strip()
    while q.startswith("(") and q.endswith(")"):
        q = q[1:-1].strip()
    return q


def package_statistics(s: SessionState, lm: LoadedModel, inputs: list[dict]) -> dict:
    """The training statistics of the package's inputs: those stored at CREATE MODEL, or for a
    model trained before they were, computed now over its whole training query."""
    from mlsql.runtime.steps.stats import training_statistics

    stats = lm.meta.get("training_stats")
    names = [i["name"] for i in inputs]
    if stats is None:
        query = lm.meta.get("query_sql")
        if not query:
            return {}
        params = lm.meta.get("query_params") or None
        schema = s.engine.query(f"SELECT * FROM ({query}) AS t LIMIT 0", params).schema
        stats = training_statistics(s.engine, f"({query})", params, schema, names)
    by_lower = {k.lower(): k for k in stats}
    return {n: stats[by_lower[n.lower()]] for n in names if n.lower() in by_lower}


def package(s: SessionState, lm: LoadedModel, result, providers=None) -> Path:
    """Sign the export into a device package next to it (``<file>.mlpkg``)."""
    from mlsql.export import build_device_package

    mv = lm.version
    if isinstance(providers, str):
        providers = [providers]
    path = result.path.with_suffix(".mlpkg")
    build_device_package(
        result, name=mv.name, version=mv.version, key_dir=s.workspace.keys_dir, label=lm.label,
        classes=lm.model.classes, model_type=lm.model.model_type, metrics=dict(lm.model.eval_metrics),
        stats=package_statistics(s, lm, result.inputs), providers=list(providers or ["cpu"]), out=path,
        created_at=mv.created.isoformat(timespec="seconds"),  # UTC (the registry's timestamp)
        feature_views=lm.meta.get("feature_views") or None,
    )
    return path

"""``arima_plus``: CREATE MODEL for time series and the ML functions that read such a model
(``ML.FORECAST``, ``ML.EXPLAIN_FORECAST``, ``ML.DETECT_ANOMALIES``, ``ML.ARIMA_EVALUATE``,
``ML.ARIMA_COEFFICIENTS``, and ``ML.EVALUATE`` with new rows). The fitting is ``mlsql.ml.forecast``'s;
the series are fitted where the engine says (``executor_trainer('arima')``: Spark's grouped Arrow
UDF) or here, in processes, from the rows as Arrow."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError, ModelError, OptionError, UnknownColumnError
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.steps import SessionState

FORECAST_OPTIONS = ("time_series_timestamp_col", "time_series_data_col", "time_series_id_col", "horizon",
                    "auto_arima", "auto_arima_max_order", "non_seasonal_order", "include_drift", "data_frequency",
                    "decompose_time_series", "clean_spikes_and_dips", "adjust_step_changes", "holiday_region")
_GENERAL = ("model_type", "aliases", "alias")


def check_options(options: dict, given: dict) -> dict:
    """arima_plus's options: the time-series columns are required, options of other model types
    and contradictory ones refused (BigQuery ML refuses them too)."""
    written = {k.lower() for k, v in given.items() if v is not None}
    other = sorted(written - set(FORECAST_OPTIONS) - set(_GENERAL))
    if other:
        raise OptionError(f"Option {other[0]} does not apply to arima_plus",
                          hint="arima_plus takes: " + ", ".join(FORECAST_OPTIONS[:-2]) + ".")
    for need in ("time_series_timestamp_col", "time_series_data_col"):
        if not options.get(need):
            raise OptionError(f"arima_plus needs OPTIONS ({need} = '...')",
                              hint="time_series_timestamp_col: the DATE/TIMESTAMP column; time_series_data_col: "
                                   "the numeric column to forecast.")
    if options.get("auto_arima", True):
        for k in ("non_seasonal_order", "include_drift"):
            if k in written:
                raise OptionError(f"Option {k} needs auto_arima = FALSE (auto_arima chooses the order itself)")
    return options


def _column(names: list[str], wanted: str, what: str) -> str:
    by_lower = {c.lower(): c for c in names}
    if wanted.lower() not in by_lower:
        raise UnknownColumnError(wanted, names, message=f"{what} '{wanted}' is not a column of the training query")
    return by_lower[wanted.lower()]


def create_arima_model(s: SessionState, step: P.CreateModelStep, params, temps: list[str], *, aliases: list,
                       raw: dict, meta_file: str) -> Result:
    """Train an arima_plus model on the rows of ``step.query`` and register it (``meta_file``: where the
    training's description goes, ml_functions' META_FILE, handed in: ml_functions imports this module)."""
    from mlsql.ml.forecast import ArimaPlusModel, ForecastConfig, fit_many, split_series

    opts = check_options(step.options, raw)
    if step.transform:
        raise MLSQLError("arima_plus takes no TRANSFORM clause",
                         hint="Compute the series' column in the AS query instead.")
    cfg = ForecastConfig.from_options(opts)
    ts_want, data_want = opts["time_series_timestamp_col"], opts["time_series_data_col"]
    ids_want = list(opts.get("time_series_id_col") or [])
    query_params = P.params_for(step.query, params)
    name = step.model
    started = time.time()
    trainer = s.engine.executor_trainer("arima")
    reporter = s.progress(f"Training {name}", 0) if s.progress else None
    try:
        if trainer is not None:  # e.g. Spark: one grouped Arrow UDF call per series, in the executors
            fitted = trainer.fit_forecast(s.engine, step.query, query_params, ts_want, data_want, ids_want, cfg,
                                          temps)
            results, schema, fp = fitted.results, fitted.schema, fitted.fingerprint
        else:
            data = s.engine.query(step.query, query_params)
            if data.num_rows == 0:
                raise MLSQLError(f"The training query for model {name} returned no rows")
            cols = data.column_names
            ts_col = _column(cols, ts_want, "time_series_timestamp_col")
            data_col = _column(cols, data_want, "time_series_data_col")
            id_cols = [_column(cols, c, "time_series_id_col") for c in ids_want]
            data = data.select([ts_col, data_col, *id_cols])
            raw_name = s.engine.temp_name("train")
            s.engine.register(raw_name, data)
            temps.append(raw_name)
            fp = s.engine.fingerprint(raw_name)
            keys, arrays = split_series(data, ts_col, data_col, id_cols)
            results = fit_many(keys, arrays, cfg)
            schema = data.schema
    finally:
        if reporter is not None:
            reporter.close()
    ts_col, data_col = schema.names[0], schema.names[1]
    id_cols = schema.names[2:]
    model = ArimaPlusModel.build(results, ts_col=ts_col, data_col=data_col, id_cols=id_cols,
                                 id_types=[schema.field(c).type for c in id_cols], ts_type=schema.field(ts_col).type,
                                 cfg=cfg, options={k: v for k, v in raw.items()})
    ended = time.time()
    with tempfile.TemporaryDirectory(prefix="mlsql-model-") as tmp:
        d = Path(tmp)
        model.save(d)
        meta = {
            "query_sql": step.query_sql, "query_mlsql": step.source_sql,
            "input_columns": [ts_col, data_col, *id_cols],
            "training_schema": {f.name: str(f.type) for f in schema},
            "data_rows": fp.rows, "data_hash": fp.digest, "data_hash_algorithm": fp.algorithm,
            "query_dialect": "duckdb", "engine": s.engine.name, "series": len(results),
        }
        (d / meta_file).write_text(json.dumps(meta, indent=1))
        mv = s.registry.register(
            name, d, params={k: v for k, v in raw.items()}, metrics=model.eval_metrics, sql=step.statement,
            tags={"model_type": model.model_type, "label": data_col, "data_rows": str(fp.rows),
                  "data_hash": fp.digest},
            aliases=aliases, started=started, ended=ended)
    n = model.series.num_rows
    table = pa.table({"model": [name], "version": [mv.version], "model_type": [model.model_type],
                      "training_rows": [fp.rows], "time_series": [n],
                      **{k: pa.array([v], pa.float64()) for k, v in model.eval_metrics.items()}})
    return Result(table, kind="create_model",
                  message=f"Created model {name} version {mv.version} (arima_plus): {n:,} time series, "
                          f"{fp.rows:,} rows, fitted in {ended - started:.1f} s.")


# -- ML functions ----------------------------------------------------------------------------------
def _arima(c, func: str):
    from mlsql.ml.forecast import ArimaPlusModel

    if not isinstance(c.model, ArimaPlusModel):
        raise ModelError(f"ML.{func} needs an arima_plus model; {c.lm.version.ref} is {c.model.model_type}")
    return c.model


def _no_input(c, func: str) -> None:
    if c.step.input is not None:
        raise MLSQLError(f"ML.{func} takes no input rows: the model forecasts from its own history",
                         hint=f"Write ML.{func}(MODEL {c.step.model}, STRUCT(30 AS horizon)).")


def forecast(c):
    m = _arima(c, "FORECAST")
    _no_input(c, "FORECAST")
    return m.forecast(int(c.settings.get("horizon", 3)), float(c.settings.get("confidence_level", 0.95)))


def explain_forecast(c):
    m = _arima(c, "EXPLAIN_FORECAST")
    _no_input(c, "EXPLAIN_FORECAST")
    return m.explain_forecast(int(c.settings.get("horizon", 3)), float(c.settings.get("confidence_level", 0.95)))


def arima_evaluate(c):
    return _arima(c, "ARIMA_EVALUATE").arima_evaluate()


def arima_coefficients(c):
    return _arima(c, "ARIMA_COEFFICIENTS").arima_coefficients()


def _rows(c) -> pa.Table:
    """The input rows as Arrow (an engine that scores in its executors hands a lazy frame)."""
    if c.data is None or isinstance(c.data, pa.Table):
        return c.data
    return c.s.engine.query(c.step.input, P.params_for(c.step.input, c.params))


def detect_anomalies(c):
    """ML.DETECT_ANOMALIES of an arima_plus model: its history without input, else the new rows."""
    m = _arima(c, "DETECT_ANOMALIES")
    return m.detect_anomalies(_rows(c), float(c.settings.get("anomaly_prob_threshold", 0.95)))


def evaluate(c):
    """ML.EVALUATE of an arima_plus model: with rows, the forecast's errors on them; without, ML.ARIMA_EVALUATE."""
    m = _arima(c, "EVALUATE")
    rows = _rows(c)
    if rows is None:
        return m.arima_evaluate()
    return pa.table({k: pa.array([v], pa.float64()) for k, v in m.evaluate_against(rows).items()})

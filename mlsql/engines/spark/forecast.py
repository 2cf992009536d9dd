"""arima_plus on Spark: every series fitted in the executors, one grouped Arrow UDF call per series
(``groupBy(ids).applyInArrow``), with ``mlsql.ml.forecast``'s own per-series fit, so the numbers are
DuckDB's. Each call returns its series' fit pickled in one binary cell; the driver builds the model
from them (a fit is a few tables of the series' length, not its raw rows)."""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from typing import Any

from mlsql.errors import UnknownColumnError

_NO_ID = "__mlsql_series"


@dataclass
class Fitted:
    results: list  # [(key tuple, SeriesFit | error text)], sorted by key
    schema: Any  # Arrow schema: timestamp, data, id columns (the query's names and types)
    fingerprint: Any


def _fit_group(ts_col: str, data_col: str, id_cols: list[str], cfg: dict, table):
    """One series (all its rows, one Arrow table) → one row: its key and fit, pickled."""
    import pyarrow as pa

    from mlsql.ml.forecast import ForecastConfig, _timestamps, _values, fit_group, one_thread_per_worker

    one_thread_per_worker()  # a Python worker per task slot, each fitting its series

    key = tuple(table.column(c)[0].as_py() for c in id_cols)
    if any(k is None for k in key):
        out = (key, f"time_series_id_col {', '.join(id_cols)} is NULL in {table.num_rows} rows")
    else:
        try:
            ts = _timestamps(table.column(ts_col), ts_col)
            y = _values(table.column(data_col), data_col)
            out = fit_group(key, ts, y, ForecastConfig(**cfg))
        except Exception as exc:  # a bad series names itself on the driver, not as a Python worker trace
            out = (key, str(exc))
    return pa.table({"fit": pa.array([pickle.dumps(out)], pa.binary())})


def fit_forecast(engine, query, params, ts_want: str, data_want: str, ids_want: list[str], cfg, temps: list[str]):
    """Fit every series of ``query``'s rows in the executors; the fits come back to the driver."""
    from functools import partial

    from pyspark.sql import functions as F

    df = engine.dataframe(query, params)
    names = list(df.columns)
    by_lower = {c.lower(): c for c in names}

    def col(want: str, what: str) -> str:
        if want.lower() not in by_lower:
            raise UnknownColumnError(want, names, message=f"{what} '{want}' is not a column of the training query")
        return by_lower[want.lower()]

    ts_col = col(ts_want, "time_series_timestamp_col")
    data_col = col(data_want, "time_series_data_col")
    id_cols = [col(c, "time_series_id_col") for c in ids_want]
    df = df.select(ts_col, data_col, *id_cols)
    view = engine.temp_name("train")
    df.createOrReplaceTempView(view)
    temps.append(view)
    fp = engine.fingerprint(view)
    schema = df.limit(0).toArrow().schema
    from mlsql.errors import MLSQLError

    if fp.rows == 0:
        raise MLSQLError("The training query returned no rows")
    groups = id_cols or [_NO_ID]
    if not id_cols:
        df = df.withColumn(_NO_ID, F.lit(0))
    fn = partial(_fit_group, ts_col, data_col, id_cols, asdict(cfg))
    # the series spread over every task slot: the rows of many series are few bytes, and Spark's
    # adaptive execution would otherwise coalesce them into one partition fitted by one core
    slots = engine.workers() if hasattr(engine, "workers") else 2
    df = df.repartition(max(2, 4 * slots), *groups)
    fits = df.groupBy(*groups).applyInArrow(fn, "fit binary").toArrow()
    results = [pickle.loads(b) for b in fits.column("fit").to_pylist()]
    results.sort(key=lambda r: r[0])  # the order DuckDB's path gives: sorted by the id columns
    return Fitted(results, schema, fp)

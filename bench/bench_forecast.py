"""arima_plus: series fitted per second, DuckDB (processes, one per core) and Spark local[2] (a grouped
Arrow UDF per series), on synthetic daily series of two years.

Each series: 730 days of a level, a weekly pattern, a random walk and noise (numpy, seeded), written
once as parquet. Each engine runs the whole ``CREATE MODEL ... OPTIONS (model_type = 'arima_plus',
time_series_id_col = 'id')`` statement (reading the rows, fitting, saving and registering the model);
series per second = series / the statement's wall time. Results are merged into --out by (engine, series). Also: one series fitted alone in this process
(the mean cost of one fit over a sample of the series, without any parallelism or bookkeeping),
and each run's parallel efficiency against it.

    .venv/bin/python bench/bench_forecast.py [--series 1000 10000] [--engines duckdb spark]
                                             [--out bench/results/forecast.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

DAYS = 730


def make_series(n: int, path: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(n)
    t = np.arange(DAYS)
    level = rng.uniform(50, 500, (n, 1))
    weekly = rng.uniform(0, 0.2, (n, 1)) * level * np.sin(2 * np.pi * (t + rng.integers(0, 7, (n, 1))) / 7)
    walk = np.cumsum(rng.normal(0, 0.01, (n, DAYS)), axis=1) * level
    y = level + weekly + walk + rng.normal(0, 0.03, (n, DAYS)) * level
    days = np.arange(np.datetime64("2023-01-01"), np.datetime64("2023-01-01") + DAYS)
    pq.write_table(pa.table({"id": np.repeat(np.arange(n), DAYS), "day": np.tile(days, n), "y": y.ravel()}), path)


MODEL = """CREATE OR REPLACE MODEL fc_{tag} OPTIONS (model_type = 'arima_plus', time_series_timestamp_col = 'day',
    time_series_data_col = 'y', time_series_id_col = 'id', horizon = 30)
AS SELECT * FROM read_parquet('{path}')"""


SAMPLE = 24  # series fitted one after another in this process: the cost of a fit varies by series


def one_fit(path: Path) -> float:
    """Mean seconds of one fit on one core (BLAS on one thread, as in the workers), over SAMPLE
    series spread across the file: what the engines' series/s is compared with."""
    import numpy as np
    import pyarrow.parquet as pq

    from mlsql.ml.forecast import ForecastConfig, fit_series, one_thread_per_worker

    one_thread_per_worker()
    t = pq.read_table(path)
    n = t.num_rows // DAYS
    ts_all = t.column("day").cast("timestamp[us]").cast("int64").to_numpy()
    y_all = t.column("y").to_numpy()
    fit_series(ts_all[:DAYS], y_all[:DAYS], ForecastConfig(horizon=30))  # the first: imports statsforecast
    t0 = time.perf_counter()
    for i in np.linspace(0, n - 1, SAMPLE).astype(int):
        fit_series(ts_all[i * DAYS:(i + 1) * DAYS], y_all[i * DAYS:(i + 1) * DAYS], ForecastConfig(horizon=30))
    return (time.perf_counter() - t0) / SAMPLE


def run(engine: str, n: int, path: Path, ws: Path) -> dict:
    import mlsql

    conf = {"master": "local[2]"} if engine == "spark" else {}
    s = mlsql.connect(ws, engine=engine, **conf)
    try:
        if engine == "spark":
            s.sql("SELECT 1")  # start the JVM before the clock
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        r = s.sql(MODEL.format(tag=f"{engine}_{n}", path=path))
        wall = time.perf_counter() - t0
        series = r.table.column("time_series")[0].as_py()
        assert series == n, (series, n)
        return {"engine": engine, "series": n, "points": n * DAYS, "seconds": round(wall, 2),
                "series_per_second": round(n / wall, 2),
                # the machine is shared: the 1-minute load average before and after says how busy it was
                "load_average_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)]}
    finally:
        s.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--series", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--engines", nargs="+", default=["duckdb", "spark"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "forecast.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mlsql-bench-forecast-"))
    results = []
    for n in args.series:
        path = tmp / f"series_{n}.parquet"
        make_series(n, path)
        single = one_fit(path)
        print(f"{n} series: one fit alone {single * 1000:.0f} ms on average over {SAMPLE} "
              f"({1 / single:.1f} series/s on one core)", flush=True)
        for engine in args.engines:
            r = run(engine, n, path, tmp / "ws")
            r["one_fit_seconds_mean"] = round(single, 4)
            # series/s against what every core fitting series back to back would give
            r["parallel_efficiency"] = round(r["series_per_second"] * single / (os.cpu_count() or 1), 3)
            results.append(r)
            print(f"{engine:7s} {n:6d} series: {r['seconds']:8.1f} s, {r['series_per_second']:7.1f} series/s",
                  flush=True)
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    # earlier runs' figures of other engines or sizes are kept; a rerun replaces its own
    done = {(r["engine"], r["series"]) for r in results}
    results = [r for r in old.get("results", []) if (r["engine"], r["series"]) not in done] + results
    out = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
        "days_per_series": DAYS, "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

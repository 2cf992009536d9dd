"""DuckDB vs Spark local[2] through MLSQL, and Spark through MLSQL vs the same PySpark by hand.

A generated flights-like table (``--rows``, default 10M) and a carriers table; measured:
an aggregation + join query on both engines, the same query as hand-written PySpark
(``spark.sql`` of the already-translated text, then ``toArrow``), and CREATE MODEL
(boosted trees, 10 rounds) on both engines. Writes bench/results/spark.json.

    .venv/bin/python bench/bench_spark.py [--rows 10000000] [--out bench/results/spark.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

QUERY = """SELECT c.name, f.origin, count(*) AS n, avg(f.arr_delay) AS delay, max(f.distance) AS longest
FROM flights f JOIN carriers c ON f.carrier = c.carrier
WHERE f.month BETWEEN 3 AND 9 GROUP BY c.name, f.origin ORDER BY n DESC, c.name, f.origin"""
MODEL = """CREATE OR REPLACE MODEL bench_{engine} OPTIONS (model_type = 'boosted_tree_regressor',
    input_label_cols = ['arr_delay'], max_iterations = 10, data_split_method = 'no_split')
AS SELECT month, hour, dep_delay, distance, carrier, origin, arr_delay FROM flights WHERE month <= {months}"""


def _timed(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--model-months", type=int, default=1, help="months of rows CREATE MODEL trains on")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "spark.json"))
    args = ap.parse_args()

    import mlsql

    ws = Path(tempfile.mkdtemp(prefix="mlsql-bench-spark-"))
    duck = mlsql.connect(ws)
    duck.sql(f"""CREATE TABLE flights AS SELECT (i % 12) + 1 AS month, (i % 24) AS hour,
        ['AA', 'DL', 'UA', 'B6', 'EV', 'WN'][(hash(i) % 6)::BIGINT + 1] AS carrier,
        ['JFK', 'LGA', 'EWR'][(hash(i * 7) % 3)::BIGINT + 1] AS origin,
        (hash(i * 13) % 3000)::BIGINT::DOUBLE AS distance, ((hash(i * 17) % 120)::BIGINT - 20)::DOUBLE AS dep_delay,
        ((hash(i * 17) % 120)::BIGINT - 20) * 0.9 + (hash(i * 19) % 30)::BIGINT - 10.0 AS arr_delay
        FROM range({args.rows}) t(i)""")
    duck.sql("""CREATE TABLE carriers AS SELECT * FROM (VALUES ('AA', 'American'), ('DL', 'Delta'),
        ('UA', 'United'), ('B6', 'JetBlue'), ('EV', 'ExpressJet'), ('WN', 'Southwest')) t(carrier, name)""")

    spark = mlsql.connect(ws, engine="spark", master="local[2]")
    t0 = time.perf_counter()
    spark.sql("SELECT 1")
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # hand the tables over once, then keep them in Spark's memory, as a user with a cluster table would
    for t in ("flights", "carriers"):
        spark.sql(f"CREATE OR REPLACE TEMP VIEW {t}_in AS SELECT * FROM workspace.{t}")
        spark.engine.spark.table(f"{t}_in").cache().createOrReplaceTempView(t)
        spark.engine.spark.table(t).count()
    handover_s = time.perf_counter() - t0

    rendered = spark.engine.render(QUERY)
    by_hand = spark.engine.spark
    res = {
        "rows": args.rows,
        "spark_start_s": round(start_s, 2),
        "handover_and_cache_s": round(handover_s, 2),
        "query": {
            "duckdb_s": _timed(lambda: duck.sql(QUERY)),
            "spark_mlsql_s": _timed(lambda: spark.sql(QUERY)),
            "spark_by_hand_s": _timed(lambda: by_hand.sql(rendered).toArrow()),
        },
    }
    q = res["query"]
    q["mlsql_over_by_hand"] = round(q["spark_mlsql_s"] / q["spark_by_hand_s"], 3)
    assert duck.sql(QUERY).table.num_rows == spark.sql(QUERY).table.num_rows

    model = {}
    for name, s in (("duckdb", duck), ("spark", spark)):
        t0 = time.perf_counter()
        r = s.sql(MODEL.format(engine=name, months=args.model_months))
        model[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        model[f"{name}_training_rows"] = r.table.column("training_rows")[0].as_py()
        model[f"{name}_r2"] = r.table.column("r2_score")[0].as_py()
    res["create_model"] = model
    res["target_mlsql_over_by_hand"] = 1.10
    res["notes"] = ("Spark trains on the driver from Arrow in this version (no xgboost.spark); "
                    "CREATE MODEL on Spark therefore measures reading the rows through the driver plus "
                    "the same xgboost as on DuckDB.")
    res["machine"] = {"cpus": __import__("os").cpu_count(), "python": platform.python_version()}
    for k in ("duckdb_s", "spark_mlsql_s", "spark_by_hand_s"):
        q[k] = round(q[k], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    spark.close()
    duck.close()


if __name__ == "__main__":
    main()

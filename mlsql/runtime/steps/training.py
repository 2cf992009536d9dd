"""``CREATE MODEL``: read the training rows from the engine, fit the TRANSFORM, train, register."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.steps import SessionState
from mlsql.runtime.steps.ml_functions import META_FILE, TRANSFORM_FILE, TRIALS_FILE


def create_model(s: SessionState, step: P.CreateModelStep, params, temps: list[str]) -> Result:
    """Train a new model version; ``temps`` collects the temporary relations to drop afterwards."""
    from mlsql.ml import train
    from mlsql.ml.options import Options

    name = step.model
    if s.registry.exists(name):
        if step.if_not_exists:
            return Result(pa.table({}), message=f"Model {name} already exists; nothing trained.")
        if not step.replace:
            latest = s.registry.get(name)
            raise MLSQLError(
                f"Model '{name}' already exists (latest version {latest.version})",
                hint=f"Use CREATE OR REPLACE MODEL {name} to add a new version, or DROP MODEL {name}.",
            )
    # aliases are the registry's, not the trainer's: kept out of the model's options
    aliases = step.options.get("aliases") or step.options.get("alias") or []
    if step.imported:  # a model trained elsewhere: read from its file, not trained
        from mlsql.runtime.steps.imports import import_model

        return import_model(s, step, params, aliases)
    raw = {k: v for k, v in step.given.items() if k.lower() not in ("aliases", "alias")}
    if step.options.get("model_type") == "arima_plus":  # time series: mlsql/runtime/steps/forecast.py
        from mlsql.runtime.steps.forecast import create_arima_model

        return create_arima_model(s, step, params, temps, aliases=aliases, raw=raw, meta_file=META_FILE)
    opts = Options.checked(step.options, given=raw)  # checked once, by the planner

    query_params = P.params_for(step.query, params)
    # tuning trains on the driver, in processes (mlsql.ml.tuning): on Spark the rows come to it as
    # Arrow, as on DuckDB; a plain CREATE MODEL trains where the engine's data is
    trainer = s.engine.executor_trainer(opts.family) if not opts.tuned else None
    if trainer is not None:  # e.g. Spark: the rows stay in the executors
        from functools import partial

        transform, schema, fp, features, sample, sample_features = trainer.prepare(
            s.engine, step, query_params, temps)
        train = partial(trainer.train, s.engine)
        relation, relation_params = f"({step.query_sql})", query_params
    else:
        data = s.engine.query(step.query, query_params)
        if data.num_rows == 0:
            raise MLSQLError(f"The training query for model {name} returned no rows")
        raw_name = s.engine.temp_name("train")
        s.engine.register(raw_name, data)
        temps.append(raw_name)
        transform = None
        features, schema = data, data.schema
        if step.transform:
            from mlsql.plan.transform import fit_transform

            transform = fit_transform(step.transform, raw_name, data.column_names, s.engine.query)
            features = s.engine.query(transform.select_sql(raw_name, data.column_names))
        fp = s.engine.fingerprint(raw_name)
        relation, relation_params = raw_name, None
        # a few training rows, from which the registry infers the version's signature
        sample, sample_features = data.slice(0, 50), features
    rows, data_hash = fp.rows, fp.digest

    tuning = None
    started = time.time()  # the MLflow run spans the training, not its registration
    if opts.tuned:
        tuning = _tune(s, name, features, opts, raw, data_hash)
        model = tuning.model
    else:
        reporter = s.progress(f"Training {name}", 0) if s.progress else None
        try:
            model = train(features, opts, progress=reporter.update if reporter else None)
        finally:
            if reporter is not None:
                reporter.close()
    ended = time.time()
    if transform is not None and model.label is not None and model.label not in transform.output_columns:
        raise MLSQLError(f"TRANSFORM must output the label column '{model.label}'")
    input_columns = transform.input_columns if transform else [f.name for f in model.features]
    from mlsql.runtime.steps.stats import training_statistics

    stats = training_statistics(s.engine, relation, relation_params, schema, input_columns)

    with tempfile.TemporaryDirectory(prefix="mlsql-model-") as tmp:
        d = Path(tmp)
        model.save(d)
        if transform is not None:
            (d / TRANSFORM_FILE).write_text(transform.to_json())
        meta = {
            "query_sql": step.query_sql,
            "query_mlsql": step.source_sql,  # set when the query reads ML functions: run again through them
            # the values of its {name} / $name parameters: export and deploy sample the same rows
            "query_params": _json_safe(query_params),
            "input_columns": input_columns,
            # every training row's statistics per input column (mlsql/runtime/steps/stats.py): the baseline
            # that device packages carry for drift, so that no copy of the training data is needed
            "training_stats": stats,
            "training_schema": {f.name: str(f.type) for f in schema},
            "data_rows": rows,
            "data_hash": data_hash,
            "data_hash_algorithm": fp.algorithm,
            # the planner writes the training query in MLSQL's (DuckDB) SQL on every engine;
            # each engine renders it for itself when it reads the rows again
            "query_dialect": "duckdb",
            "engine": s.engine.name,
        }
        if step.feature_views:  # trained on ML.FEATURES_AT: the views' specs go with the model and its packages
            from mlsql.runtime.steps.feature_views import load_view

            specs = [load_view(s.workspace, v) for v in step.feature_views]
            meta["feature_views"] = specs
            # which model inputs are which view's features: a device fills those in from the view's state
            meta["feature_inputs"] = {c: sp["name"] for sp in specs for f in sp["features"] for c in input_columns
                                      if c.lower() == f["name"].lower()}
        if tuning is not None:  # every finished trial's model, and ML.TRIAL_INFO's rows
            import shutil

            from mlsql.ml.tuning import TRIALS

            for r in tuning.trials:
                src = tuning.folder / TRIALS / str(r["trial_id"])
                if r["status"] == "SUCCEEDED" and src.exists():
                    shutil.copytree(src, d / TRIALS / str(r["trial_id"]))
            (d / TRIALS_FILE).write_text(json.dumps(tuning.trials, indent=1, default=str))
            meta["optimal_trial_id"], meta["tuning_objective"] = tuning.optimal, opts.objective
        (d / META_FILE).write_text(json.dumps(meta, indent=1))
        params_log = {k: str(v) if _is_space(v) else v for k, v in raw.items()}
        mv = s.registry.register(
            name, d,
            params=params_log,
            metrics=model.eval_metrics,
            iterations=model.training_info.to_pylist(),
            sql=step.statement,
            tags={"model_type": model.model_type, "label": model.label or "",
                  "data_rows": str(rows), "data_hash": data_hash},
            aliases=aliases,
            started=started, ended=ended, examples=_examples(model, sample, sample_features, meta["input_columns"]),
            trials=tuning.trials if tuning is not None else None,
        )
    if tuning is not None:
        import shutil

        shutil.rmtree(tuning.folder, ignore_errors=True)  # registered: nothing is left to resume
    metrics = {k: v for k, v in model.eval_metrics.items() if v is not None}
    table = pa.table({
        "model": [name], "version": [mv.version], "model_type": [model.model_type],
        "training_rows": [rows],
        **{k: pa.array([v], pa.float64()) for k, v in metrics.items()},
    })
    shown = ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items())
    if shown:  # which rows the metrics are on: the held-out split's, or the training rows themselves
        shown = (f"On {model.n_eval:,} held-out rows: " if model.n_eval else
                 f"On the {model.n_train:,} training rows (no evaluation split): ") + shown
    from mlsql.output import plots

    if tuning is not None:
        ok = sum(r["status"] == "SUCCEEDED" for r in tuning.trials)
        shown = (f"Tuned over {len(tuning.trials)} trials ({ok} succeeded); optimal trial {tuning.optimal} "
                 f"({opts.objective} = {next(r['value'] for r in tuning.trials if r['is_optimal']):.4g} on the "
                 f"evaluation rows). " + shown)
        panels = plots.panels("trials", {"trials": tuning.trials, "objective": opts.objective})
    else:
        panels = plots.panels("loss", model.training_info)
    return Result(table, kind="create_model", plots=panels,
                  message=f"Created model {name} version {mv.version} ({model.model_type}). {shown}")


def _is_space(v) -> bool:
    from mlsql.language.options import HParamCandidates, HParamRange

    return isinstance(v, HParamRange | HParamCandidates)


def _tune(s: SessionState, name: str, features, opts, raw: dict, data_hash: str):
    """Run the trials of ``num_trials`` (mlsql.ml.tuning); the study is kept in the workspace
    (``tuning/<model>/``) until the model is registered, so ``resume = TRUE`` can continue it."""
    import hashlib

    from mlsql.ml.tuning import tune

    fingerprint = hashlib.sha256(json.dumps(
        [data_hash, {k: str(v) for k, v in sorted(raw.items()) if k.lower() != "resume"}]).encode()).hexdigest()
    folder = s.workspace.root / "tuning" / name
    reporter = s.progress(f"Tuning {name}", opts.num_trials) if s.progress else None

    def progress(done, total, info):
        if reporter is not None:
            reporter.update(done, total, {"best": info["best"]} if info["best"] is not None else {})

    try:
        return tune(features, opts, folder, fingerprint=fingerprint, progress=progress)
    finally:
        if reporter is not None:
            reporter.close()


def _examples(model, sample: pa.Table, features: pa.Table, input_columns: list[str]):
    """A few rows in (the columns ML.PREDICT reads) and out (what it returns), from which the
    registry infers the version's MLflow signature; None when they cannot be taken."""
    by_lower = {c.lower(): c for c in sample.column_names}
    try:
        inputs = sample.select([by_lower[c.lower()] for c in input_columns if c.lower() in by_lower])
        return inputs, model.predict(features.slice(0, sample.num_rows))
    except Exception as exc:  # a signature describes the model: never a reason to lose it
        import logging

        logging.getLogger(__name__).warning("no example rows for the MLflow signature: %s", exc)
        return None


def _json_safe(params: dict | None) -> dict | None:
    """Parameter values as JSON keeps them (dates as ISO text, which DuckDB casts back)."""
    if not params:
        return None
    return json.loads(json.dumps(params, default=str))


def register_trial(s: SessionState, spec: P.ModelSpec, trial_id: int) -> tuple[P.ModelSpec, str]:
    """Trial ``trial_id`` of the tuned version ``spec`` as a model version of its own, so that a device
    can hold it (a device knows a package by its model version, and the tuned version holds the
    optimal trial): registered once, and found again by its ``from_trial`` tag on the next DEPLOY.
    Returns the version to deploy and what was done, for the statement's message. The optimal
    trial is the tuned version itself."""
    import shutil

    from mlsql.runtime.steps.ml_functions import load_model, trial_folder

    lm = load_model(s, spec)
    mv = lm.version
    path = s.registry.local_path(mv)
    folder = trial_folder(path, mv.ref, int(trial_id))  # an error when not tuned, or no such trial
    if int(trial_id) == lm.meta.get("optimal_trial_id"):
        return P.ModelSpec(mv.name, mv.version), f"Trial {trial_id} is {mv.ref}'s optimal trial. "
    key = f"{mv.name}@{mv.version} trial {int(trial_id)}"
    for v in s.registry.versions(mv.name):
        if v.tags.get("mlsql.from_trial") == key:
            return P.ModelSpec(v.name, v.version), f"Trial {trial_id} of {mv.ref} is {v.ref}. "
    row = next(r for r in json.loads((path / TRIALS_FILE).read_text()) if r["trial_id"] == int(trial_id))
    with tempfile.TemporaryDirectory(prefix="mlsql-trial-") as tmp:
        d = Path(tmp) / "model"
        # the version's files (TRANSFORM, signature, ...) with the trial's model in place of the optimal one
        shutil.copytree(path, d, ignore=shutil.ignore_patterns("trials", TRIALS_FILE, "statement.sql", "exports"))
        shutil.copytree(folder, d, dirs_exist_ok=True)
        meta = {k: v for k, v in lm.meta.items() if k not in ("optimal_trial_id", "tuning_objective")}
        meta["from_trial"] = {"version": mv.ref, "trial_id": int(trial_id),
                              "metrics_on": "the tuning's evaluation rows"}
        (d / META_FILE).write_text(json.dumps(meta, indent=1))
        sql = (path / "statement.sql").read_text() if (path / "statement.sql").exists() else ""
        new = s.registry.register(
            mv.name, d,
            params={**{k: v for k, v in (row.get("hyperparameters") or {}).items()},
                    "from_trial": key},
            metrics={k: v for k, v in (row.get("hparam_tuning_evaluation_metrics") or {}).items()},
            sql=sql,
            tags={"model_type": mv.model_type, "label": mv.tags.get("mlsql.label", ""), "from_trial": key},
        )
    return P.ModelSpec(new.name, new.version), f"Registered trial {trial_id} of {mv.ref} as {new.ref}. "

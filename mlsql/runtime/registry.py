"""The model registry on MLflow: runs, versions, aliases, metrics.

Each ``CREATE MODEL`` is an MLflow run (params, per-iteration metrics, eval
metrics, the SQL text, a fingerprint of the training data) and a new version of
a registered model. MLflow is imported only when the registry is first used:
``import mlflow`` costs seconds.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlsql.errors import MLSQLError, UnknownModelError
from mlsql.workspace import Workspace

EXPERIMENT = "mlsql"
_TAG = "mlsql."


@dataclass
class ModelVersion:
    """One registered version of a model, as the registry knows it."""

    name: str
    version: int
    run_id: str
    source: str
    created: datetime
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def model_type(self) -> str:
        return self.tags.get(_TAG + "model_type", "")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


_clients: dict[str, Any] = {}
_lock = threading.Lock()


def prewarm() -> None:
    """Import MLflow on a background thread so the first CREATE MODEL does not wait for it."""

    def work():
        try:
            import mlflow  # noqa: F401
        except Exception:  # pragma: no cover - a failed warm-up is retried on real use
            pass

    threading.Thread(target=work, name="mlsql-mlflow-import", daemon=True).start()


class Registry:
    """Reads and writes models in the workspace's MLflow store."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._experiment_id: str | None = None

    # -- MLflow plumbing -------------------------------------------------
    @property
    def client(self):
        uri = self.workspace.tracking_uri
        with _lock:
            if uri not in _clients:
                os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
                from mlflow.tracking import MlflowClient

                # mlflow configures its loggers on import; quiet them afterwards (mlsql_log_level)
                from mlsql import logs

                for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
                    logging.getLogger(name).setLevel(logs.library_level())
                logs.apply()

                # the first use creates and migrates the SQLite store: two processes doing it at
                # once break each other's migration ("No such index: ...")
                from mlsql.locks import FileLock

                lock = FileLock(self.workspace.root / "mlflow.lock", what="the MLflow store while it is created")
                lock.acquire()
                try:
                    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                    client.search_experiments(max_results=1)
                    client.search_registered_models(max_results=1)
                finally:
                    lock.release()
                _clients[uri] = client
            return _clients[uri]

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            client = self.client
            exp = client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                try:
                    self._experiment_id = client.create_experiment(
                        EXPERIMENT, artifact_location=self.workspace.artifacts_dir.as_uri()
                    )
                except Exception:  # another process created it first
                    self._experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # -- writing ---------------------------------------------------------
    def register(
        self,
        name: str,
        model_dir: Path,
        *,
        params: dict[str, Any],
        metrics: dict[str, float],
        iterations: list[dict[str, float]] | None = None,
        sql: str = "",
        tags: dict[str, str] | None = None,
        aliases: list[str] | tuple[str, ...] = (),
        started: float | None = None,
        ended: float | None = None,
        examples: tuple[Any, Any] | None = None,
        trials: list[dict] | None = None,
    ) -> ModelVersion:
        """Log a run for a trained model and add it as the next version of ``name``.

        ``started``/``ended``: when training began and ended (epoch seconds), so the run's duration
        is the training's, not the registration's. ``examples``: (input rows, output rows) as Arrow
        tables, from which the version's MLflow signature is inferred."""
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        now = int(datetime.now(timezone.utc).timestamp() * 1000)
        start_ms = int(started * 1000) if started else now
        end_ms = int(ended * 1000) if ended else now
        run = client.create_run(self.experiment_id, run_name=name, start_time=start_ms)
        run_id = run.info.run_id
        try:
            mlflow_params = [Param(k, _short(v, 6000)) for k, v in sorted(params.items())]
            mlflow_metrics = [
                Metric(k, float(v), end_ms, 0) for k, v in metrics.items() if _is_number(v)
            ]
            at = float(start_ms)
            for row in iterations or []:
                step = int(row.get("iteration", 0))
                at += float(row.get("duration_ms") or 0.0) if _is_number(row.get("duration_ms")) else 0.0
                mlflow_metrics += [
                    Metric(f"train_{k}", float(v), int(min(at, end_ms)), step)
                    for k, v in row.items()
                    if k != "iteration" and _is_number(v)
                ]
            all_tags = {_TAG + k: v for k, v in (tags or {}).items()}
            all_tags[_TAG + "sql"] = _short(sql, 4000)
            mlflow_tags = [RunTag(k, str(v)) for k, v in all_tags.items()]
            for i in range(0, max(len(mlflow_metrics), 1), 900):
                client.log_batch(
                    run_id,
                    metrics=mlflow_metrics[i : i + 900],
                    params=mlflow_params if i == 0 else [],
                    tags=mlflow_tags if i == 0 else [],
                )
            (Path(model_dir) / "statement.sql").write_text(sql)
            if examples is not None:
                _write_signature(Path(model_dir), run_id, *examples)
            client.log_artifacts(run_id, str(model_dir), "model")
            for trial in trials or []:
                self._log_trial(run_id, name, trial, start_ms)
            client.set_terminated(run_id, end_time=end_ms)
        except BaseException:  # an interrupt too: the run is marked failed, no version is made
            client.set_terminated(run_id, status="FAILED", end_time=end_ms)
            raise
        try:
            client.create_registered_model(name)
        except Exception as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc) and "already exists" not in str(exc):
                raise
        mv = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/model",
            run_id=run_id,
            tags=all_tags,
        )
        # the run names its version (the version names its run through run_id and source)
        client.set_tag(run_id, _TAG + "model_version", f"{name}@{mv.version}")
        client.set_tag(run_id, _TAG + "model_uri", f"models:/{name}/{mv.version}")
        for alias in aliases:
            client.set_registered_model_alias(name, alias, mv.version)
        return self.get(name, int(mv.version))

    def _log_trial(self, parent_run_id: str, name: str, trial: dict, default_ms: int) -> None:
        """One tuning trial as a child run of the model's run: its hyperparameters, its metrics on
        the evaluation rows, its duration and status (its model is in the parent's artifacts,
        model/trials/<trial_id>/)."""
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        start = int(trial["started"] * 1000) if trial.get("started") else default_ms
        end = int(trial["ended"] * 1000) if trial.get("ended") else start
        run = client.create_run(self.experiment_id, run_name=f"{name} trial {trial['trial_id']}", start_time=start,
                                tags={"mlflow.parentRunId": parent_run_id})
        metrics = [Metric(k, float(v), end, 0) for k, v in (trial.get("hparam_tuning_evaluation_metrics") or {}).items()
                   if _is_number(v)]
        metrics += [Metric(k, float(trial[k]), end, 0) for k in ("training_loss", "eval_loss") if _is_number(trial.get(k))]
        metrics.append(Metric("duration_s", (end - start) / 1000, end, 0))
        tags = [RunTag(_TAG + "trial_id", str(trial["trial_id"])), RunTag(_TAG + "status", trial["status"]),
                *([RunTag(_TAG + "trial_pid", str(trial["pid"]))] if trial.get("pid") else []),
                RunTag(_TAG + "is_optimal", str(bool(trial.get("is_optimal"))).lower())]
        if trial.get("error_message"):
            tags.append(RunTag(_TAG + "error_message", _short(trial["error_message"], 4000)))
        client.log_batch(run.info.run_id, metrics=metrics, tags=tags,
                         params=[Param(k, _short(v, 6000)) for k, v in sorted((trial.get("hyperparameters") or {}).items())])
        status = {"SUCCEEDED": "FINISHED", "STOPPED": "KILLED"}.get(trial["status"], "FAILED")
        client.set_terminated(run.info.run_id, status=status, end_time=end)

    def trial_runs(self, mv: ModelVersion) -> list:
        """The MLflow child runs of a tuned model version's trials."""
        return self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{mv.run_id}'", max_results=1000)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.get(name, version)
        self.client.set_registered_model_alias(name, alias, str(version))

    def drop(self, name: str) -> None:
        self._require(name)
        self.client.delete_registered_model(name)

    def log_artifact(self, mv: ModelVersion, path: Path, artifact_path: str) -> None:
        """Attach a file (an export, a parity report) to the run of a model version."""
        self.client.log_artifact(mv.run_id, str(path), artifact_path)

    def set_version_tag(self, mv: ModelVersion, key: str, value: str) -> None:
        self.client.set_model_version_tag(mv.name, str(mv.version), _TAG + key, value)

    # -- reading ---------------------------------------------------------
    def names(self) -> list[str]:
        names, token = [], None
        while True:  # the store pages at 1,000
            page = self.client.search_registered_models(max_results=1000, page_token=token)
            names += [m.name for m in page]
            token = page.token
            if not token:
                return sorted(names)

    def exists(self, name: str) -> bool:
        return self._registered(name) is not None

    def _registered(self, name: str):
        try:
            return self.client.get_registered_model(name)
        except Exception as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc) or "not found" in str(exc).lower():
                return None
            raise

    def _require(self, name: str):
        rm = self._registered(name)
        if rm is None:
            raise UnknownModelError(name, self.names())
        return rm

    def versions(self, name: str) -> list[ModelVersion]:
        rm = self._require(name)
        aliases: dict[str, list[str]] = {}
        for alias, ver in (getattr(rm, "aliases", None) or {}).items():
            aliases.setdefault(str(ver), []).append(alias)
        out = [
            self._wrap(mv, aliases.get(str(mv.version), []))
            for mv in self.client.search_model_versions(f"name='{_quote(name)}'")
        ]
        return sorted(out, key=lambda v: v.version)

    def get(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """The version asked for: by number, by alias, or the latest trained one (a tuning trial
        registered as a version of its own for DEPLOY, tag ``mlsql.from_trial``, is not: the model's
        name alone still means what CREATE MODEL made last; the trial is name@version)."""
        versions = self.versions(name)
        if not versions:
            raise UnknownModelError(name, self.names(), message=f"Model '{name}' has no versions")
        if alias is not None:
            for v in versions:
                if alias in v.aliases:
                    return v
            known = sorted({a for v in versions for a in v.aliases})
            raise MLSQLError(
                f"Model '{name}' has no alias '{alias}'",
                hint=f"Known aliases: {', '.join(known)}" if known else "It has no aliases yet.",
            )
        if version is not None:
            for v in versions:
                if v.version == version:
                    return v
            raise MLSQLError(
                f"Model '{name}' has no version {version}",
                hint=f"Versions: {', '.join(str(v.version) for v in versions)}",
            )
        trained = [v for v in versions if not v.tags.get(_TAG + "from_trial")]
        return (trained or versions)[-1]

    def run_metrics(self, mv: ModelVersion) -> dict[str, float]:
        return dict(self.client.get_run(mv.run_id).data.metrics)

    def local_path(self, mv: ModelVersion) -> Path:
        """A local folder with the version's model files (downloaded if the store is remote)."""
        parsed = urlparse(mv.source)
        if parsed.scheme in ("", "file"):
            return Path(unquote(parsed.path))
        cache = self.workspace.root / "cache" / mv.name / str(mv.version)
        if not (cache / "model.json").exists():
            import mlflow.artifacts

            cache.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(cache))
            return cache / "model"
        return cache

    @staticmethod
    def _wrap(mv, aliases: list[str]) -> ModelVersion:
        return ModelVersion(
            name=mv.name,
            version=int(mv.version),
            run_id=mv.run_id,
            source=mv.source,
            created=datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc),
            aliases=sorted(aliases),
            tags=dict(mv.tags or {}),
        )


def _write_signature(model_dir: Path, run_id: str, inputs, outputs) -> None:
    """An MLmodel file holding the version's input/output signature (what ML.PREDICT takes and
    returns), written from the Arrow schemas of example rows; the MLflow UI shows it on the
    version's page. The types are the query's own: MLflow's inference from pandas would turn an
    integer column into a question (its "Integer columns ... cannot represent missing values"
    hint) that the Arrow type, nullable or not, already answers."""
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    try:
        signature = ModelSignature(
            Schema([ColSpec(_mlflow_type(f.type), f.name, required=not f.nullable) for f in inputs.schema]),
            Schema([ColSpec(_mlflow_type(f.type), f.name, required=not f.nullable) for f in outputs.schema]))
    except (TypeError, ValueError) as exc:  # a type MLflow cannot describe must not stop the registration
        logging.getLogger(__name__).warning("no MLflow signature for this model: %s", exc)
        return
    Model(artifact_path="model", run_id=run_id, signature=signature).save(str(model_dir / "MLmodel"))


def _mlflow_type(t):
    """An Arrow type as MLflow's schema type (lists as Array, structs as Object), or TypeError."""
    import pyarrow as pa
    from mlflow.types.schema import Array, DataType, Object, Property

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_boolean(t):
        return DataType.boolean
    if pa.types.is_integer(t):
        return DataType.integer if t.bit_width <= 16 or (t.bit_width == 32 and pa.types.is_signed_integer(t)) \
            else DataType.long
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return DataType.float
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return DataType.double
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return DataType.string
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return DataType.binary
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return DataType.datetime
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return Array(_mlflow_type(t.value_type))
    if pa.types.is_struct(t):
        return Object([Property(f.name, _mlflow_type(f.type), required=not f.nullable) for f in t])
    raise TypeError(f"no MLflow type for the Arrow type {t}")


def _is_number(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f  # NaN is not logged


def _short(v: Any, limit: int) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _quote(name: str) -> str:
    return name.replace("'", "\\'")

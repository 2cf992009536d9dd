"""A session: one workspace, one engine, the registry, and the statements run so far."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import planner as P
from ._lazy import pyarrow as pa  # imported by the first statement, not by connect()
from .engines.base import engine_class, open_engine
from .errors import MLSQLError, ModelError, OptionError, ParseError, UnknownColumnError, UnknownOptionError
from .registry import ModelVersion, Registry
from .result import Result
from .scripts import ML_SYNTAX, Statement, plain_statements, substitute_variables
from .workspace import Workspace

if TYPE_CHECKING:
    from .transform import FittedTransform

_PARAM = re.compile(r"(?<![$\w])\$([A-Za-z_]\w*)")
_WORD = re.compile(r"[A-Za-z_]\w*")
_FRAME_TYPES = {
    ("pandas", "DataFrame"),
    ("pyarrow", "Table"),
    ("pyarrow", "RecordBatchReader"),
    ("pyarrow", "RecordBatch"),
    ("pyarrow", "Dataset"),
    ("polars", "DataFrame"),
    ("polars", "LazyFrame"),
}
MLSQL_SETTINGS = ("mlsql_engine", "mlsql_lock_timeout", "mlsql_dialect")
# the STRUCT(... AS name) settings each ML table function reads; any other name is a typo
ML_SETTINGS = {"PREDICT": ("threshold", "device"), "EXPLAIN_PREDICT": ("top_k_features", "threshold"),
               "EVALUATE": ("threshold",), "CONFUSION_MATRIX": ("threshold",)}
TRANSFORM_FILE = "transform.json"
META_FILE = "mlsql_meta.json"


@dataclass
class LoadedModel:
    """A registered model version, loaded and ready to score Arrow tables."""

    version: ModelVersion
    model: Any  # mlsql.ml.TrainedModel
    transform: FittedTransform | None
    meta: dict

    @property
    def label(self) -> str:
        return self.model.label

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.model.features]


class Session:
    """Runs MLSQL scripts. ``mlsql.connect()`` makes one; the notebook magic wraps one."""

    def __init__(self, workspace: str | Path | None = None, engine: str = "duckdb", *,
                 namespace: dict | None = None, **engine_conf):
        engine_class(engine)  # an unknown engine fails before the workspace is touched
        self.workspace = Workspace.open(workspace)
        # e.g. master=, remote=, conf= for Spark; kept so SET mlsql_engine back to it reopens it alike
        self._engine_conf = {str(engine).lower(): engine_conf} if engine_conf else {}
        self.engine = open_engine(engine, self.workspace, **engine_conf)
        self.sql_dialect: str | None = None  # SET mlsql_dialect: plain statements in the engine's own SQL
        self.registry = Registry(self.workspace)
        self.namespace = namespace
        self.progress = None  # factory(title, total) -> reporter with update(i, total, metrics), close()
        self.display_limit = 10
        self._planner = P.Planner(self.engine.temp_name)
        from .devices import DeviceStore

        self.devices = DeviceStore(self.workspace.devices_path)
        self._models: dict[tuple[str, int], LoadedModel] = {}
        self._from_namespace: set[str] = set()
        self.on_wait = _say_on_stderr

    @property
    def on_wait(self):
        """Called as ``on_wait(message, waited_s)`` about every half second while a statement waits
        for the workspace (another process holds it); the notebook shows it in the cell."""
        return getattr(self.engine, "on_wait", None)

    @on_wait.setter
    def on_wait(self, fn) -> None:
        if hasattr(self.engine, "on_wait"):
            self.engine.on_wait = fn

    # -- public API ------------------------------------------------------------
    def sql(self, text: str, params: dict | None = None, *, autolimit: int | None = None) -> Result:
        """Run a script; the last statement's result (earlier messages are in ``.log``)."""
        results = self.execute(text, params, autolimit=autolimit)
        if not results:
            return Result(pa.table({}), message="No statement to run.")
        last = results[-1]
        last.log = [r.message for r in results[:-1] if r.message]
        return last

    def execute(self, text: str, params: dict | None = None, *,
                autolimit: int | None = None) -> list[Result]:
        """Run every statement of a script in order; one Result each.

        A failing statement raises; everything before it has already taken effect.
        """
        return list(self.iter_execute(text, params, autolimit=autolimit))

    def iter_execute(self, text: str, params: dict | None = None, *,
                     autolimit: int | None = None) -> Iterator[Result]:
        """``execute``, yielding each statement's Result as soon as it has run (``mlsql run``
        prints them as they come, so a later failure does not hide earlier results)."""
        stmts = self._statements(text)
        for i, item in enumerate(stmts):
            is_last = i == len(stmts) - 1
            line = None
            try:
                for stmt in (item() if callable(item) else [item]):
                    line = stmt.line
                    yield self._run_statement(stmt, params, autolimit if is_last else None)
            except MLSQLError as exc:
                if len(stmts) > 1:
                    exc.with_context(f"Statement {i + 1}" + (f" (line {line})" if line else ""))
                raise

    def register(self, name: str, data) -> None:
        """Make a pandas/polars/Arrow object queryable as ``name``."""
        self.engine.register(name, data)

    def model(self, ref: str) -> LoadedModel:
        """Load ``name``, ``name@3`` or ``name@alias`` from the registry."""
        return self._load(_spec(ref))

    def export(self, ref: str, **options) -> Result:
        """Python form of ``EXPORT MODEL ref OPTIONS (...)``: the parity report as a Result."""
        return self._export(_spec(ref), options)

    def set_alias(self, model: str, alias: str, version: int) -> None:
        self.registry.set_alias(model, alias, version)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- parsing ---------------------------------------------------------------
    def _statements(self, text: str) -> list:
        """The script's statements. With ``${var}`` in the text, each statement is a thunk parsed
        just before it runs, so a SET earlier in the script applies to the statements after it."""
        if "${" not in text and not ML_SYNTAX.search(text):
            return plain_statements(text)  # plain DuckDB SQL: no sqlglot parse, DuckDB reads it
        from sqlglot.tokens import TokenType

        from .dialect import _DIALECT, parse_script

        if "${" not in text:
            return parse_script(text)

        bounds, start = [], 0
        for tok in _DIALECT.tokenize(text):
            if tok.token_type == TokenType.SEMICOLON:
                bounds.append((start, tok.start))
                start = tok.end + 1
        bounds.append((start, len(text)))
        return [self._thunk(text, a, b) for a, b in bounds if text[a:b].strip()]

    def _thunk(self, text: str, a: int, b: int):
        def parse() -> list[Statement]:
            from .dialect import parse_script

            chunk = text[a:b]
            line0 = text.count("\n", 0, a)
            try:
                parsed = parse_script(substitute_variables(chunk, self.variables))
            except ParseError as exc:
                raise ParseError(
                    exc.message.split(". Line")[0], sql=text,
                    line=(exc.line or 1) + line0, col=exc.col, hint=exc.hint,
                ) from None
            return [Statement(sql=st.sql, expression=st.expression, start=st.start + a,
                              line=st.line + line0, is_ml=st.is_ml) for st in parsed]

        return parse

    # -- running ---------------------------------------------------------------
    def _run_statement(self, stmt: Statement, params, autolimit) -> Result:
        t0 = time.perf_counter()
        plan = self._planner.plan(stmt)
        self._bind_namespace(stmt.sql)
        temps: list[str] = []
        try:
            result = None
            # the user's own text (not MLSQL's rendering of an ML statement) may be in the engine's dialect
            own = self.sql_dialect if not stmt.is_ml else None
            for step in plan.steps:
                result = self._run_step(step, params, autolimit, temps, own)
        finally:
            for name in temps:
                self.engine.unregister(name)
        result.elapsed = time.perf_counter() - t0
        result.statement = stmt.sql
        result.display_limit = self.display_limit
        return result

    def _run_step(self, step, params, autolimit, temps: list[str], dialect: str | None = None) -> Result | None:
        if isinstance(step, P.QueryStep):
            kw = {"dialect": dialect} if dialect else {}  # DuckDB's run() knows no dialect: it is never set there
            got = self.engine.run(step.sql, _params_for(step.sql, params), limit=autolimit, line=step.line, **kw)
            truncated = bool(autolimit) and got.table.num_rows == autolimit
            return Result(got.table, truncated=truncated, python_rows=got.rows, pandas_frame=got.frame)
        if isinstance(step, P.MLStep):
            table = self._run_ml(step, params)
            self.engine.register(step.output, table)
            temps.append(step.output)
            return Result(table, kind="ml")
        if isinstance(step, P.CreateModelStep):
            return self._create_model(step, params, temps)
        if isinstance(step, P.ShowModelsStep):
            return Result(self._show_models(), kind="show")
        if isinstance(step, P.DescribeModelStep):
            return Result(self._describe_model(step.model), kind="describe")
        if isinstance(step, P.DropModelStep):
            if not self.registry.exists(step.model):
                if step.if_exists:
                    return Result(pa.table({}), message=f"Model {step.model} does not exist; nothing dropped.")
                self.registry.drop(step.model)  # raises UnknownModelError with a suggestion
            self.registry.drop(step.model)
            self._models = {k: v for k, v in self._models.items() if k[0] != step.model}
            return Result(pa.table({}), message=f"Dropped model {step.model} and all its versions.")
        if isinstance(step, P.SetStep):
            return self._set(step)
        if isinstance(step, P.ExplainStep):
            return Result(step.plan.explain_table(), kind="explain")
        if isinstance(step, P.ExportStep):
            return self._export(step.model, step.options)
        if isinstance(step, P.DeviceStep):
            return self._device_step(step)
        if isinstance(step, P.JobStep):
            from .job_statements import run_job_step

            return run_job_step(self.workspace, step)
        raise AssertionError(f"no runner for {step!r}")

    @property
    def variables(self) -> dict[str, Any]:
        """The script variables (``SET VARIABLE name = value``, read as ``${name}``)."""
        return self.engine.variables()

    def _set(self, step: P.SetStep) -> Result:
        """MLSQL's own settings, ``SET mlsql_<name> = value`` (``RESET mlsql_<name>``: the default)."""
        name = step.name.lower()
        reset = step.value is None
        if name == "mlsql_engine":
            want = "duckdb" if reset else str(step.value).lower()
            engine_class(want)  # unknown names fail with a suggestion
            if want != self.engine.name:
                on_wait = self.on_wait
                self.engine.close()
                self.engine = open_engine(want, self.workspace, **self._engine_conf.get(want, {}))
                self.on_wait = on_wait
                self._planner = P.Planner(self.engine.temp_name)
                if self.sql_dialect and self.sql_dialect != self.engine.dialect:
                    self.sql_dialect = None
            return Result(pa.table({}), message=f"mlsql_engine = '{want}'")
        if name == "mlsql_dialect":
            want = None if reset else str(step.value).lower()
            if want in ("duckdb", "mlsql"):
                want = None
            if want is not None and want != self.engine.dialect:
                raise OptionError(f"mlsql_dialect = '{want}': the {self.engine.name} engine reads MLSQL's "
                                  f"(DuckDB) SQL{' or ' + repr(self.engine.dialect) if self.engine.dialect != 'duckdb' else ''}",
                                  hint="SET mlsql_engine = 'spark' first to write Spark SQL directly.")
            self.sql_dialect = want
            return Result(pa.table({}), message=f"mlsql_dialect = '{want or 'duckdb'}'"
                          + (" (plain statements go to the engine as written)" if want else ""))
        if name == "mlsql_lock_timeout":
            from .locks import DEFAULT_TIMEOUT_S

            v = DEFAULT_TIMEOUT_S if reset else step.value
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise OptionError(f"mlsql_lock_timeout must be a number of seconds ≥ 0, got {v!r}")
            self.engine.lock_timeout = float(v)
            return Result(pa.table({}), message=f"mlsql_lock_timeout = {float(v):g} s")
        raise UnknownOptionError(step.name, MLSQL_SETTINGS, where="(MLSQL's own settings)")

    def _bind_namespace(self, sql: str) -> None:
        """Expose notebook DataFrames named in the statement that are not catalog tables."""
        ns = self.namespace
        if not ns:
            return
        for name in set(_WORD.findall(sql)) & ns.keys():
            obj = ns[name]
            cls = type(obj)
            if (cls.__module__.split(".")[0], cls.__name__) not in _FRAME_TYPES:
                continue
            if name in self._from_namespace or not self.engine.has_relation(name):
                self.engine.register(name, obj)
                self._from_namespace.add(name)

    # -- models ----------------------------------------------------------------
    def _load(self, spec: P.ModelSpec) -> LoadedModel:
        mv = self.registry.get(spec.name, spec.version, spec.alias)
        key = (mv.name, mv.version)
        if key not in self._models:
            from .ml import TrainedModel

            path = self.registry.local_path(mv)
            model = TrainedModel.load(path)
            tf = path / TRANSFORM_FILE
            from .transform import FittedTransform

            transform = FittedTransform.from_json(tf.read_text()) if tf.exists() else None
            meta_path = path / META_FILE
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            self._models[key] = LoadedModel(mv, model, transform, meta)
        return self._models[key]

    def _features(self, lm: LoadedModel, data: pa.Table, *, need_label: bool, func: str) -> pa.Table:
        """The model's input columns (after TRANSFORM) for ``data``; label kept if present."""
        cols = data.column_names
        label = lm.label
        if need_label and label.lower() not in {c.lower() for c in cols} and lm.transform is None:
            raise UnknownColumnError(
                label, cols, message=f"ML.{func} input has no label column '{label}' for model {lm.version.ref}"
            )
        if lm.transform is not None:
            tmp = self.engine.temp_name("in")
            self.engine.register(tmp, data)
            try:
                sql = lm.transform.select_sql(tmp, cols, optional=set() if need_label else {label})
                data = self.engine.query(sql)
            finally:
                self.engine.unregister(tmp)
            cols = data.column_names
        by_lower = {c.lower(): c for c in cols}
        wanted = lm.feature_names + ([label] if label.lower() in by_lower else [])
        arrays, names = [], []
        for name in wanted:
            real = by_lower.get(name.lower())
            if real is None:
                raise UnknownColumnError(
                    name, cols,
                    message=f"ML.{func} input has no column '{name}', which model {lm.version.ref} needs",
                )
            arrays.append(data.column(real))
            names.append(name)
        out = pa.table(arrays, names=names)
        from .ml.features import check_input_types

        check_input_types(out, lm.model.features, where=f"ML.{func} with model {lm.version.ref}")
        return out

    def _run_ml(self, step: P.MLStep, params) -> pa.Table:
        func = step.func
        data = None
        if step.input_sql is not None:
            data = self.engine.query(step.input_sql, _params_for(step.input_sql, params))
        if func == "DEVICE_METRICS":
            from .deploy import metrics_table

            if len(step.args) != 1 or not isinstance(step.args[0], str):
                raise MLSQLError("ML.DEVICE_METRICS takes one device name: ML.DEVICE_METRICS('my-device')")
            return metrics_table(self.devices.get(step.args[0]))
        if func == "JOB_RUNS":
            from .job_statements import job_runs_table

            return job_runs_table(self.workspace, step.args)
        if step.model is None:
            raise MLSQLError(f"ML.{func} is not available in this version of MLSQL")
        lm = self._load(step.model)
        model = lm.model
        s = {k.lower(): v for k, v in step.settings.items()}
        allowed = ML_SETTINGS.get(func, ())
        for key in s:
            if key not in allowed:
                raise UnknownOptionError(key, allowed, where=f"in ML.{func}'s STRUCT(...)") if allowed else \
                    MLSQLError(f"ML.{func} takes no settings, got STRUCT(... AS {key})")
        if func == "PREDICT" and s.get("device"):
            from .deploy import remote_predict

            data = _require_input(data, func, step)
            dev = self.devices.get(str(s["device"]))
            version = lm.version.version if (step.model.version or step.model.alias) else None
            preds = remote_predict(dev, lm.version.name, version, data, lm.label, model.classes, model.label_type)
            return _hconcat(preds, data)
        if func == "PREDICT":
            data = _require_input(data, func, step)
            preds = model.predict(self._features(lm, data, need_label=False, func=func),
                                  **({"threshold": float(s["threshold"])} if "threshold" in s else {}))
            return _hconcat(preds, data)
        if func == "EXPLAIN_PREDICT":
            data = _require_input(data, func, step)
            top_k = int(s.get("top_k_features", 5))
            out = model.explain_predict(self._features(lm, data, need_label=False, func=func), top_k=top_k)
            return _hconcat(out, data)
        if func == "EVALUATE":
            if data is None:
                metrics = dict(model.eval_metrics)
            else:
                feats = self._features(lm, data, need_label=True, func=func)
                kw = {"threshold": float(s["threshold"])} if "threshold" in s else {}
                metrics = model.evaluate(feats, **kw)
            return pa.table({k: pa.array([v], pa.float64()) for k, v in metrics.items()})
        if func == "FEATURE_IMPORTANCE":
            return model.feature_importance()
        if func == "TRAINING_INFO":
            return model.training_info
        if func in ("CONFUSION_MATRIX", "ROC_CURVE"):
            data = _require_input(data, func, step)
            feats = self._features(lm, data, need_label=True, func=func)
            if func == "ROC_CURVE":
                return model.roc_curve(feats)
            kw = {"threshold": float(s["threshold"])} if "threshold" in s else {}
            return model.confusion_matrix(feats, **kw)
        raise MLSQLError(f"ML.{func} is not available in this version of MLSQL")

    def _create_model(self, step: P.CreateModelStep, params, temps: list[str]) -> Result:
        from .ml import resolve_options, train

        name = step.model
        if self.registry.exists(name):
            if step.if_not_exists:
                return Result(pa.table({}), message=f"Model {name} already exists; nothing trained.")
            if not step.replace:
                latest = self.registry.get(name)
                raise MLSQLError(
                    f"Model '{name}' already exists (latest version {latest.version})",
                    hint=f"Use CREATE OR REPLACE MODEL {name} to add a new version, or DROP MODEL {name}.",
                )
        raw = dict(step.options)
        aliases = raw.pop("aliases", None) or raw.pop("alias", None) or []
        aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        opts = resolve_options(raw)  # bad options fail before any data is read

        query_params = _params_for(step.query_sql, params)
        data = self.engine.query(step.query_sql, query_params)
        if data.num_rows == 0:
            raise MLSQLError(f"The training query for model {name} returned no rows")
        raw_name = self.engine.temp_name("train")
        self.engine.register(raw_name, data)
        temps.append(raw_name)
        transform = None
        features = data
        if step.transform:
            from .transform import fit_transform

            transform = fit_transform(step.transform, raw_name, data.column_names, self.engine.query)
            features = self.engine.query(transform.select_sql(raw_name, data.column_names))
        fp = self.engine.fingerprint(raw_name)
        rows, data_hash = fp.rows, fp.digest

        reporter = self.progress(f"Training {name}", 0) if self.progress else None
        try:
            model = train(features, opts, progress=reporter.update if reporter else None)
        finally:
            if reporter is not None:
                reporter.close()
        if transform is not None and model.label not in transform.output_columns:
            raise MLSQLError(f"TRANSFORM must output the label column '{model.label}'")

        with tempfile.TemporaryDirectory(prefix="mlsql-model-") as tmp:
            d = Path(tmp)
            model.save(d)
            if transform is not None:
                (d / TRANSFORM_FILE).write_text(transform.to_json())
            meta = {
                "query_sql": step.query_sql,
                # the values of its {name} / $name parameters: export and deploy sample the same rows
                "query_params": _json_safe(query_params),
                "input_columns": transform.input_columns if transform else [f.name for f in model.features],
                "training_schema": {f.name: str(f.type) for f in data.schema},
                "data_rows": rows,
                "data_hash": data_hash,
                "data_hash_algorithm": fp.algorithm,
                # the planner writes the training query in MLSQL's (DuckDB) SQL on every engine;
                # each engine renders it for itself when it reads the rows again
                "query_dialect": "duckdb",
                "engine": self.engine.name,
            }
            (d / META_FILE).write_text(json.dumps(meta, indent=1))
            params_log = {k: v for k, v in raw.items()}
            mv = self.registry.register(
                name, d,
                params=params_log,
                metrics=model.eval_metrics,
                iterations=model.training_info.to_pylist(),
                sql=step.statement,
                tags={"model_type": model.model_type, "label": model.label,
                      "data_rows": str(rows), "data_hash": data_hash},
                aliases=aliases,
            )
        metrics = {k: v for k, v in model.eval_metrics.items() if v is not None}
        table = pa.table({
            "model": [name], "version": [mv.version], "model_type": [model.model_type],
            "training_rows": [rows],
            **{k: pa.array([v], pa.float64()) for k, v in metrics.items()},
        })
        shown = ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items())
        return Result(table, kind="create_model",
                      message=f"Created model {name} version {mv.version} ({model.model_type}). {shown}")

    # -- export ------------------------------------------------------------------
    def _sample_rows(self, lm: LoadedModel, n: int = 2000) -> pa.Table:
        query = lm.meta.get("query_sql")
        if not query:
            raise MLSQLError(f"Model {lm.version.ref} does not record its training query; retrain it to export")
        params = lm.meta.get("query_params") or None
        if n <= 16:  # a probe row: no need to scan the whole training query
            return self.engine.query(f"SELECT * FROM ({query}) AS t LIMIT {int(n)}", params)
        return self.engine.sample(query, n, seed=42, params=params)

    def _native_predict(self, lm: LoadedModel):
        def run(raw: pa.Table):
            feats = self._features(lm, raw, need_label=False, func="PREDICT")
            return lm.model.estimator.predict_raw(lm.model.encode(feats))

        return run

    def _export(self, spec: P.ModelSpec, options: dict, *, quiet: bool = False):
        from .onnx import export_model, resolve_export_options

        opts = resolve_export_options({k.lower(): v for k, v in options.items()})
        lm = self._load(spec)
        mv = lm.version
        sample = self._sample_rows(lm)
        calibration = None
        if opts.get("calibration_query"):
            calibration = self.engine.query(str(opts["calibration_query"]))
        suffix = "" if opts["quantize"] == "none" else f"_{opts['quantize']}"
        uri = opts.get("uri") or str(self.workspace.exports_dir / f"{mv.name}_v{mv.version}{suffix}.onnx")
        raw_schema = lm.meta.get("training_schema", {})
        result = export_model(lm.model, lm.transform, raw_schema,
                              {k: v for k, v in opts.items() if k not in ("uri", "calibration_query", "providers", "package")},
                              sample, self._native_predict(lm), Path(uri).expanduser(), calibration, name=mv.ref)
        report_path = result.path.with_suffix(".parity.json")
        report_path.write_text(json.dumps(result.report.to_dict(), indent=1, default=str))
        result.package_path = None
        if opts.get("package") or opts.get("providers"):
            result.package_path = self._package(lm, result, sample, opts.get("providers"))
        try:
            self.registry.log_artifact(mv, result.path, "exports")
            self.registry.log_artifact(mv, report_path, "exports")
            if result.package_path is not None:
                self.registry.log_artifact(mv, result.package_path, "exports")
            self.registry.set_version_tag(mv, f"export.{opts['quantize']}", str(result.path))
        except Exception as exc:  # the file is written; say the registry could not record it
            raise MLSQLError(f"Exported {mv.ref} to {result.path}, but the registry could not record it: {exc}") from exc
        if quiet:
            return result
        r = result.report
        msg = (f"Exported {mv.ref} to {result.path} ({r.size_bytes / 1024:.1f} KiB, quantize={r.quantize}); "
               f"parity max diff {r.max_abs_diff:.2g} on {r.rows} rows")
        if result.package_path is not None:
            msg += f"; signed package {result.package_path}"
        if r.metric:
            msg += f"; {r.metric} {r.metric_native:.4f} native, {r.metric_onnx:.4f} ONNX"
            if r.metric_quantized is not None:
                msg += f", {r.metric_quantized:.4f} {r.quantize}"
        out = Result(r.to_table(), kind="export", message=msg)
        out.export = result
        return out

    def _package(self, lm: LoadedModel, result, sample: pa.Table, providers=None) -> Path:
        """Sign the export into a device package next to it (``<file>.mlpkg``)."""
        from .onnx import build_device_package, input_statistics

        mv = lm.version
        if isinstance(providers, str):
            providers = [providers]
        path = result.path.with_suffix(".mlpkg")
        build_device_package(
            result, name=mv.name, version=mv.version, key_dir=self.workspace.keys_dir, label=lm.label,
            classes=lm.model.classes, model_type=lm.model.model_type, metrics=dict(lm.model.eval_metrics),
            stats=input_statistics(sample, result.inputs), providers=list(providers or ["cpu"]), out=path,
            created_at=mv.created.isoformat(timespec="seconds"),  # UTC (the registry's timestamp)
        )
        return path

    # -- devices -----------------------------------------------------------------
    def _device_step(self, step: P.DeviceStep) -> Result:
        from . import deploy as D

        a = step.action
        if a == "create_device":
            dev = self.devices.add(step.name, step.options, replace=step.replace, if_not_exists=step.exists)
            if dev is None:
                return Result(pa.table({}), message=f"Device {step.name} already exists; nothing changed.")
            p = D.probe(dev)
            if p["ok"]:
                info = p["info"]
                provs = ", ".join(D._short(x) for x in info.get("available_providers", []))
                msg = (f"Registered device {dev.name} at {dev.url}: online, onnxruntime {info.get('onnxruntime')}, "
                       f"providers {provs}")
            else:
                msg = f"Registered device {dev.name} at {dev.url}; not reachable now ({p['error']})"
            return Result(D.devices_table([dev]), kind="device", message=msg)
        if a == "show_devices":
            return Result(D.devices_table(self.devices.devices()), kind="show")
        if a == "drop_device":
            dropped = self.devices.drop(step.name, if_exists=step.exists)
            return Result(pa.table({}), message=f"Dropped device {step.name}." if dropped
                          else f"Device {step.name} does not exist; nothing dropped.")
        if a == "create_group":
            g = self.devices.add_group(step.name, step.options, replace=step.replace, if_not_exists=step.exists)
            if g is None:
                return Result(pa.table({}), message=f"Device group {step.name} already exists; nothing changed.")
            return Result(pa.table({"group": [g.name], "devices": [g.devices], "hub": [g.hub or None]}),
                          message=f"Created device group {g.name} with {len(g.devices)} devices"
                                  + (f" behind hub {g.hub}" if g.hub else ""))
        if a == "drop_group":
            dropped = self.devices.drop_group(step.name, if_exists=step.exists)
            return Result(pa.table({}), message=f"Dropped device group {step.name}." if dropped
                          else f"Device group {step.name} does not exist; nothing dropped.")
        if a == "deploy":
            if step.target_kind == "GROUP":
                return self._deploy_group(step)
            return self._deploy_device(step)
        if a == "rollback":
            if step.target_kind == "GROUP":
                raise MLSQLError("ROLLBACK MODEL ... ON GROUP is not available; a failed rollout rolls its waves back")
            dev = self.devices.get(step.name)
            r = D.ask(dev, lambda c: c.rollback(step.model.name),
                      f"Rollback of {step.model.name} on device '{dev.name}' failed")
            return Result(pa.table({"device": [dev.name], "model": [step.model.name], "active": [r.get("active")],
                                    "previous": [r.get("previous")]}),
                          message=f"Rolled {step.model.name} back on {dev.name}: version {r.get('active')} is active.")
        raise AssertionError(a)

    def _deployable(self, step: P.DeviceStep, opts: dict):
        """Export (with the deploy's quantization) and sign a package for the model version.

        The deploy's providers travel with the install, not in the package: the same version and
        export options give the same bytes, so deploying again (with other providers or not)
        re-activates what the device has instead of conflicting with it."""
        export_opts = {"quantize": opts["quantize"], "tree_format": opts["tree_format"], "package": True,
                       "max_metric_drop": opts["max_metric_drop"]}
        if opts.get("calibration_query"):
            export_opts["calibration_query"] = opts["calibration_query"]
        result = self._export(step.model, export_opts, quiet=True)
        return self._load(step.model), result

    def _deploy_device(self, step: P.DeviceStep) -> Result:
        from . import deploy as D

        opts = D.resolve_deploy_options(step.options)
        dev = self.devices.get(step.name)
        if opts.get("only_if_better"):
            candidate = self._load(step.model).version
            active = D.active_version(dev, candidate.name)
            reason = D.not_better_reason(self.registry, candidate, active, opts["only_if_better"])
            if reason:
                return Result(pa.table({"device": [dev.name], "model": [candidate.name],
                                        "version": [candidate.version], "active": [active], "deployed": [False]}),
                              kind="deploy", message=f"Not deployed to {dev.name}: {reason}.")
        lm, result = self._deployable(step, opts)
        data = result.package_path.read_bytes()
        c = D.client_for(dev)
        try:
            r = c.install(data, providers=opts["providers"] or ["cpu"], strict_providers=opts["strict_providers"],
                          model=lm.version.name)
        except Exception as exc:
            err = D.wrap(exc, f"Deploying {lm.version.ref} to device '{dev.name}' failed")
            if getattr(exc, "status", None) == 409:
                err.hint = (f"'{dev.name}' already holds {lm.version.ref} built with other export options "
                            f"(quantize, tree_format or calibration_query); a device keeps one build per model "
                            f"version. Deploy with the options used before, or train a new version.")
            raise err from None
        finally:
            c.close()
        try:
            sample = self._sample_rows(lm, 1)
            rtt, on_device = D.first_inference(dev, lm.version.name, sample, result.inputs)
        except MLSQLError:
            raise
        except Exception as exc:
            raise D.wrap(exc, f"{lm.version.ref} is installed on '{dev.name}' but its first prediction failed") from None
        placed = D.placement_text(r.get("node_providers"), r.get("providers"))
        table = pa.table({
            "device": [dev.name], "model": [lm.version.name], "version": [lm.version.version],
            "active": [r.get("active")], "previous": [r.get("previous")],
            "providers": [[D._short(p) for p in r.get("providers") or []]],
            "placement": [json.dumps(r.get("node_providers") or {})],
            "package_bytes": [len(data)], "first_inference_ms": [rtt], "on_device_ms": [on_device],
        })
        state = (f"already installed, re-activated with providers {opts['providers'] or ['cpu']}"
                 if r.get("installed") is not True and r.get("previous") == r.get("active")
                 else f"version {r.get('active')} active, " + (f"previous {r.get('previous')}" if r.get("previous")
                                                                else "no previous version"))
        return Result(table, kind="deploy", message=(
            f"Deployed {lm.version.ref} to {dev.name} ({state}); "
            f"runs on {placed}; first inference {rtt:.1f} ms round trip, {on_device:.2f} ms on the device"))

    def _deploy_group(self, step: P.DeviceStep) -> Result:
        from . import deploy as D

        opts = D.resolve_deploy_options(step.options)
        if opts.get("only_if_better"):
            raise MLSQLError("only_if_better applies to DEPLOY ... TO DEVICE",
                             hint="A group's rollout is gated by max_error_rate, max_p95_ms, max_drift and "
                                  "required_provider; compare metrics before the DEPLOY ... TO GROUP instead.")
        group = self.devices.group(step.name)
        lm, result = self._deployable(step, opts)
        return D.deploy_group(group, lm, result, opts)

    def _show_models(self) -> pa.Table:
        rows = []
        for name in self.registry.names():
            versions = self.registry.versions(name)
            if not versions:
                continue
            v = versions[-1]
            rows.append({
                "model": name, "latest_version": v.version, "versions": len(versions),
                "model_type": v.model_type, "label": v.tags.get("mlsql.label", ""),
                "aliases": sorted({a for x in versions for a in x.aliases}),
                "created": v.created, "training_rows": int(v.tags.get("mlsql.data_rows", 0) or 0),
            })
        schema = pa.schema([
            ("model", pa.string()), ("latest_version", pa.int64()), ("versions", pa.int64()),
            ("model_type", pa.string()), ("label", pa.string()), ("aliases", pa.list_(pa.string())),
            ("created", pa.timestamp("ms", tz="UTC")), ("training_rows", pa.int64()),
        ])
        return pa.Table.from_pylist(rows, schema=schema)

    def _describe_model(self, spec: P.ModelSpec) -> pa.Table:
        lm = self._load(spec)
        mv = lm.version
        all_versions = self.registry.versions(mv.name)
        props: list[tuple[str, str]] = [
            ("name", mv.name), ("version", str(mv.version)),
            ("versions", ", ".join(str(v.version) for v in all_versions)),
            ("aliases", ", ".join(mv.aliases)), ("model_type", lm.model.model_type),
            ("label", lm.label), ("created", mv.created.isoformat(timespec="seconds")),
            ("features", ", ".join(lm.feature_names)),
            ("input_columns", ", ".join(lm.meta.get("input_columns", lm.feature_names))),
        ]
        if lm.transform is not None:
            props += [(f"transform.{n}", sql) for n, sql in lm.transform.items]
        props += [(f"metric.{k}", f"{v:.6g}") for k, v in lm.model.eval_metrics.items() if v is not None]
        props += [("data_rows", str(lm.meta.get("data_rows", ""))), ("data_hash", lm.meta.get("data_hash", "")),
                  ("run_id", mv.run_id)]
        sql_file = self.registry.local_path(mv) / "statement.sql"
        if sql_file.exists():
            props.append(("sql", sql_file.read_text()))
        return pa.table({"property": [p for p, _ in props], "value": [v for _, v in props]})


def _spec(ref: str) -> P.ModelSpec:
    name, _, tail = ref.partition("@")
    return P.ModelSpec(name.lower(), int(tail) if tail.isdigit() else None, tail if tail and not tail.isdigit() else None)


def _say_on_stderr(message: str, waited_s: float) -> None:
    import sys

    if waited_s < 1.0 or int(waited_s * 2) % 4 == 0:  # at once, then every two seconds
        print(f"{message} (waited {waited_s:.0f} s)", file=sys.stderr, flush=True)


def _json_safe(params: dict | None) -> dict | None:
    """Parameter values as JSON keeps them (dates as ISO text, which DuckDB casts back)."""
    if not params:
        return None
    return json.loads(json.dumps(params, default=str))


def _params_for(sql: str, params: dict | None) -> dict | None:
    """Only the named parameters a piece of SQL uses: DuckDB rejects extra ones."""
    if not params:
        return None
    used = set(_PARAM.findall(sql))
    return {k: v for k, v in params.items() if k in used} or None


def _require_input(data, func: str, step) -> pa.Table:
    if data is None:
        raise MLSQLError(
            f"ML.{func} needs input rows",
            hint=f"Write ML.{func}(MODEL {step.model}, TABLE my_table) or ML.{func}(MODEL {step.model}, (SELECT ...)).",
        )
    return data


def _hconcat(new: pa.Table, data: pa.Table) -> pa.Table:
    """Prediction columns first, then the input columns (BigQuery ML's order)."""
    if new.num_rows != data.num_rows:
        raise ModelError(f"Model returned {new.num_rows} rows for {data.num_rows} input rows")
    taken = {c.lower() for c in new.column_names}
    names = list(new.column_names)
    arrays = list(new.columns)
    for name, col in zip(data.column_names, data.columns):
        if name.lower() not in taken:
            names.append(name)
            arrays.append(col)
    return pa.table(arrays, names=names)

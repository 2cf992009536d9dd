"""The REST API the JupyterLab extension reads: models, devices, deploys, jobs, alerts (docs/EXTENSION.md).

Every handler is a jupyter_server ``APIHandler`` behind ``@tornado.web.authenticated``: the
server's token or login cookie, and XSRF for a POST made with cookies. The data is the
workspace the server shares with its kernels: the MLflow store, the device list, the job
store, each opened, read and let go per request. Only a deploy opens a Session, which attaches
the DuckDB catalog behind the workspace lock while it works, like any kernel.

Blocking work (MLflow, device calls, the deploy itself) runs on threads, never on the
server's event loop; device calls have a short timeout and run concurrently.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import tornado.ioloop
import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from traitlets import Float, Unicode, default
from traitlets.config import Configurable

from mlsql.language.options import QUANTIZE
from mlsql.workspace import Workspace

_MODEL_NAME = re.compile(r"^[A-Za-z_][\w]*$")
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_PROVIDER = re.compile(r"^[A-Za-z0-9_]{1,64}$")
DEPLOY_FIELDS = ("model", "version", "device", "group", "providers", "quantize")


class MLSQLServer(Configurable):
    """Settings of the mlsql.notebook.server extension (``--MLSQLServer.mlflow_ui=http://host:5000``)."""

    mlflow_ui = Unicode(None, allow_none=True, help="Base URL of an MLflow UI serving the workspace's store "
                        "(default: MLSQL_MLFLOW_UI); model versions link to their runs there.").tag(config=True)
    device_timeout_s = Float(2.0, help="Timeout of each live call to a device agent.").tag(config=True)

    @default("mlflow_ui")
    def _mlflow_ui_default(self):
        return os.environ.get("MLSQL_MLFLOW_UI") or None


def _utc(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(timezone.utc).isoformat(timespec="seconds")


def _number(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _short(p: str) -> str:
    return str(p).replace("ExecutionProvider", "").lower()


class BadRequest(Exception):
    """A request body the API refuses; ``field`` names what was wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class Deploy:
    id: str
    body: dict
    state: str = "running"
    steps: list = field(default_factory=list)
    result: dict | None = None
    error: str | None = None

    def step(self, message: str) -> None:
        self.steps.append({"t": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "message": message})

    def to_dict(self) -> dict:
        return {"id": self.id, "state": self.state, "steps": list(self.steps), "result": self.result,
                "error": self.error}


class API:
    """What the handlers ask; one per server."""

    def __init__(self, workspace: Workspace, settings: MLSQLServer, root_dir: str | None = None):
        self.workspace = workspace
        self.settings = settings
        self.root_dir = root_dir  # the server's: a run's notebook inside it opens by its contents path
        self.deploys: dict[str, Deploy] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlsql-deploy")

    # -- reading ------------------------------------------------------------------------------
    def info(self) -> dict:
        from mlsql import __version__

        return {"version": __version__, "workspace": str(self.workspace.root), "mlflow_ui": self.settings.mlflow_ui}

    def _device_store(self):
        from mlsql.deploy.devices import DeviceStore

        return DeviceStore(self.workspace.devices_path)

    def _live(self, devices: list, call) -> list:
        """``call(client)`` on every device at once, each an answer or the exception it raised."""
        from mlsql.deploy.remote import client_for

        def one(dev):
            c = client_for(dev, self.settings.device_timeout_s)
            try:
                return call(c)
            except Exception as exc:
                return exc
            finally:
                c.close()

        if not devices:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(devices))) as pool:
            return list(pool.map(one, devices))

    def models(self) -> dict:
        from mlsql.runtime.registry import Registry

        reg = Registry(self.workspace)
        devices = self._device_store().devices()
        infos = self._live(devices, lambda c: c.info())
        running: dict[tuple[str, int], list[str]] = {}
        for dev, info in zip(devices, infos):
            if isinstance(info, Exception):
                continue
            for name, m in (info.get("models") or {}).items():
                if m.get("active") is not None:
                    running.setdefault((name, int(m["active"])), []).append(dev.name)
        out = []
        for name in reg.names():
            versions = reg.versions(name)
            rows = []
            for v in versions:
                run = reg.client.get_run(v.run_id)
                rows.append({
                    "version": v.version, "created": _utc(v.created),
                    "metrics": {k: _number(x) for k, x in sorted(run.data.metrics.items())},
                    "metrics_on": _metrics_on(v),
                    "aliases": list(v.aliases), "run_id": v.run_id,
                    "mlflow_run_url": self.run_url(run.info.experiment_id, v.run_id),
                    "devices": sorted(running.get((name, v.version), [])),
                })
            out.append({"name": name, "model_type": versions[-1].model_type if versions else "", "versions": rows})
        return {"models": out}

    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        base = self.settings.mlflow_ui
        if not base:
            return None
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"

    def devices(self) -> dict:
        store = self._device_store()
        devices = store.devices()

        def read(c):
            return c.info(), c.metrics(columns=False)

        answers = self._live(devices, read)
        out = []
        for dev, ans in zip(devices, answers):
            row: dict[str, Any] = {"name": dev.name, "url": dev.url, "online": not isinstance(ans, Exception),
                                   "active_model": None, "active_version": None, "providers": [], "p95_ms": None,
                                   "error_rate": None, "rows_per_s": None,
                                   "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                   "models": [], "error": None}
            if isinstance(ans, Exception):
                row["error"] = getattr(ans, "message", None) or str(ans) or type(ans).__name__
                out.append(row)
                continue
            info, metrics = ans
            active = {n: m.get("active") for n, m in (info.get("models") or {}).items() if m.get("active") is not None}
            stats = {(m.get("model"), m.get("version")): m for m in metrics.get("models") or []}
            row["models"] = [{"model": n, "version": v} for n, v in sorted(active.items())]
            if active:
                # the model this device serves most (by requests), when it runs several
                name = max(active, key=lambda n: (stats.get((n, active[n])) or {}).get("requests") or 0)
                m = stats.get((name, active[name])) or {}
                row.update(active_model=name, active_version=active[name],
                           providers=[_short(p) for p in m.get("providers") or []],
                           p95_ms=_number((m.get("latency") or {}).get("p95_ms")),
                           error_rate=_number(m.get("error_rate")),
                           rows_per_s=_number(m.get("throughput_rows_per_s")))
            out.append(row)
        groups = [{"name": g.name, "devices": list(g.devices)} for g in store.groups()]
        return {"devices": out, "groups": groups}

    def jobs(self) -> dict:
        from mlsql.jobs import JobStore

        store = JobStore(self.workspace)
        out = []
        for spec in store.list():
            # a run in progress rather than the 'skipped' rows a faster schedule adds meanwhile
            runs = store.running(spec.name) or store.runs(spec.name, limit=1)
            last = runs[0] if runs else None
            try:
                nxt = store.next_run_time(spec)
            except Exception:
                nxt = None
            out.append({"name": spec.name, "schedule": spec.schedule_text, "next_run": _utc(nxt),
                        "paused": spec.paused, "last_status": last.status if last else None,
                        "last_run_at": _utc(last.start) if last else None,
                        "last_output_notebook": last.output_path if last else None,
                        "last_output_notebook_path": self._contents_path(last.output_path if last else None)})
        return {"jobs": out}

    def alerts(self) -> dict:
        from mlsql.jobs.alerts import AlertStore, mask_url
        from mlsql.jobs.options import format_duration

        store = AlertStore(self.workspace)
        out = []
        for a in store.list():
            m = store.summary(a.name)
            try:
                nxt = store.next_check_time(a)
            except Exception:
                nxt = None
            out.append({"name": a.name, "every": format_duration(a.options.get("every")),
                        "notify": [mask_url(u) for u in a.options.get("notify") or []], "next_check": _utc(nxt),
                        "last_checked": _utc(m["last_checked"]), "last_status": m["last_status"],
                        "last_fired": _utc(m["last_fired"]), "fired_count": m["fired_count"],
                        "last_error": m["last_error"]})
        return {"alerts": out}

    def _contents_path(self, path: str | None) -> str | None:
        """``path`` relative to the server's root (what JupyterLab opens), None when outside it."""
        if not path or not self.root_dir:
            return None
        from pathlib import Path

        try:
            return Path(path).resolve().relative_to(Path(self.root_dir).resolve()).as_posix()
        except ValueError:
            return None

    # -- deploying --------------------------------------------------------------------------------
    def check_deploy(self, body: Any) -> dict:
        """The POST body, checked; a BadRequest names the field that is wrong."""
        if not isinstance(body, dict):
            raise BadRequest("body", "must be a JSON object with model and device or group")
        for k in body:
            if k not in DEPLOY_FIELDS:
                raise BadRequest(k, f"unknown field (fields: {', '.join(DEPLOY_FIELDS)})")
        model = body.get("model")
        if not isinstance(model, str) or not _MODEL_NAME.match(model):
            raise BadRequest("model", f"must be a model name, got {model!r}")
        version = body.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise BadRequest("version", f"must be a positive whole number or null, got {version!r}")
        device, group = body.get("device"), body.get("group")
        if (device is None) == (group is None):
            raise BadRequest("device", "give exactly one of device and group")
        store = self._device_store()
        if device is not None:
            if not isinstance(device, str) or not _DEVICE_NAME.match(device):
                raise BadRequest("device", f"must be a device name, got {device!r}")
            known = [d.name for d in store.devices()]
            if device not in known:
                raise BadRequest("device", f"no device named {device!r} (devices: {', '.join(known) or 'none'})")
        if group is not None:
            if not isinstance(group, str) or not _DEVICE_NAME.match(group):
                raise BadRequest("group", f"must be a device group name, got {group!r}")
            known = [g.name for g in store.groups()]
            if group not in known:
                raise BadRequest("group", f"no device group named {group!r} (groups: {', '.join(known) or 'none'})")
        providers = body.get("providers")
        if providers is not None and (not isinstance(providers, list) or not providers
                                      or not all(isinstance(p, str) and _PROVIDER.match(p) for p in providers)):
            raise BadRequest("providers", f"must be a non-empty list of provider names or null, got {providers!r}")
        quantize = body.get("quantize")
        if quantize is not None and quantize not in QUANTIZE:
            raise BadRequest("quantize", f"must be one of {', '.join(QUANTIZE)} or null, got {quantize!r}")
        return {"model": model, "version": version, "device": device, "group": group, "providers": providers,
                "quantize": quantize}

    def start_deploy(self, body: dict) -> Deploy:
        with self._lock:
            dep = Deploy(id=f"d{next(self._ids)}-{int(time.time())}", body=body)
            self.deploys[dep.id] = dep
        dep.step(f"Queued: {deploy_sql(body)}")
        self._pool.submit(self._run_deploy, dep)
        return dep

    def _run_deploy(self, dep: Deploy) -> None:
        from mlsql.errors import MLSQLError
        from mlsql.runtime.session import Session

        body = dep.body
        s = None
        try:
            dep.step(f"Opening workspace {self.workspace.root}")
            s = Session(self.workspace.root)
            dep.step("Exporting, signing and installing (DEPLOY MODEL)")
            r = s.sql(deploy_sql(body))
            dep.result = self._deploy_result(r, body)
            dep.step(r.message or "Deployed")
            dep.state = "done"
        except MLSQLError as exc:
            dep.error, dep.state = str(exc), "failed"
            dep.step(f"Failed: {exc.message}")
        except Exception as exc:  # a deploy's failure is reported, never lost in a thread
            dep.error, dep.state = f"{type(exc).__name__}: {exc}", "failed"
            dep.step(f"Failed: {dep.error}")
        finally:
            if s is not None:
                s.close()

    def _deploy_result(self, r, body: dict) -> dict:
        rows = r.to_arrow().to_pylist()
        row = rows[0] if rows else {}
        placement = row.get("placement")
        if isinstance(placement, str):
            try:
                placement = json.loads(placement)
            except ValueError:
                placement = None
        version = row.get("version")
        return {"version": version, "device": body.get("device") and row.get("device", body["device"]),
                "group": body.get("group"),
                "placement": placement, "first_inference_ms": _number(row.get("first_inference_ms")),
                "parity": self._parity(body["model"], version, body.get("quantize")), "message": r.message}

    def _parity(self, model: str, version: int | None, quantize: str | None) -> dict | None:
        """The parity report the deploy's export wrote beside the ONNX file."""
        if version is None:
            return None
        exports = self.workspace.exports_dir
        names = [f"{model}_v{version}_{quantize}.parity.json"] if quantize and quantize != "none" else []
        names.append(f"{model}_v{version}.parity.json")
        found = [exports / n for n in names if (exports / n).exists()]
        if not found:
            return None
        rep = json.loads(found[0].read_text())
        # the export checks parity on a sample of the model's training query (mlsql.runtime.steps.export.sample_rows),
        # training rows included: its metric is not ML.EVALUATE's on the held-out rows, and says so
        return {"passed": bool(rep.get("passed", True)), "metric": rep.get("metric"),
                "native": _number(rep.get("metric_native")), "onnx": _number(rep.get("metric_onnx")),
                "quantized": _number(rep.get("metric_quantized")), "max_abs_diff": _number(rep.get("max_abs_diff")),
                "rows": rep.get("rows"), "rows_from": "training query"}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _metrics_on(version) -> dict | None:
    """Which rows a version's registered metrics were computed on: {"rows": n, "held_out": bool}
    (the held-out split, or the training rows when CREATE MODEL made no split); None when its
    files are not on this machine (they are not downloaded for this)."""
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    src = urlparse(version.source or "")
    if src.scheme not in ("", "file"):
        return None
    folder = Path(unquote(src.path))
    for meta in (folder / "model.json", folder / "model" / "model.json"):
        try:
            m = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        n_eval, n_train = int(m.get("n_eval") or 0), int(m.get("n_train") or 0)
        if n_eval:
            return {"rows": n_eval, "held_out": True}
        return {"rows": n_train, "held_out": False} if n_train else None
    return None


def deploy_sql(body: dict) -> str:
    """The DEPLOY MODEL statement a checked body stands for."""
    ref = body["model"] + (f"@{body['version']}" if body.get("version") else "")
    target = f"DEVICE '{body['device']}'" if body.get("device") else f"GROUP '{body['group']}'"
    opts = []
    if body.get("providers"):
        opts.append("providers = [" + ", ".join(f"'{p}'" for p in body["providers"]) + "]")
    if body.get("quantize"):
        opts.append(f"quantize = '{body['quantize']}'")
    return f"DEPLOY MODEL {ref} TO {target}" + (f" OPTIONS ({', '.join(opts)})" if opts else "")


# -- handlers -------------------------------------------------------------------------------------
class _Handler(APIHandler):
    @property
    def api(self) -> API:
        return self.settings["mlsql_api"]

    async def _answer(self, fn, *args, status: int = 200) -> None:
        data = await tornado.ioloop.IOLoop.current().run_in_executor(None, fn, *args)
        self.set_status(status)
        self.finish(json.dumps(data, default=str))


class InfoHandler(_Handler):
    @tornado.web.authenticated
    async def get(self):
        await self._answer(self.api.info)


class ModelsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self):
        await self._answer(self.api.models)


class DevicesHandler(_Handler):
    @tornado.web.authenticated
    async def get(self):
        await self._answer(self.api.devices)


class JobsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self):
        await self._answer(self.api.jobs)


class AlertsHandler(_Handler):
    @tornado.web.authenticated
    async def get(self):
        await self._answer(self.api.alerts)


class DeploysHandler(_Handler):
    @tornado.web.authenticated
    async def post(self):
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError as exc:
            raise tornado.web.HTTPError(400, f"body: not JSON ({exc})") from None
        try:
            checked = await tornado.ioloop.IOLoop.current().run_in_executor(None, self.api.check_deploy, body)
        except BadRequest as exc:
            raise tornado.web.HTTPError(400, str(exc)) from None
        dep = self.api.start_deploy(checked)
        self.set_status(202)
        self.set_header("Location", url_path_join(self.base_url, "mlsql/api/deploys", dep.id))
        self.finish(json.dumps({"id": dep.id}))


class DeployHandler(_Handler):
    @tornado.web.authenticated
    def get(self, deploy_id: str):
        dep = self.api.deploys.get(deploy_id)
        if dep is None:
            raise tornado.web.HTTPError(404, f"No deploy {deploy_id!r}")
        self.finish(json.dumps(dep.to_dict(), default=str))


def add_handlers(serverapp, workspace: Workspace) -> API:
    """Mount the API under ``<base_url>mlsql/api/``."""
    settings = MLSQLServer(parent=serverapp)
    api = API(workspace, settings, getattr(serverapp, "root_dir", None))
    web_app = serverapp.web_app
    web_app.settings["mlsql_api"] = api
    base = url_path_join(web_app.settings.get("base_url", "/"), "mlsql/api")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "info"), InfoHandler),
        (url_path_join(base, "models"), ModelsHandler),
        (url_path_join(base, "devices"), DevicesHandler),
        (url_path_join(base, "jobs"), JobsHandler),
        (url_path_join(base, "alerts"), AlertsHandler),
        (url_path_join(base, "deploys"), DeploysHandler),
        (url_path_join(base, r"deploys/([\w-]+)"), DeployHandler),
    ])
    return api

"""The notebook side of the device bridge: devices, deploys, remote prediction, telemetry.

Statements: CREATE/DROP DEVICE, SHOW DEVICES, CREATE/DROP DEVICE GROUP,
DEPLOY MODEL ... TO DEVICE | GROUP, ROLLBACK MODEL ... ON DEVICE,
ML.PREDICT(..., STRUCT('d' AS device)) and ML.DEVICE_METRICS('d'). The HTTP
work is device_bridge.client's; this module turns it into tables and errors.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.deploy.devices import Device
from mlsql.errors import DeviceError, MLSQLError, OptionError
from mlsql.language.options import options_of, validate

DEPLOY_OPTIONS = tuple(o.name for o in options_of("DEPLOY MODEL"))  # declared in mlsql.language.options
PREDICT_BATCH = 50_000


def client_for(dev: Device, timeout: float | None = None):
    from device_bridge.client import DeviceClient

    return DeviceClient(dev.url, dev.token or None, timeout=timeout or dev.timeout_s, verify=dev.verify_tls)


_HUB_AUTH_HINT = ("The group's hub_token is the hub's operator token (its --token): CREATE OR REPLACE DEVICE GROUP "
                  "'...' OPTIONS (hub = ..., hub_token = ...). An agent's own hub credential opens only that "
                  "agent's paths.")


def ask(dev: Device, call, what: str):
    """``call(client)`` against the device, its failure as a DeviceError saying ``what`` failed."""
    c = client_for(dev)
    try:
        return call(c)
    except Exception as exc:
        raise wrap(exc, what) from None
    finally:
        c.close()


def wrap(exc: Exception, what: str, auth_hint: str | None = None) -> MLSQLError:
    """A device_bridge error as an MLSQL DeviceError naming the device and the step.

    Recognised by type (device_bridge.errors, chosen from the answer's ``kind``), never by its
    text; the result carries ``kind`` and ``status`` too."""
    from device_bridge import errors as dberr

    msg = getattr(exc, "message", None) or str(exc)
    status = getattr(exc, "status", None)
    kind = getattr(exc, "kind", None)
    hint = None
    if isinstance(exc, dberr.UntrustedKeyError):
        hint = "Start the agent with --trust <workspace>/keys/signing_key.pub (mlsql device key prints the path)."
    elif isinstance(exc, dberr.DeviceAuthError):
        hint = auth_hint or "Check the device's token: CREATE OR REPLACE DEVICE '...' OPTIONS (url = ..., token = ...)."
    elif isinstance(exc, dberr.VersionRefusedError):
        hint = "A device never installs an older version over a newer one; use ROLLBACK MODEL ... ON DEVICE."
    # the typed original travels on the error (raise ... from None drops __cause__)
    return DeviceError(f"{what}: {msg}" + (f" (HTTP {status})" if status else ""), hint=hint, kind=kind,
                       status=status, device_error=exc)


def probe(dev: Device, timeout: float = 3.0) -> dict:
    try:
        c = client_for(dev, timeout)
        try:
            return {"ok": True, "info": c.info()}
        finally:
            c.close()
    except Exception as exc:  # unreachable, refused, bad token: all shown as status
        return {"ok": False, "error": getattr(exc, "message", None) or str(exc)}


def devices_table(devices: list[Device]) -> pa.Table:
    """SHOW DEVICES: each device probed live, in parallel."""
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(devices)))) as pool:
        probes = list(pool.map(probe, devices))
    rows = []
    for d, p in zip(devices, probes):
        info = p.get("info") or {}
        models = info.get("models") or {}
        rows.append({
            "device": d.name, "url": d.url, "status": "online" if p["ok"] else "unreachable",
            "platform": info.get("platform"), "onnxruntime": info.get("onnxruntime"),
            "available_providers": [_short(x) for x in info.get("available_providers") or []],
            "models": [f"{n}@{m.get('active')}" for n, m in sorted(models.items())],
            "error": None if p["ok"] else p["error"],
        })
    schema = pa.schema([("device", pa.string()), ("url", pa.string()), ("status", pa.string()),
                        ("platform", pa.string()), ("onnxruntime", pa.string()),
                        ("available_providers", pa.list_(pa.string())), ("models", pa.list_(pa.string())),
                        ("error", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


DEPLOYMENTS_SCHEMA = pa.schema([
    ("device", pa.string()), ("model", pa.string()), ("version", pa.int64()), ("providers", pa.list_(pa.string())),
    ("priority", pa.string()), ("isolation", pa.string()), ("max_concurrency", pa.int64()),
    ("max_queue", pa.int64()), ("timeout_ms", pa.int64()), ("memory_mb", pa.int64()),
    ("queue_length", pa.int64()), ("rejected", pa.int64()), ("deadline_misses", pa.int64()),
    ("worker_restarts", pa.int64()), ("memory_used_mb", pa.float64()), ("error", pa.string()),
    # agents of a group behind a hub: the group, and the last stopped rollout of the model with its reason
    ("group", pa.string()), ("rollout_stopped", pa.string()),
])


def deployments_table(devices: list[Device], groups: list | None = None) -> pa.Table:
    """SHOW DEPLOYMENTS: each device's active models, with the settings by which they share it
    (``/v1/info``'s ``deploy``) and how that goes (``/v1/metrics``: queue, rejections, deadline
    misses, worker restarts, memory), asked live and in parallel; an unreachable device is one row
    saying why."""

    def ask_both(dev: Device) -> tuple[dict | None, dict | None, str | None]:
        c = client_for(dev, timeout=5.0)
        try:
            return c.info(), c.metrics(columns=False), None
        except Exception as exc:
            return None, None, str(wrap(exc, f"device '{dev.name}'")).splitlines()[0]
        finally:
            c.close()

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(devices)))) as pool:
        answers = list(pool.map(ask_both, devices))
    rows = []
    for dev, (info, metrics, error) in zip(devices, answers):
        if error is not None:
            rows.append({"device": dev.name, "error": error})
            continue
        live = {(m.get("model"), m.get("version")): m for m in (metrics or {}).get("models", [])}
        for name, m in sorted((info.get("models") or {}).items()):
            if m.get("active") is None:
                continue
            settings = m.get("deploy") or {}
            now = live.get((name, m.get("active"))) or {}
            rows.append({"device": dev.name, "model": name, "version": m.get("active"),
                         "providers": [_short(p) for p in m.get("providers") or []],
                         **{k: settings.get(k) for k in ("priority", "isolation", "max_concurrency", "max_queue",
                                                         "timeout_ms", "memory_mb")},
                         **{k: now.get(k) for k in ("queue_length", "rejected", "deadline_misses", "worker_restarts")},
                         "memory_used_mb": now.get("memory_mb")})
    for g in groups or []:
        if g.hub:
            rows += _hub_deployments(g)
    return pa.Table.from_pylist(rows, schema=DEPLOYMENTS_SCHEMA)


def _hub_deployments(group) -> list[dict]:
    """A hub group's agents' active models (their last report), each with the last ``rollout_stopped``
    event of its model at the hub (the stopped wave's version, devices and reason); an unreachable
    hub is one row with ``error``."""
    from device_bridge.client import HubClient

    hub = HubClient(group.hub, group.hub_token or "", timeout=5.0)
    try:
        status, events = hub.status(), hub.events()
    except Exception as exc:
        return [{"group": group.name, "error": str(wrap(exc, f"hub {group.hub}")).splitlines()[0]}]
    finally:
        hub.close()
    stops = {}
    for ev in events:  # newest last: the last one per model wins
        if ev.get("event") == "rollout_stopped":
            stops[ev.get("model")] = (f"version {ev.get('version')} stopped at wave {ev.get('wave')} on "
                                      f"{', '.join(ev.get('devices') or [])}: {'; '.join(ev.get('failures') or [])}")
    names = set(group.devices) or {n for n, a in status.items() if a.get("group") == group.name}
    rows = []
    for name in sorted(names):
        for model, st in sorted(((status.get(name) or {}).get("status") or {}).items()):
            if isinstance(st, dict) and st.get("active") is not None:
                rows.append({"device": name, "model": model, "version": st.get("active"), "group": group.name,
                             "rollout_stopped": stops.get(model)})
    return rows


def _short(p: str) -> str:
    return p.replace("ExecutionProvider", "").lower()


SAMPLE_FIELDS = ("sample_rate", "sample_max_mb", "sample_exclude", "sample_hash", "sample_salt")


def deploy_settings(opts: dict) -> dict | None:
    """DEPLOY's options about sharing the device and sampling its data, as the agent takes them
    with an install (the agent's defaults for those not given); None when none were given."""
    from device_bridge.agent.deploy import FIELDS

    given = {k: opts[k] for k in dict.fromkeys((*FIELDS, *SAMPLE_FIELDS)) if opts.get(k) is not None}
    if "trigger" in given:  # its SQL condition, compiled to the expression tree the agent evaluates
        from mlsql.deploy.triggers import compile_trigger

        given["trigger"] = compile_trigger(given["trigger"])
    return given or None


def with_sampling(opts: dict, inputs: list[str], salt) -> dict:
    """DEPLOY's sampling options checked against the model's input columns (an excluded or hashed
    column the model does not read is a mistake worth naming: the column would be sent as is if
    it were misspelled), with the workspace's salt added when a column is hashed. ``salt`` is
    called only then."""
    by_lower = {c.lower(): c for c in inputs}
    out = dict(opts)
    for key in ("sample_exclude", "sample_hash"):
        names = opts.get(key) or []
        unknown = [n for n in names if n.lower() not in by_lower]
        if unknown:
            from mlsql.errors import did_you_mean

            near = did_you_mean(unknown[0], inputs)
            raise MLSQLError(f"Option {key} names {', '.join(map(repr, unknown))}, which the model does not read",
                             hint=(f"Did you mean '{near}'? " if near else "")
                             + "The model's input columns: " + ", ".join(inputs) + ".")
        if names:
            out[key] = [by_lower[n.lower()] for n in names]
    both = {n.lower() for n in opts.get("sample_exclude") or []} & {n.lower() for n in opts.get("sample_hash") or []}
    if both:
        raise MLSQLError(f"Column {sorted(both)[0]!r} is both excluded and hashed in the sampling options",
                         hint="An excluded column is never stored; a hashed one is stored as a keyed hash. Pick one.")
    if opts.get("sample_hash"):
        out["sample_salt"] = salt()
    if not opts.get("sample_rate") and any(opts.get(k) for k in ("sample_max_mb", "sample_exclude", "sample_hash")):
        raise MLSQLError("Sampling options are set but sample_rate is 0: the device keeps no data",
                         hint="Add sample_rate = 0.05 (a share of requests) to keep a sample.")
    return out


def resolve_deploy_options(raw: dict) -> dict:
    """DEPLOY MODEL's options, checked by ``mlsql.language.options``' table (all of them, the group rollout's
    gates included), every default filled in."""
    return validate("DEPLOY MODEL", raw, defaults=True)


# metrics where smaller is better; every other metric (roc_auc, accuracy, r2_score, f1_score...) grows
LOWER_IS_BETTER = {"mean_absolute_error", "mean_squared_error", "mean_squared_log_error", "median_absolute_error",
                   "log_loss", "rmse", "root_mean_squared_error"}


def active_version(dev: Device, model: str) -> int | None:
    """The version of ``model`` active on the device now (None: the device has none)."""
    info = ask(dev, lambda c: c.info(), f"Cannot ask device '{dev.name}' which version of {model} it runs")
    active = ((info.get("models") or {}).get(model) or {}).get("active")
    return int(active) if active is not None else None


def not_better_reason(registry, candidate, active: int | None, metric: str) -> str | None:
    """Why ``candidate`` (a ModelVersion) should not replace the active version by ``metric``,
    or None when it should (no version active, or a better value)."""
    metric = metric.lower()
    mine = registry.run_metrics(candidate)
    if metric not in mine:
        from mlsql.errors import UnknownOptionError

        raise UnknownOptionError(metric, list(mine), message=(
            f"only_if_better = '{metric}': model {candidate.ref} has no metric '{metric}'"))
    if active is None or active == candidate.version:
        return None
    current = registry.get(candidate.name, active)
    new, old = float(mine[metric]), registry.run_metrics(current).get(metric)
    if old is None:
        return None
    better = new < old if metric in LOWER_IS_BETTER else new > old
    if better:
        return None
    return (f"{candidate.ref} has {metric} {new:.4f}, not better than {current.ref} (active) with {old:.4f}")


def placement_text(node_providers: dict | None, providers: list | None) -> str:
    if node_providers:
        return ", ".join(f"{_short(k)} ({v} nodes)" for k, v in sorted(node_providers.items(), key=lambda kv: -kv[1]))
    return ", ".join(_short(p) for p in providers or []) or "unknown"


def columns_for(table: pa.Table, inputs: list[dict]) -> dict[str, np.ndarray]:
    """Raw columns as the device's model takes them: numbers with NaN for NULL, strings with ''."""
    by_lower = {c.lower(): c for c in table.column_names}
    out = {}
    for spec in inputs:
        real = by_lower.get(spec["name"].lower())
        if real is None:
            from mlsql.errors import UnknownColumnError

            raise UnknownColumnError(spec["name"], table.column_names,
                                     message=f"Input has no column '{spec['name']}', which the deployed model takes")
        col = table.column(real)
        t = spec["type"]
        if len(spec.get("shape") or [None]) > 1:  # an imported graph's tensor input (an array per row)
            from mlsql.export.imported import tensor_feed

            out[spec["name"]] = tensor_feed(col, spec)
        elif t == "string":
            out[spec["name"]] = np.asarray(pc.fill_null(col.cast(pa.string()), "").to_numpy(zero_copy_only=False),
                                           dtype=object)
        elif t == "bool":
            out[spec["name"]] = pc.fill_null(col.cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
        else:  # numbers; dates and timestamps as the numbers the model was trained on
            from mlsql.ml.features import numeric_values

            out[spec["name"]] = numeric_values(col).astype(np.dtype(t))
    return out


def remote_profile(dev: Device, model_name: str, version: int | None, batch_sizes: list[int], runs: int,
                   provider: str) -> list[dict]:
    """ML.PROFILE on a device: the agent profiles the version it has installed (one profile at a time)."""
    c = client_for(dev, timeout=600.0)
    try:
        return c.profile(model_name, batch_sizes, runs, provider, version)["rows"]
    except Exception as exc:
        raise wrap(exc, f"Profiling {model_name} on device '{dev.name}' failed") from None
    finally:
        c.close()


def remote_outputs(dev: Device, model_name: str, version: int | None, data: pa.Table,
                   names: list[str]) -> dict[str, np.ndarray]:
    """The graph's outputs ``names`` for ``data``'s rows, run on the device in batches."""
    c = client_for(dev)
    got: dict[str, list] = {name: [] for name in names}
    try:
        try:
            info = c.model(model_name)
        except Exception as exc:
            raise wrap(exc, f"Device '{dev.name}' cannot serve model {model_name}") from None
        if info.get("feature_views"):  # its inputs are filled in from the device's own events, not sent
            raise DeviceError(
                f"ML.PREDICT on device '{dev.name}' cannot run {model_name}: features of view "
                f"{', '.join(info['feature_views'])} are among its inputs, and the device fills them in from the "
                "events it was sent, as of each request's time, not from the query's rows",
                hint="Compare offline with ML.PREDICT(MODEL m, (SELECT * FROM ML.FEATURES_AT(view, probes))) and ask "
                "the device as the app does: POST /v1/models/NAME/predict with the key column and \"at\" "
                "(docs/DEVICE.md, Feature views on the device).",
            )
        inputs = info.get("inputs") or []
        for a in range(0, max(data.num_rows, 1), PREDICT_BATCH):
            part = data.slice(a, PREDICT_BATCH)
            if part.num_rows == 0:
                break
            try:
                r = c.predict_batch(model_name, columns_for(part, inputs), version=version)
            except Exception as exc:
                raise wrap(exc, f"Prediction on device '{dev.name}' failed") from None
            for name in names:
                got[name].append(np.asarray(r["outputs"][name]))
    finally:
        c.close()
    return {name: np.concatenate(parts) if parts else np.zeros(0) for name, parts in got.items()}


def remote_predict(dev: Device, model_name: str, version: int | None, data: pa.Table, label: str,
                   classes: list | None, label_type: str) -> pa.Table:
    """ML.PREDICT on a device: batches of raw columns out, prediction columns back (BigQuery ML's names)."""
    pred_name = f"predicted_{label}"
    outs = remote_outputs(dev, model_name, version, data,
                          [pred_name] + ([f"{pred_name}_probs"] if classes is not None else []))
    n = data.num_rows
    values = outs[pred_name]
    probs = [outs[f"{pred_name}_probs"].astype(np.float64)] if classes is not None and n else []
    if classes is None:
        return pa.table({pred_name: pa.array(values.astype(np.float64), pa.float64())})
    from mlsql.ml.model import _type_from_str

    ltype = _type_from_str(label_type)
    k = len(classes)
    p = (np.concatenate(probs) if probs else np.zeros((0, k))).reshape(n, k)
    if values.dtype.kind in "US":
        values = values.astype(object)
    labels = pa.array(classes, ltype).take(pa.array(np.tile(np.arange(k), n)))
    structs = pa.StructArray.from_arrays([labels, pa.array(p.ravel(), pa.float64())], names=["label", "prob"])
    return pa.table({pred_name: pa.array(values.tolist(), ltype),
                     f"{pred_name}_probs": pa.ListArray.from_arrays(
                         pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), structs)})


METRICS_SCHEMA = pa.schema([
    ("device", pa.string()), ("model", pa.string()), ("version", pa.int64()), ("active", pa.bool_()),
    ("suspended", pa.bool_()), ("requests", pa.int64()), ("rows", pa.int64()), ("error_count", pa.int64()),
    ("error_rate", pa.float64()), ("errors", pa.string()), ("p50_ms", pa.float64()), ("p95_ms", pa.float64()),
    ("p99_ms", pa.float64()), ("throughput_rows_per_s", pa.float64()), ("providers", pa.list_(pa.string())),
    ("node_providers", pa.string()), ("inputs", pa.string()), ("profiled_rows", pa.int64()),
    # how the version shares the device (docs/DEVICE.md, Sharing one device)
    ("priority", pa.string()), ("isolation", pa.string()), ("queue_length", pa.int64()),
    ("wait_p95_ms", pa.float64()), ("rejected", pa.int64()), ("deadline_misses", pa.int64()),
    ("worker_restarts", pa.int64()), ("memory_mb", pa.float64()),
    # online metrics: sampled predictions against the outcomes that came back (docs/DEVICE.md, Device data)
    ("sampled_rows", pa.int64()), ("outcomes", pa.int64()), ("online_rows", pa.int64()),
    ("online_accuracy", pa.float64()), ("online_log_loss", pa.float64()), ("online_roc_auc", pa.float64()),
    ("online_r2", pa.float64()), ("online_mean_absolute_error", pa.float64()),
])


def metrics_table(dev: Device, online=None) -> pa.Table:
    """ML.DEVICE_METRICS' rows; ``online(info)`` gives the online metrics per (model, version)."""
    snap = ask(dev, lambda c: c.metrics(), f"Cannot read metrics from device '{dev.name}'")
    info: dict = {}
    scores: dict = {}
    if online is not None:
        info = ask(dev, lambda c: c.info(), f"Cannot read device '{dev.name}'")
        if any((m.get("samples") or {}).get("rows") for m in (info.get("models") or {}).values()):
            scores = online(info)
    rows = []
    for m in snap.get("models", []):
        lat = m.get("latency") or {}
        rows.append({
            "device": dev.name, "model": m.get("model"), "version": m.get("version"),
            "active": m.get("active"), "suspended": m.get("suspended"), "requests": m.get("requests"),
            "rows": m.get("rows"), "error_count": m.get("error_count"), "error_rate": m.get("error_rate"),
            "errors": json.dumps(m.get("errors") or {}), "p50_ms": lat.get("p50_ms"), "p95_ms": lat.get("p95_ms"),
            "p99_ms": lat.get("p99_ms"), "throughput_rows_per_s": m.get("throughput_rows_per_s"),
            "providers": [_short(p) for p in m.get("providers") or []],
            "node_providers": json.dumps(m.get("node_providers") or {}),
            "inputs": json.dumps(m.get("columns") or {}), "profiled_rows": m.get("profiled_rows"),
            **{k: m.get(k) for k in ("priority", "isolation", "queue_length", "rejected", "deadline_misses",
                                     "worker_restarts", "memory_mb")},
            "wait_p95_ms": (m.get("wait_ms") or {}).get("p95_ms"),
            **_sampling_counts(info, m),
            **scores.get((m.get("model"), m.get("version")), {}),
        })
    return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)


def _sampling_counts(info: dict, m: dict) -> dict:
    """The active version's sample and outcome counts (the agent counts per model)."""
    sm = ((info.get("models") or {}).get(m.get("model")) or {}).get("samples") or {}
    if not m.get("active") or not sm:
        return {}
    return {"sampled_rows": sm.get("rows"), "outcomes": sm.get("outcomes")}


FIRST_INFERENCE_ID = "mlsql-deploy-check"  # the request id of DEPLOY's own first prediction


def first_inference(dev: Device, model_name: str, sample: pa.Table, inputs: list[dict],
                    feature_views: list[dict] | None = None) -> tuple[float, float]:
    """Round-trip and on-device milliseconds of one single-row prediction right after a deploy. A
    model trained on ``ML.FEATURES_AT`` is asked as an app asks it: the inputs its ``feature_views``
    fill in are not sent, each view's key column is (the sample's key, or an empty key: the device
    then fills in the features of a key with no events)."""
    c = client_for(dev)
    try:
        row = sample.slice(0, 1)
        if feature_views:
            filled = {f["name"].lower() for v in feature_views for f in v["features"]}
            inputs = [i for i in inputs if i["name"].lower() not in filled]
            have = {n.lower() for n in row.column_names}
            for v in feature_views:
                key_type = next(x["type"] for x in v["schema"] if x["name"] == v["key"])
                if v["key"].lower() not in have:
                    row = row.append_column(v["key"], pa.array([0 if key_type == "int64" else ""]))
                    have.add(v["key"].lower())
                if all(i["name"].lower() != v["key"].lower() for i in inputs):
                    inputs = [*inputs, {"name": v["key"], "type": "int64" if key_type == "int64" else "string"}]
        cols = columns_for(row, inputs)
        body = {k: [None if isinstance(x, float) and np.isnan(x) else x for x in arr.tolist()]
                for k, arr in cols.items()}
        t0 = time.perf_counter()
        # named, so that a sampled deploy's own check is told apart from the app's traffic
        r = c.predict(model_name, columns=body, request_ids=[FIRST_INFERENCE_ID])
        return (time.perf_counter() - t0) * 1000.0, float(r.get("latency_ms") or 0.0)
    finally:
        c.close()


def deploy_group(group, lm, result, opts: dict, quality_gate=None):
    """DEPLOY MODEL ... TO GROUP: a staged rollout through the group's hub, gated wave by wave."""
    from device_bridge.client import HubClient
    from device_bridge.rollout import rollout
    from mlsql.output.result import Result

    if not group.hub:
        raise OptionError(f"Device group '{group.name}' has no hub",
                          hint=f"CREATE OR REPLACE DEVICE GROUP '{group.name}' OPTIONS (hub = 'http://host:port', "
                               "hub_token = '...', devices = [...]); start one with `mlsql hub serve`.")
    hub = HubClient(group.hub, group.hub_token or "", timeout=30.0)
    try:
        devices = hub_names(group, hub)
        log: list[str] = []
        try:
            report = rollout(
                hub, lm.version.name, result.package_path.read_bytes(), devices,
                rollout_percent=opts.get("rollout_percent"), batch_size=opts.get("batch_size"),
                max_error_rate=opts.get("max_error_rate"), max_p95_ms=opts.get("max_p95_ms"),
                required_provider=opts.get("required_provider"), max_drift=opts.get("max_drift"),
                min_requests=int(opts.get("min_requests") or 0), observe_s=float(opts.get("observe_s") or 0.0),
                activation_timeout=float(opts.get("wave_timeout_s") or 60.0),
                providers=opts.get("providers") or ["cpu"], strict_providers=opts["strict_providers"], log=log.append,
                deploy=deploy_settings(opts), quality_gate=quality_gate,
            )
        except MLSQLError:
            raise
        except Exception as exc:
            raise wrap(exc, f"Rollout of {lm.version.ref} to group '{group.name}' failed", _HUB_AUTH_HINT) from None
    finally:
        hub.close()
    rows = [{"wave": w.index, "devices": len(w.devices), "device_names": w.devices, "status": w.status,
             "failures": "; ".join(w.failures) or None, "metrics": json.dumps(w.metrics, default=str),
             "seconds": w.seconds} for w in report.waves]
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("wave", pa.int64()), ("devices", pa.int64()), ("device_names", pa.list_(pa.string())),
        ("status", pa.string()), ("failures", pa.string()), ("metrics", pa.string()), ("seconds", pa.float64())]))
    if report.ok:
        msg = (f"Rolled {lm.version.ref} out to group {group.name}: {len(devices)} devices in "
               f"{len(report.waves)} waves, every gate passed")
    else:
        bad = report.waves[-1]
        msg = (f"Rollout of {lm.version.ref} to group {group.name} stopped at wave {bad.index}: "
               f"{'; '.join(bad.failures)}; the wave was {bad.status.replace('_', ' ')}")
    out = Result(table, kind="rollout", message=msg)
    out.rollout = report
    return out


def hub_names(group, hub) -> list[str]:
    """The agents of a hub group: those it lists, else every agent registered at the hub under its name."""
    names = list(group.devices)
    if not names:
        try:
            names = sorted(a["name"] for a in hub.agents() if a.get("group") == group.name)
        except Exception as exc:
            raise wrap(exc, f"Cannot list the agents of hub {group.hub}", _HUB_AUTH_HINT) from None
    if not names:
        raise DeviceError(f"Device group '{group.name}' has no devices (none listed, none registered at {group.hub})")
    return names

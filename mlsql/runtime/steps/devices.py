"""Device statements: ``CREATE/DROP DEVICE [GROUP]``, ``SHOW DEVICES``, ``DEPLOY MODEL`` and
``ROLLBACK MODEL``. The bridge calls themselves (clients, probes, tables, rollouts) are in
:mod:`mlsql.deploy.remote`; this module turns a plan's :class:`~mlsql.plan.planner.DeviceStep` into them."""

from __future__ import annotations

import json

from mlsql._lazy import LazyModule
from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.steps import SessionState
from mlsql.runtime.steps.export import calibration_sql, export, sample_rows
from mlsql.runtime.steps.ml_functions import load_model

D = LazyModule("mlsql.deploy.remote")  # numpy and the bridge client load with the first device statement


def device_step(s: SessionState, step: P.DeviceStep) -> Result:
    """Run one device statement."""
    handler = _ACTIONS.get(step.action)
    if handler is None:
        raise AssertionError(step.action)
    return handler(s, step)


def _create_device(s: SessionState, step: P.DeviceStep) -> Result:
    dev = s.devices.add(step.name, step.options, replace=step.replace, if_not_exists=step.exists)
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


def _show_devices(s: SessionState, step: P.DeviceStep) -> Result:
    return Result(D.devices_table(s.devices.devices()), kind="show")


def _show_deployments(s: SessionState, step: P.DeviceStep) -> Result:
    return Result(D.deployments_table(s.devices.devices(), s.devices.groups()), kind="show")


def _drop_device(s: SessionState, step: P.DeviceStep) -> Result:
    dropped = s.devices.drop(step.name, if_exists=step.exists)
    return Result(pa.table({}), message=f"Dropped device {step.name}." if dropped
                  else f"Device {step.name} does not exist; nothing dropped.")


def _create_group(s: SessionState, step: P.DeviceStep) -> Result:
    g = s.devices.add_group(step.name, step.options, replace=step.replace, if_not_exists=step.exists)
    if g is None:
        return Result(pa.table({}), message=f"Device group {step.name} already exists; nothing changed.")
    return Result(pa.table({"group": [g.name], "devices": [g.devices], "hub": [g.hub or None]}),
                  message=f"Created device group {g.name} with {len(g.devices)} devices"
                          + (f" behind hub {g.hub}" if g.hub else ""))


def _drop_group(s: SessionState, step: P.DeviceStep) -> Result:
    dropped = s.devices.drop_group(step.name, if_exists=step.exists)
    return Result(pa.table({}), message=f"Dropped device group {step.name}." if dropped
                  else f"Device group {step.name} does not exist; nothing dropped.")


def _deploy(s: SessionState, step: P.DeviceStep) -> Result:
    said = ""
    if step.options.get("trial_id") is not None:  # a trial of a tuned model: a version of its own first
        from dataclasses import replace

        from mlsql.runtime.steps.training import register_trial

        spec, said = register_trial(s, step.model, int(step.options["trial_id"]))
        step = replace(step, model=spec)
    r = deploy_group(s, step) if step.target_kind == "GROUP" else deploy_device(s, step)
    if said:
        r.message = said + (r.message or "")
    return r


def _rollback(s: SessionState, step: P.DeviceStep) -> Result:
    if step.target_kind == "GROUP":
        raise MLSQLError("ROLLBACK MODEL ... ON GROUP is not available; a failed rollout rolls its waves back")
    dev = s.devices.get(step.name)
    r = D.ask(dev, lambda c: c.rollback(step.model.name),
              f"Rollback of {step.model.name} on device '{dev.name}' failed")
    return Result(pa.table({"device": [dev.name], "model": [step.model.name], "active": [r.get("active")],
                            "previous": [r.get("previous")]}),
                  message=f"Rolled {step.model.name} back on {dev.name}: version {r.get('active')} is active.")


_ACTIONS = {"create_device": _create_device, "show_devices": _show_devices, "show_deployments": _show_deployments, "drop_device": _drop_device,
            "create_group": _create_group, "drop_group": _drop_group, "deploy": _deploy, "rollback": _rollback}


def deployable(s: SessionState, step: P.DeviceStep, opts: dict):
    """Export (with the deploy's quantization) and sign a package for the model version.

    The deploy's providers travel with the install, not in the package: the same version and
    export options give the same bytes, so deploying again (with other providers or not)
    re-activates what the device has instead of conflicting with it."""
    drop = opts["max_metric_drop"]
    export_opts = {"quantize": opts["quantize"], "tree_format": opts["tree_format"], "package": True,
                   # a STRUCT is the rollout's quality gate (mlsql/deploy/quality.py), not the export's bound
                   "max_metric_drop": drop if not isinstance(drop, dict) else None}
    if opts.get("calibration_query"):
        export_opts["calibration_query"] = opts["calibration_query"]
    if opts.get("calibrate"):
        export_opts["calibrate"] = opts["calibrate"]
    if opts.get("format"):
        export_opts["format"] = opts["format"]
    from mlsql.export import resolve_export_options

    # DEPLOY's options mapped onto EXPORT MODEL's: checked by EXPORT's table, its defaults filled in
    result = export(s, step.model, resolve_export_options(export_opts), quiet=True)
    return load_model(s, step.model), result


def deploy_device(s: SessionState, step: P.DeviceStep) -> Result:
    """DEPLOY MODEL ... TO DEVICE: install the signed package, then one prediction on the device."""
    opts = step.options  # DEPLOY's options, checked by the planner (defaults filled in)
    if isinstance(opts.get("max_metric_drop"), dict):
        from mlsql.errors import OptionError

        raise OptionError("max_metric_drop = STRUCT(...) gates the waves of DEPLOY ... TO GROUP",
                          hint="DEPLOY ... TO DEVICE takes a number: the quantized form's largest metric drop.")
    if opts.get("notify"):
        from mlsql.errors import OptionError

        raise OptionError("notify announces a stopped rollout of DEPLOY ... TO GROUP",
                          hint="A DEPLOY ... TO DEVICE fails in its cell (or job run) instead.")
    dev = s.devices.get(step.name)
    if opts.get("only_if_better"):
        candidate = load_model(s, step.model).version
        active = D.active_version(dev, candidate.name)
        reason = D.not_better_reason(s.registry, candidate, active, opts["only_if_better"])
        if reason:
            return Result(pa.table({"device": [dev.name], "model": [candidate.name],
                                    "version": [candidate.version], "active": [active], "deployed": [False]}),
                          kind="deploy", message=f"Not deployed to {dev.name}: {reason}.")
    lm, result = deployable(s, step, opts)
    opts = _sampling(s, lm, opts)
    data = result.package_path.read_bytes()
    c = D.client_for(dev)
    try:
        r = c.install(data, providers=opts["providers"] or ["cpu"], strict_providers=opts["strict_providers"],
                      model=lm.version.name, deploy=D.deploy_settings(opts))
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
        if lm.meta.get("query_sql") or not calibration_sql(opts):
            sample = sample_rows(s, lm, 1)
        else:  # an import without example rows: a row of its calibration query
            sample = s.engine.query(f"SELECT * FROM ({calibration_sql(opts)}) AS t LIMIT 1")
        rtt, on_device = D.first_inference(dev, lm.version.name, sample, result.inputs,
                                            lm.meta.get("feature_views"))
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


def deploy_group(s: SessionState, step: P.DeviceStep) -> Result:
    """DEPLOY MODEL ... TO GROUP: a staged rollout through the group's hub."""
    opts = step.options  # DEPLOY's options, checked by the planner (defaults filled in)
    if opts.get("only_if_better"):
        raise MLSQLError("only_if_better applies to DEPLOY ... TO DEVICE",
                         hint="A group's rollout is gated by max_error_rate, max_p95_ms, max_drift and "
                              "required_provider; compare metrics before the DEPLOY ... TO GROUP instead.")
    group = s.devices.group(step.name)
    lm, result = deployable(s, step, opts)
    gate = None
    if isinstance(opts.get("max_metric_drop"), dict):  # the quality gate on late outcomes
        from mlsql.deploy.quality import online_metric_gate

        gate = online_metric_gate(group, lm, lambda v: load_model(s, P.ModelSpec(lm.version.name, v)),
                                  opts["max_metric_drop"], int(opts["min_outcomes"]),
                                  float(opts.get("wave_timeout_s") or 60.0))
    r = D.deploy_group(group, lm, result, _sampling(s, lm, opts), quality_gate=gate)
    if not r.rollout.ok and opts.get("notify"):  # the alert: the stop and its reason, as CREATE ALERT sends
        from mlsql.jobs.alerts import send

        bad = r.rollout.waves[-1]
        body = "\n".join([*bad.failures, json.dumps(bad.metrics, default=str)])
        ok, _attempts, err = send(opts["notify"], r.message.split(":")[0], body)
        r.message += "; notified" if ok else f"; the notification failed: {err}"
    return r


def _sampling(s: SessionState, lm, opts: dict) -> dict:
    """DEPLOY's sampling options checked against the model's raw input columns, with the
    workspace's salt for hashed columns."""
    from mlsql.runtime.steps.ml_functions import model_inputs

    return D.with_sampling(opts, model_inputs(lm), s.workspace.sample_salt)

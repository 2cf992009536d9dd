"""Experiment statements: ``CREATE EXPERIMENT``, ``STOP EXPERIMENT [PROMOTE]``, ``SHOW EXPERIMENTS`` and
``ML.EXPERIMENT_RESULTS('e')``.

The store is :mod:`mlsql.deploy.experiments`; the statistics :mod:`mlsql.ml.experiments`; the
assignment is the agent's (:mod:`device_bridge.experiments`). The readout reads the group's
samples and outcomes as ``ML.DEVICE_DATA`` does (:mod:`mlsql.deploy.data`: samples joined with the
latest outcome per request id), keeps the arms' versions predicted since the experiment started,
and turns them into per-arm observations with Arrow and numpy.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from mlsql._lazy import pyarrow as pa
from mlsql.errors import MLSQLError, OptionError
from mlsql.output.result import Result
from mlsql.plan import planner as P
from mlsql.runtime.steps import SessionState

READ_MAX_ROWS = 1_000_000
FIRST_INFERENCE_ID = "mlsql-deploy-check"

RESULT_SCHEMA_FIELDS = [
    ("experiment", "string"),
    ("arm", "string"),
    ("model", "string"),
    ("metric", "string"),
    ("is_primary", "bool"),
    ("test", "string"),
    ("n", "int64"),
    ("value", "float64"),
    ("ci_low", "float64"),
    ("ci_high", "float64"),
    ("delta_vs_control", "float64"),
    ("delta_ci_low", "float64"),
    ("delta_ci_high", "float64"),
    ("relative_delta", "float64"),
    ("p_value", "float64"),
    ("significant", "bool"),
    ("better", "bool"),
    ("samples_needed", "int64"),
    ("assigned", "int64"),
    ("srm_p_value", "float64"),
    ("trustworthy", "bool"),
    ("status", "string"),
    ("computed_at", "string"),
]


def _schema():
    return pa.schema(
        [(n, getattr(pa, t)()) if t != "bool" else (n, pa.bool_()) for n, t in RESULT_SCHEMA_FIELDS]
    )


def experiment_step(s: SessionState, step: P.ExperimentStep, load_model, deployable) -> Result:
    """``load_model(s, spec)`` and ``deployable(s, step, opts)`` are the ML functions' and DEPLOY's
    (passed in: this module sits beside them, and imports neither)."""
    if step.action == "create":
        return create(s, step, load_model, deployable)
    if step.action == "stop":
        return stop(s, step, load_model, deployable)
    return show(s, step)


def _store(s: SessionState):
    from mlsql.deploy.experiments import store_of

    return store_of(s.workspace)


def _group_devices(s: SessionState, group_name: str) -> list:
    """The devices of a group the notebook reaches directly ([] for a group behind a hub)."""
    group = s.devices.group(group_name)
    if group.hub:
        return []
    if not group.devices:
        raise MLSQLError(
            f"Device group '{group_name}' has no devices: an experiment needs at least one",
            hint=f"CREATE OR REPLACE DEVICE GROUP '{group_name}' OPTIONS (devices = [...]).",
        )
    return [s.devices.get(n) for n in group.devices]


def create(s: SessionState, step: P.ExperimentStep, load_model, deployable) -> Result:
    from mlsql.deploy import remote as D
    from mlsql.deploy.experiments import start_on_devices, start_on_hub

    o = dict(step.options)
    metrics = o["metrics"]
    primary = (o.get("primary_metric") or metrics[0]).lower()
    if primary not in metrics:
        raise OptionError(
            f"Option primary_metric = {primary!r} is not among metrics ({', '.join(metrics)})",
            hint=f"Add it: metrics = [{', '.join(repr(m) for m in [primary, *metrics])}].",
        )
    arms = []
    for a in o["arms"]:  # each names an existing version (an unknown model or version: UnknownModelError)
        name, version = a["model"].rsplit("@", 1)
        lm = load_model(s, P.ModelSpec(name, int(version)))
        arms.append(
            {
                "model": lm.version.ref,
                "name": lm.version.name,
                "version": lm.version.version,
                "share": a["share"],
            }
        )
    if o["unit"] not in ("device", "request"):  # an input column: every arm must read it
        for a in arms:
            lm = load_model(s, P.ModelSpec(a["name"], a["version"]))
            reads = (
                lm.feature_names
                if lm.transform is None
                else [c for cols in lm.transform.reads.values() for c in cols]
            )
            if o["unit"].lower() not in {c.lower() for c in reads}:
                from mlsql.errors import did_you_mean

                near = did_you_mean(o["unit"], reads)
                raise OptionError(
                    f"Option unit = {o['unit']!r}: not 'device', 'request' or an input column of {a['model']}",
                    hint=(f"Did you mean '{near}'? " if near else "")
                    + "Its input columns: "
                    + ", ".join(reads)
                    + ".",
                )
            o["unit"] = next(c for c in reads if c.lower() == o["unit"].lower())
    if len({a["name"].lower() for a in arms}) != 1:
        raise OptionError(
            "Option arms: every arm must be a version of one model "
            f"(got {', '.join(a['model'] for a in arms)})",
            hint="The app calls one model name on the device; the experiment picks its version.",
        )
    classifier_only = {"accuracy", "error_rate", "log_loss"} & set(metrics)
    if (
        classifier_only
        and load_model(s, P.ModelSpec(arms[0]["name"], arms[0]["version"])).model.classes is None
    ):
        raise OptionError(
            f"Option metrics: {sorted(classifier_only)[0]} needs a classifier; "
            f"{arms[0]['model']} is a regressor",
            hint="Use mean_absolute_error or mean_squared_error.",
        )
    devices = _group_devices(s, step.group)
    store = _store(s)
    with store.locked():
        running = store.running_on(step.group)
        if running is not None:
            raise MLSQLError(
                f"Experiment '{running['name']}' is already running on group '{step.group}'",
                hint=f"STOP EXPERIMENT {running['name']} first (its readout is kept).",
            )
        previous = [e for e in store.all() if e["name"] == step.name]
        if previous and previous[-1]["status"] == "running":
            raise MLSQLError(
                f"Experiment '{step.name}' is already running (on group '{previous[-1]['group']}')"
            )
        record = {
            "id": f"{step.name}#{len(previous) + 1}",
            "name": step.name,
            "group": step.group,
            "model": arms[0]["name"],
            "arms": arms,
            "unit": o["unit"],
            "metrics": metrics,
            "primary_metric": primary,
            "min_samples_per_arm": o["min_samples_per_arm"],
            "alpha": o["alpha"],
            "power": o["power"],
            "mde": o.get("mde"),
            "status": "starting",
            "started_at": datetime.now(UTC).isoformat(),
            "stopped_at": None,
            "promoted": None,
            "final": None,
        }
        packages = []
        deploy_opts = D.resolve_deploy_options({"sample_rate": o["sample_rate"]})
        for a in sorted(arms, key=lambda a: a["version"]):
            dstep = P.DeviceStep(
                "deploy", step.group, deploy_opts, P.ModelSpec(a["name"], a["version"]), "GROUP"
            )
            _lm, exported = deployable(s, dstep, deploy_opts)
            packages.append((a["version"], exported.package_path.read_bytes()))
        record["deploy"] = D.deploy_settings(deploy_opts)
        group = s.devices.group(step.group)
        if group.hub:  # through the hub: every agent installs the arms its desired state names
            rows = start_on_hub(group, arms[0]["name"], packages, record["deploy"], record)
        else:
            rows = start_on_devices(devices, arms[0]["name"], packages, record["deploy"], record)
        record["status"] = "running"
        record["devices"] = [r["device"] for r in rows]
        store.put(record)
    letters = _arm_names(record)
    by_version = {a["version"]: letters[i] for i, a in enumerate(arms)}
    table = pa.table(
        {
            "experiment": [step.name] * len(rows),
            "device": [r["device"] for r in rows],
            "arm": [by_version.get(r["arm_version"]) for r in rows],
            "model": [
                next((a["model"] for a in arms if a["version"] == r["arm_version"]), None) for r in rows
            ],
        }
    )
    split = ", ".join(f"{letters[i]} = {a['model']} ({a['share']:g})" for i, a in enumerate(arms))
    return Result(
        table,
        kind="experiment",
        message=(
            f"Started experiment {step.name} on group {step.group} ({len(rows)} devices, unit {record['unit']}): "
            f"{split}; primary metric {primary}"
        ),
    )


def _arm_names(record: dict) -> list[str]:
    return [chr(ord("A") + i) for i in range(len(record["arms"]))]


def results_table(s: SessionState, name: str, load_model) -> pa.Table:
    """ML.EXPERIMENT_RESULTS('e'): a stopped experiment's final readout, a running one's live one."""
    record = _store(s).get(name)
    if record.get("final") is not None:
        return pa.Table.from_pylist(record["final"], schema=_schema())
    return pa.Table.from_pylist(readout_rows(s, record, load_model), schema=_schema())


def readout_rows(s: SessionState, record: dict, load_model) -> list[dict]:
    import numpy as np
    import pyarrow.compute as pc

    from mlsql.deploy.data import fetch, parse_since, shape
    from mlsql.ml import experiments as X

    arms = record["arms"]
    lm = load_model(s, P.ModelSpec(arms[0]["name"], arms[0]["version"]))
    # since the start: a hub answers the oldest rows first, up to READ_MAX_ROWS (a device, all it keeps)
    since = parse_since(record["started_at"])
    samples, outcomes = fetch(s.devices, record["group"], record["model"], since, READ_MAX_ROWS)
    letters = _arm_names(record)
    data: dict[str, dict[str, np.ndarray]] = {a: {} for a in letters}
    assigned = dict.fromkeys(letters, 0)
    if samples is not None and samples.num_rows:
        t = shape(samples, outcomes, lm, max_rows=READ_MAX_ROWS)
        started = parse_since(record["started_at"])
        keep = pc.and_(
            pc.greater_equal(t["predicted_at"], pa.scalar(started, t["predicted_at"].type)),
            pc.not_equal(t["request_id"], FIRST_INFERENCE_ID),
        )
        t = t.filter(keep)
        # the request a row belongs to: a generated id is <request prefix>-<row>; a caller's own id is one row
        req = pc.replace_substring_regex(t["request_id"], pattern=r"-\d+$", replacement="")
        t = t.append_column("__req", req)
        for i, a in enumerate(arms):
            arm = letters[i]
            part = t.filter(pc.equal(t["version"], a["version"]))
            per_req = part.group_by(["device", "__req"], use_threads=False).aggregate([("latency_ms", "max")])
            unit = record["unit"]
            assigned[arm] = (
                len(pc.unique(part["device"]))
                if unit == "device"
                else per_req.num_rows
                if unit == "request" or unit not in part.column_names
                else len(pc.unique(part[unit]))
            )  # a column: its distinct values
            lat = per_req["latency_ms_max"].to_numpy(zero_copy_only=False).astype(np.float64)
            labelled = part.filter(pc.is_valid(part["label"]))
            obs = X.row_observations(labelled, lm.label, lm.model.classes)
            for metric in record["metrics"]:
                data[arm][metric] = lat if "latency" in metric else obs.get(metric, np.zeros(0))
    r = X.readout(
        data,
        letters,
        [a["share"] for a in arms],
        record["metrics"],
        assigned,
        alpha=record["alpha"],
        power=record["power"],
        mde=record.get("mde"),
        min_samples_per_arm=record["min_samples_per_arm"],
    )
    model_of = {letters[i]: a["model"] for i, a in enumerate(arms)}
    now = datetime.now(UTC).isoformat()
    return [
        {
            "experiment": record["name"],
            "arm": row.arm,
            "model": model_of[row.arm],
            "metric": row.metric,
            "is_primary": row.metric == record["primary_metric"],
            "test": row.test,
            "n": row.n,
            "value": row.value,
            "ci_low": row.ci_low,
            "ci_high": row.ci_high,
            "delta_vs_control": row.delta_vs_control,
            "delta_ci_low": row.delta_ci_low,
            "delta_ci_high": row.delta_ci_high,
            "relative_delta": row.relative_delta,
            "p_value": row.p_value,
            "significant": row.significant,
            "better": _better(row),
            "samples_needed": row.samples_needed,
            "assigned": int(assigned[row.arm]),
            "srm_p_value": r.srm_p_value,
            "trustworthy": r.trustworthy,
            "status": record["status"],
            "computed_at": now,
        }
        for row in r.rows
    ]


def _better(row) -> bool | None:
    """Significantly better than the control: a significant difference in the metric's good direction."""
    from mlsql.ml.experiments import LOWER_IS_BETTER

    if row.significant is None or row.delta_vs_control is None:
        return None
    good = row.delta_vs_control < 0 if row.metric in LOWER_IS_BETTER else row.delta_vs_control > 0
    return bool(row.significant and good)


def stop(s: SessionState, step: P.ExperimentStep, load_model, deployable) -> Result:
    from mlsql.deploy.experiments import stop_on_devices, stop_on_hub

    store = _store(s)
    record = store.get(step.name)
    if record["status"] != "running":
        raise MLSQLError(
            f"Experiment '{step.name}' is not running (it stopped at {record.get('stopped_at')})",
            hint=f"SELECT * FROM ML.EXPERIMENT_RESULTS('{step.name}') shows its final readout.",
        )
    winner = None
    if step.promote is not None:
        winner = next((a for a in record["arms"] if a["model"].lower() == step.promote.lower()), None)
        if winner is None:
            raise OptionError(
                f"PROMOTE {step.promote!r}: not an arm of experiment '{step.name}'",
                hint="Its arms: " + ", ".join(a["model"] for a in record["arms"]) + ".",
            )
    final = readout_rows(s, record, load_model)
    group = s.devices.group(record["group"])
    devices = _group_devices(s, record["group"])
    if group.hub:
        stop_on_hub(group, record)
    else:
        stop_on_devices(devices, record["model"])
    promoted_rows: list = []
    rollout = None
    if (
        winner is not None and group.hub
    ):  # the normal staged rollout (DEPLOY ... TO GROUP), every gate included
        from mlsql.deploy import remote as D

        opts = D.resolve_deploy_options({"sample_rate": (record.get("deploy") or {}).get("sample_rate")})
        dstep = P.DeviceStep(
            "deploy", group.name, opts, P.ModelSpec(winner["name"], winner["version"]), "GROUP"
        )
        lm, exported = deployable(s, dstep, opts)
        rollout = D.deploy_group(group, lm, exported, opts)
        promoted_rows = [n for w in rollout.rollout.waves for n in w.devices]
    elif winner is not None:
        promoted_rows = _promote(s, devices, record["model"], winner["version"])
    with store.locked():
        record = store.get(step.name)
        record.update(
            status="stopped",
            stopped_at=datetime.now(UTC).isoformat(),
            promoted=None
            if winner is None
            else winner["model"]
            if rollout is None or rollout.rollout.ok
            else f"{winner['model']} (rollout stopped: {rollout.message})",
        )
        for row in final:
            row["status"] = "stopped"
        record["final"] = final
        store.put(record)
    table = pa.Table.from_pylist(final, schema=_schema())
    msg = f"Stopped experiment {step.name}; its final readout is kept (ML.EXPERIMENT_RESULTS('{step.name}'))"
    if rollout is not None:
        msg += f"; promotion: {rollout.message}"
    elif winner is not None:
        msg += f"; promoted {winner['model']} to group {record['group']} ({len(promoted_rows)} devices)"
    out = Result(table, kind="experiment", message=msg)
    return out


def _promote(s: SessionState, devices: list, model: str, version: int) -> list[dict]:
    """The winner activated on every device of the group, in waves of one device, each checked by
    its first prediction's answer; a device that fails stops the promotion and says which."""
    from mlsql.deploy.remote import client_for, wrap

    rows = []
    for dev in devices:
        c = client_for(dev)
        try:
            r = c.activate(model, version)
            rows.append({"device": dev.name, "active": r.get("active"), "previous": r.get("previous")})
        except Exception as exc:
            raise wrap(
                exc,
                f"Promoting {model}@{version} on device '{dev.name}' failed "
                f"(promoted on: {', '.join(x['device'] for x in rows) or 'none'})",
            ) from None
        finally:
            c.close()
    return rows


def show(s: SessionState, step: P.ExperimentStep) -> Result:
    rows = []
    for e in _store(s).all():
        letters = _arm_names(e)
        rows.append(
            {
                "experiment": e["name"],
                "group": e["group"],
                "status": e["status"],
                "arms": [f"{letters[i]}: {a['model']} ({a['share']:g})" for i, a in enumerate(e["arms"])],
                "unit": e["unit"],
                "primary_metric": e["primary_metric"],
                "started_at": e["started_at"],
                "stopped_at": e.get("stopped_at"),
                "promoted": e.get("promoted"),
                "settings": json.dumps(
                    {k: e[k] for k in ("metrics", "min_samples_per_arm", "alpha", "power", "mde")}
                ),
            }
        )
    schema = pa.schema(
        [
            ("experiment", pa.string()),
            ("group", pa.string()),
            ("status", pa.string()),
            ("arms", pa.list_(pa.string())),
            ("unit", pa.string()),
            ("primary_metric", pa.string()),
            ("started_at", pa.string()),
            ("stopped_at", pa.string()),
            ("promoted", pa.string()),
            ("settings", pa.string()),
        ]
    )
    return Result(pa.Table.from_pylist(rows, schema=schema), kind="show")

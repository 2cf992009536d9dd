"""``ML.DEVICE_DATA``: what devices were fed and answered, with the true answers that came later.

A deploy with ``sample_rate > 0`` makes its devices keep a sample of their predictions (one row
per predicted row: the request id, when, which version and provider, the latency, the raw inputs
less the excluded columns, the outputs), and accept late outcomes (``POST .../outcomes``). They
come back here from a device directly (``GET /v1/samples``) or, for a group with a hub, from the
hub's Parquet store, as Arrow; nothing is sampled unless a deploy asks.

This module turns those wire rows into the notebook's rows:

- ``in.<column>`` → the column, with the type it had in training;
- ``out.predicted_<label>`` / ``out.predicted_<label>_probs`` → ML.PREDICT's names and types (the
  probabilities as ``[{label, prob}]``);
- outcomes (the JSON text of each label) → ``label`` of the label's training type and
  ``label_at``, the latest outcome of each request id; with ``MODEL m`` the same value again
  under the model's label name, so that ``ML.EVALUATE(MODEL m, (SELECT * FROM ML.DEVICE_DATA(...)
  WHERE label IS NOT NULL))`` reads it.

All of it is Arrow compute (casts, a hash join, a sort): no loop over rows.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import MLSQLError

ENVELOPE = ("device", "model", "version", "request_id", "predicted_at", "provider", "latency_ms")
PAGE_ROWS = 50_000  # rows asked of a device per call
DEFAULT_MAX_ROWS = 100_000
_TS = pa.timestamp("us", tz="UTC")


def parse_since(v: Any) -> datetime | None:
    """``since`` as written in the STRUCT (TIMESTAMP '2026-12-01 10:00' or a string): UTC."""
    if v is None or v == "":
        return None
    if isinstance(v, datetime):
        t = v
    else:
        try:
            t = datetime.fromisoformat(str(v).strip().replace("Z", "+00:00"))
        except ValueError:
            raise MLSQLError(f"since = {v!r} is not a timestamp",
                             hint="Write STRUCT(TIMESTAMP '2026-12-01 10:00:00' AS since) (UTC unless a zone "
                                  "is given).") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


# -- fetching ------------------------------------------------------------------------------------

def _device_rows(dev, model: str | None, kind: str) -> list[pa.Table]:
    """Every row of ``kind`` the device keeps for ``model`` (all its models when None)."""
    from mlsql.deploy.remote import client_for, wrap

    c = client_for(dev)
    try:
        try:
            models = [model] if model else sorted(c.info().get("models") or {})
        except Exception as exc:
            raise wrap(exc, f"Cannot read device '{dev.name}'") from None
        out = []
        for m in models:
            cursor = 0
            while True:
                try:
                    t, nxt = c.samples(m, kind=kind, since=cursor, max_rows=PAGE_ROWS)
                except Exception as exc:
                    if getattr(exc, "status", None) == 404 and not model:
                        break  # a model removed between the two calls
                    raise wrap(exc, f"Cannot read the {kind} of {m} on device '{dev.name}'") from None
                if t.num_rows:
                    out.append(t)
                if t.num_rows < PAGE_ROWS or nxt is None or nxt <= cursor:
                    break
                cursor = nxt
        return out
    finally:
        c.close()


def _hub_rows(group, model: str | None, kind: str, since: datetime | None, max_rows: int) -> list[pa.Table]:
    from device_bridge.client import HubClient
    from mlsql.deploy.remote import wrap

    c = HubClient(group.hub, group.hub_token)
    try:
        t = c.device_data(kind, group=group.name, model=model,
                          since=since.isoformat() if since else None, max_rows=max_rows)
    except Exception as exc:
        raise wrap(exc, f"Cannot read the {kind} of group '{group.name}' from its hub {group.hub}") from None
    finally:
        c.close()
    return [t] if t.num_rows else []


def fetch(store, target: str, model: str | None, since: datetime | None, max_rows: int) -> tuple[pa.Table, pa.Table]:
    """(samples, outcomes) of ``target``, a registered device or device group, as the wire has them."""
    names = {d.name for d in store.devices()}
    groups = {g.name: g for g in store.groups()}
    if target in names:
        sources = [("device", store.get(target))]
    elif target in groups:
        g = groups[target]
        if g.hub:
            sources = [("hub", g)]
        else:
            sources = [("device", store.get(n)) for n in g.devices]
    else:
        from mlsql.errors import did_you_mean

        near = did_you_mean(target, sorted(names | set(groups)))
        known = ", ".join(sorted(names | set(groups))) or "none yet"
        raise MLSQLError(f"ML.DEVICE_DATA: no device or device group is called '{target}'",
                         hint=(f"Did you mean '{near}'? " if near else "") + f"Known devices and groups: {known} "
                         "(CREATE DEVICE or CREATE DEVICE GROUP registers one).")
    parts: dict[str, list[pa.Table]] = {"samples": [], "outcomes": []}
    for kind in parts:
        for how, src in sources:
            parts[kind] += (_device_rows(src, model, kind) if how == "device"
                            else _hub_rows(src, model, kind, since, max_rows))
    return _concat(parts["samples"]), _concat(parts["outcomes"])


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    if not tables:
        return None
    tables = [t.drop_columns([c for c in ("seq",) if c in t.column_names]) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive")


# -- shaping -------------------------------------------------------------------------------------

def _labels_of(text: pa.Array, ltype: pa.DataType) -> pa.Array:
    """Labels sent as JSON text (one JSON scalar per row) → ``ltype``, by Arrow's JSON reader over
    one newline-delimited buffer."""
    import pyarrow.json as pj

    if len(text) == 0:
        return pa.array([], ltype)
    text = pc.fill_null(text.cast(pa.string()), "null")
    lines = pc.binary_join_element_wise('{"v":', text, "}\n", "")
    body = _joined(lines)
    read_type = ltype if not pa.types.is_boolean(ltype) else pa.bool_()
    try:
        t = pj.read_json(io.BytesIO(body), parse_options=pj.ParseOptions(
            explicit_schema=pa.schema([("v", read_type)]), unexpected_field_behavior="ignore"))
        return t.column("v").combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # a label of another type than training's (e.g. "yes" for a number): keep the text
        raw = pj.read_json(io.BytesIO(body)).column("v").combine_chunks()
        return raw.cast(pa.string()) if not pa.types.is_null(raw.type) else pa.nulls(len(text), ltype)


def _joined(strings: pa.Array) -> bytes:
    """The concatenation of a string array's values, read from its buffers (no Python per row)."""
    import numpy as np

    arr = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    width = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    off = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset: arr.offset + len(arr) + 1]
    return arr.buffers()[2].to_pybytes()[off[0]: off[-1]]


def _latest_outcomes(outcomes: pa.Table | None) -> pa.Table | None:
    """One row per (device, model, request id): its latest outcome."""
    if outcomes is None or outcomes.num_rows == 0:
        return None
    keys = [k for k in ("device", "model", "request_id") if k in outcomes.column_names]
    o = outcomes.sort_by([("label_at", "ascending")])
    last = o.group_by(keys, use_threads=False).aggregate([("label", "last"), ("label_at", "last")])
    return last.rename_columns([{"label_last": "label", "label_at_last": "label_at"}.get(c, c)
                                for c in last.column_names])


def _type_of(name: str | None):
    if not name:
        return None
    from mlsql.ml.model import _type_from_str

    try:
        return _type_from_str(name)
    except Exception:
        return None


def shape(samples: pa.Table | None, outcomes: pa.Table | None, lm=None, inputs: list[str] = (),
          max_rows: int = DEFAULT_MAX_ROWS, since: datetime | None = None) -> pa.Table:
    """The rows of ML.DEVICE_DATA from the wire's samples and outcomes; ``lm`` (the loaded model the
    call names, or None) gives the training types and the label's name, ``inputs`` its raw input
    columns (for the columns of an empty answer)."""
    schema_types = (lm.meta.get("training_schema") or {}) if lm is not None else {}
    by_lower = {k.lower(): v for k, v in schema_types.items()}
    label = lm.label if lm is not None else None
    ltype = _type_of(getattr(lm.model, "label_type", None)) if lm is not None else None
    if samples is None or samples.num_rows == 0:
        return _empty(lm, list(inputs))
    if since is not None and "predicted_at" in samples.column_names:
        samples = samples.filter(pc.greater_equal(samples["predicted_at"], pa.scalar(since, _TS)))
    if samples.num_rows > max_rows:  # the latest max_rows rows
        samples = samples.sort_by([("predicted_at", "descending")]).slice(0, max_rows)
    cols: dict[str, pa.ChunkedArray] = {}
    for name in ENVELOPE:
        if name in samples.column_names:
            cols[name] = samples[name]
    inputs, outputs = {}, {}
    for name in samples.column_names:
        if name.startswith("in."):
            col, t = name[3:], samples[name]
            if pa.types.is_floating(t.type):  # a missing value travels as NaN (ONNX's missing): NULL again
                t = pc.if_else(pc.is_nan(t), pa.scalar(None, t.type), t)
            want = _type_of(by_lower.get(col.lower()))
            if want is not None and t.type != want:
                try:
                    t = t.cast(want)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    pass  # a hashed column is a string; keep what the device sent
            inputs[col] = t
        elif name.startswith("out."):
            outputs[name[4:]] = samples[name]
    cols.update(inputs)
    pred = f"predicted_{label}" if label else None
    for name, t in outputs.items():
        if lm is not None and name == f"{pred}_probs" and lm.model.classes is not None:
            cols[name] = _probs(t, lm.model.classes, ltype)
        elif lm is not None and name == pred and ltype is not None and t.type != ltype:
            try:
                cols[name] = t.cast(ltype)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                cols[name] = t
        else:
            cols[name] = t
    table = pa.table(cols)
    last = _latest_outcomes(outcomes)
    if last is not None:
        keys = [k for k in ("device", "model", "request_id") if k in last.column_names and k in table.column_names]
        # Arrow's hash join carries no nested columns (the probabilities): join the keys and a row
        # number, then put the outcomes beside the rows in their order
        import numpy as np

        keyed = table.select(keys).append_column("__row", pa.array(np.arange(table.num_rows)))
        found = keyed.join(last, keys=keys, join_type="left outer", use_threads=False).sort_by("__row")
        labels = found["label"].combine_chunks()
        table = table.append_column("label", _labels_of(labels, ltype) if ltype is not None else labels)
        table = table.append_column("label_at", found["label_at"])
    else:
        table = table.append_column("label", pa.nulls(table.num_rows, ltype or pa.string()))
        table = table.append_column("label_at", pa.nulls(table.num_rows, _TS))
    if label and label.lower() not in {c.lower() for c in table.column_names}:
        table = table.append_column(label, table["label"])
    # oldest first; within one time (one request) in the order the device kept them, its rows'
    # order (Arrow's sort is stable, and the wire rows come in the device's sequence)
    return table.sort_by([("predicted_at", "ascending")]) if "predicted_at" in table.column_names else table


def _probs(t: pa.ChunkedArray, classes: list, ltype) -> pa.Array:
    """A list of probabilities per row (the classes' order) → ML.PREDICT's ``[{label, prob}]``."""
    import numpy as np

    arr = t.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        arr = arr.cast(pa.list_(arr.type.value_type))
    n, k = len(arr), len(classes)
    values = pc.list_flatten(arr).cast(pa.float64())
    if len(values) != n * k:
        return t  # not one probability per class: leave as sent
    labels = pa.array(classes, ltype).take(pa.array(np.tile(np.arange(k), n)))
    structs = pa.StructArray.from_arrays([labels, values], names=["label", "prob"])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)), structs)


def _empty(lm, inputs: list[str]) -> pa.Table:
    """No sample yet: the envelope, the model's inputs (training types) and the label columns."""
    fields = [pa.field("device", pa.string()), pa.field("model", pa.string()), pa.field("version", pa.int32()),
              pa.field("request_id", pa.string()), pa.field("predicted_at", _TS),
              pa.field("provider", pa.string()), pa.field("latency_ms", pa.float64())]
    ltype = pa.string()
    if lm is not None:
        types = {k.lower(): v for k, v in (lm.meta.get("training_schema") or {}).items()}
        fields += [pa.field(c, _type_of(types.get(c.lower())) or pa.string()) for c in inputs]
        ltype = _type_of(getattr(lm.model, "label_type", None)) or pa.string()
        if lm.label is not None:  # kmeans, pca: no label; their outputs come as the device named them
            fields.append(pa.field(f"predicted_{lm.label}", ltype))
    fields += [pa.field("label", ltype), pa.field("label_at", _TS)]
    if lm is not None and lm.label is not None and lm.label.lower() not in {f.name.lower() for f in fields}:
        fields.append(pa.field(lm.label, ltype))
    return pa.schema(fields).empty_table()


def device_data(devices, target: str, lm, inputs: list[str], settings: dict) -> pa.Table:
    """ML.DEVICE_DATA('device-or-group' [, MODEL m] [, STRUCT(... AS since, n AS max_rows)]) over the
    workspace's ``devices`` (its DeviceStore)."""
    since = parse_since(settings.get("since"))
    max_rows = int(settings.get("max_rows") or DEFAULT_MAX_ROWS)
    samples, outcomes = fetch(devices, target, lm.version.name if lm is not None else None, since, max_rows)
    return shape(samples, outcomes, lm, inputs, max_rows=max_rows, since=since)


# -- online metrics ------------------------------------------------------------------------------

ONLINE_COLUMNS = ("online_rows", "online_accuracy", "online_log_loss", "online_roc_auc", "online_r2",
                  "online_mean_absolute_error")


def online_metrics(load, dev, info: dict) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (model, version) on ``dev``, the metrics of its sampled predictions against the outcomes
    that arrived (``info`` is the agent's /v1/info): accuracy, log_loss and roc_auc for classifiers,
    r2 and mean absolute error for regressors, over ``online_rows`` labelled rows. ``load(name,
    version)`` gives the loaded model version (an MLSQLError when the registry has none: that
    version is left out, as are models without outcomes)."""
    import numpy as np

    from mlsql.ml.metrics import classification_metrics, regression_metrics

    out: dict[tuple[str, int], dict[str, Any]] = {}
    for name, m in (info.get("models") or {}).items():
        if not ((m.get("samples") or {}).get("outcomes")):
            continue
        samples = _concat(_device_rows(dev, name, "samples"))
        outcomes = _concat(_device_rows(dev, name, "outcomes"))
        if samples is None or outcomes is None:
            continue
        for version in pc.unique(samples["version"]).to_pylist():
            try:
                lm = load(name, int(version))
            except MLSQLError:
                continue
            part = samples.filter(pc.equal(samples["version"], version))
            t = shape(part, outcomes, lm, max_rows=part.num_rows + 1)
            t = t.filter(pc.is_valid(t["label"]))
            row: dict[str, Any] = {"online_rows": t.num_rows}
            pred = f"predicted_{lm.label}"
            if t.num_rows and lm.model.classes is not None and f"{pred}_probs" in t.column_names:
                k = len(lm.model.classes)
                codes = pc.index_in(t["label"], value_set=pa.array(lm.model.classes, t["label"].type))
                known = pc.is_valid(codes)
                t, codes = t.filter(known), codes.filter(known)
                probs = pc.struct_field(pc.list_flatten(t[f"{pred}_probs"]), "prob").to_numpy()
                if len(t):
                    mt = classification_metrics(codes.to_numpy().astype(np.int64), probs.reshape(len(t), k))
                    row.update(online_rows=len(t), online_accuracy=mt.get("accuracy"),
                               online_log_loss=mt.get("log_loss"), online_roc_auc=mt.get("roc_auc"))
            elif t.num_rows and pred in t.column_names:
                y = t["label"].to_numpy().astype(np.float64)
                p = t[pred].to_numpy().astype(np.float64)
                mt = regression_metrics(y, p)
                row.update(online_r2=mt["r2_score"], online_mean_absolute_error=mt["mean_absolute_error"])
            out[(name, int(version))] = row
    return out

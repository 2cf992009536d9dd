"""Staged rollout of a package over a fleet, through the hub, with health gates.

Waves of ``batch_size`` devices (or ``rollout_percent`` % of the fleet each). After
each wave the rollout waits until every device of the wave reports the new version
active, lets traffic flow (``on_wave`` callback, ``observe_s``), gathers the wave's
telemetry from the hub and checks the gates:

- ``max_error_rate``: errors / requests of the new version, over the wave
- ``max_p95_ms``: the worst device's p95 latency
- ``required_provider``: every device really runs the model on it (e.g. 'nnapi')
- ``max_drift``: |mean(input) - training mean| / training std, for each column the
  manifest's ``training_stats`` (``{col: {"mean", "std"}}``, top level or in
  ``metrics``) describes

- ``quality_gate``: a callable ``(wave index, wave devices, version, {device: version before})`` ->
  ``(failures, metrics)``, run after the gates above passed: the notebook's check of the new
  version's online metric from late outcomes against the previous version's (mlsql/deploy/quality.py)

A failed gate stops the rollout and puts the wave's devices back on what they had
(the hub's previous desired state; ``absent`` when the model is new to them).

Only reports the hub received after the wave's desired state was set count (the hub's
``age_s`` of each agent's last report, so no clock is compared across machines): a device that
went offline cannot pass a wave on what it reported before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from device_bridge import package as pkg
from device_bridge import providers as prov
from device_bridge.client import HubClient
from device_bridge.errors import RolloutError


@dataclass
class WaveResult:
    index: int
    devices: list[str]
    status: str = "pending"             # passed | failed | rolled_back
    failures: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RolloutReport:
    model: str
    version: int
    sha256: str
    status: str = "running"             # completed | stopped
    waves: list[WaveResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def plan_waves(devices: list[str], rollout_percent: float | None = None,
               batch_size: int | None = None) -> list[list[str]]:
    n = len(devices)
    if n == 0:
        raise RolloutError("no devices to roll out to")
    if batch_size is not None:
        if batch_size < 1:
            raise RolloutError("batch_size must be >= 1")
        size = batch_size
    elif rollout_percent is not None:
        if not 0 < rollout_percent <= 100:
            raise RolloutError("rollout_percent must be in (0, 100]")
        size = max(1, math.ceil(n * rollout_percent / 100))
    else:
        size = n
    return [devices[i:i + size] for i in range(0, n, size)]


def training_stats(manifest: pkg.Manifest) -> dict[str, dict]:
    stats = manifest.extra.get("training_stats") or manifest.metrics.get("training_stats") or {}
    return stats if isinstance(stats, dict) else {}


def _version_entry(telemetry: dict | None, model: str, version: int) -> dict | None:
    for entry in (telemetry or {}).get("models", []) or []:
        if entry.get("model") == model and entry.get("version") == version:
            return entry
    return None


def evaluate_gates(entries: dict[str, dict], stats: dict[str, dict], *, max_error_rate=None, max_p95_ms=None,
                   required_provider=None, max_drift=None) -> tuple[list[str], dict]:
    """Gate checks over one wave's telemetry entries (device -> version telemetry)."""
    failures: list[str] = []
    requests = sum(e.get("requests", 0) for e in entries.values())
    errors = sum(e.get("error_count", 0) for e in entries.values())
    err_rate = errors / requests if requests else 0.0
    p95s = {d: (e.get("latency") or {}).get("p95_ms") for d, e in entries.items()}
    p95s = {d: v for d, v in p95s.items() if v is not None}
    metrics: dict[str, Any] = {"requests": requests, "errors": errors, "error_rate": err_rate,
                               "p95_ms": max(p95s.values()) if p95s else None}
    if max_error_rate is not None and err_rate > max_error_rate:
        failures.append(f"error rate {err_rate:.4f} > max_error_rate {max_error_rate}")
    if max_p95_ms is not None and p95s and max(p95s.values()) > max_p95_ms:
        worst = max(p95s, key=p95s.get)
        failures.append(f"p95 latency {p95s[worst]:.2f} ms on {worst} > max_p95_ms {max_p95_ms}")
    if required_provider is not None:
        want = prov.to_ort_name(required_provider)
        bad = []
        for d, e in entries.items():
            nodes = e.get("node_providers") or {}
            if want not in (e.get("providers") or []) or (nodes and not nodes.get(want)):
                bad.append(d)
        metrics["provider_missing_on"] = bad
        if bad:
            failures.append(f"required provider {required_provider} not used on {', '.join(sorted(bad))}")
    drift: dict[str, float] = {}
    for col, st in stats.items():
        try:
            mean_t, std_t = float(st["mean"]), float(st["std"])
        except (KeyError, TypeError, ValueError):
            continue
        n = s = 0.0
        for e in entries.values():
            c = (e.get("columns") or {}).get(col)
            if c and c.get("mean") is not None and c.get("count"):
                n += c["count"]
                s += c["mean"] * c["count"]
        if n:
            drift[col] = abs(s / n - mean_t) / (std_t if std_t > 0 else 1.0)
    metrics["drift"] = drift
    if max_drift is not None:
        for col, d in sorted(drift.items()):
            if d > max_drift:
                failures.append(f"input drift on {col}: {d:.2f} training std > max_drift {max_drift}")
    return failures, metrics


def rollout(hub: HubClient, model: str, package: bytes, devices: list[str], *,
            rollout_percent: float | None = None, batch_size: int | None = None,
            max_error_rate: float | None = None, max_p95_ms: float | None = None,
            required_provider: str | None = None, max_drift: float | None = None,
            min_requests: int = 0, observe_s: float = 0.0, activation_timeout: float = 60.0,
            telemetry_timeout: float = 30.0, providers: list[str] | None = None,
            strict_providers: bool = False, on_wave: Callable[[int, list[str]], None] | None = None,
            deploy: dict | None = None, quality_gate: Callable | None = None,
            poll: float = 0.2, log: Callable[[str], None] | None = None) -> RolloutReport:
    manifest = pkg.read_manifest(package)
    if manifest.name != model:
        raise RolloutError(f"package holds model {manifest.name!r}, not {model!r}")
    stats = training_stats(manifest)
    meta = hub.upload(package)
    sha, version = meta["sha256"], meta["version"]
    report = RolloutReport(model, version, sha)
    say = log or (lambda msg: None)
    for i, wave in enumerate(plan_waves(list(devices), rollout_percent, batch_size)):
        t0 = time.time()
        res = WaveResult(i, wave)
        report.waves.append(res)
        before = {d: ((hub.agent(d).get("status") or {}).get(model) or {}).get("active") for d in wave}
        hub.set_desired(model, sha256=sha, devices=wave, providers=providers, strict_providers=strict_providers,
                        deploy=deploy)
        t_set = time.monotonic()
        say(f"wave {i}: {len(wave)} device(s) -> {model} v{version}")
        pending = _wait_active(hub, model, version, sha, wave, activation_timeout, poll, res, t_set)
        if pending:
            res.failures.append(f"not active within {activation_timeout:.0f}s on: {', '.join(sorted(pending))}")
        if not res.failures:  # every device runs the version: let traffic flow, then check the gates
            if on_wave is not None:
                on_wave(i, wave)
            if observe_s:
                time.sleep(observe_s)
            entries = _gather(hub, model, version, wave, min_requests, telemetry_timeout, poll, res, t_set)
            failures, metrics = evaluate_gates(entries, stats, max_error_rate=max_error_rate,
                                               max_p95_ms=max_p95_ms, required_provider=required_provider,
                                               max_drift=max_drift)
            res.failures += failures
            res.metrics = metrics
            if quality_gate is not None and not res.failures:
                q_failures, q_metrics = quality_gate(i, wave, version, before)
                res.failures += q_failures
                res.metrics["quality"] = q_metrics
        if res.failures:
            say(f"wave {i} failed: {'; '.join(res.failures)}; rolling back")
            try:  # the reason in the hub's events too (a hub without operator events: only in the report)
                hub.post_event("rollout_stopped", model=model, version=version, wave=i, devices=wave,
                               failures=res.failures, metrics=res.metrics)
            except Exception as exc:  # noqa: BLE001 - the rollout's own report still says why
                say(f"could not record the stop at the hub: {exc}")
            hub.set_desired(model, devices=wave, restore_previous=True)
            back = _wait_restored(hub, model, before, activation_timeout, poll, time.monotonic())
            res.status = "rolled_back" if not back else "failed"
            if back:
                res.failures.append(f"rollback not confirmed on: {', '.join(sorted(back))}")
            res.seconds = round(time.time() - t0, 3)
            report.status = "stopped"
            return report
        res.status = "passed"
        res.seconds = round(time.time() - t0, 3)
    report.status = "completed"
    return report


def _fresh_status(hub, since: float) -> dict[str, dict]:
    """The hub's agents whose last report came after ``since`` (time.monotonic() here): the others
    are left out, as if they had not reported yet."""
    window = time.monotonic() - since  # taken before asking: an age under it is a later report
    return {d: a for d, a in hub.status().items()
            if "age_s" not in a or (a["age_s"] is not None and a["age_s"] < window)}


def _wait_active(hub, model, version, sha, wave, timeout, poll, res, since) -> set[str]:
    pending = set(wave)
    deadline = time.time() + timeout
    while pending and time.time() < deadline:
        status = _fresh_status(hub, since)
        for d in list(pending):
            a = status.get(d) or {}
            st = ((a.get("status") or {}).get(model)) or {}
            if st.get("active") == version:
                pending.discard(d)
            elif version in (st.get("suspended") or []):
                res.failures.append(f"{d}: version {version} suspended by the circuit breaker")
                pending.discard(d)
            else:
                err = (a.get("errors") or {}).get(model)
                if isinstance(err, dict) and err.get("sha256") == sha and not err.get("suspended"):
                    res.failures.append(f"{d}: {err.get('error')}")
                    pending.discard(d)
        if pending:
            time.sleep(poll)
    return pending


def _gather(hub, model, version, wave, min_requests, timeout, poll, res, since) -> dict[str, dict]:
    deadline = time.time() + timeout
    entries: dict[str, dict] = {}
    while True:
        status = _fresh_status(hub, since)
        entries = {}
        for d in wave:
            e = _version_entry((status.get(d) or {}).get("telemetry"), model, version)
            if e is not None:
                entries[d] = e
        # a device with no telemetry for the version passes no gate (it would be left out of them)
        missing = [d for d in wave if d not in entries]
        short = [d for d in wave if d in entries and entries[d].get("requests", 0) < min_requests]
        if not (short or missing) or time.time() > deadline:
            if missing:
                res.failures.append(f"no telemetry for version {version} reported by: {', '.join(sorted(missing))}")
            if short:
                res.failures.append(f"fewer than {min_requests} requests reported by: {', '.join(sorted(short))}")
            return entries
        time.sleep(poll)


def _wait_restored(hub, model, before: dict[str, int | None], timeout, poll, since) -> set[str]:
    pending = set(before)
    deadline = time.time() + timeout
    while pending and time.time() < deadline:
        status = _fresh_status(hub, since)
        for d in list(pending):
            if d not in status:
                continue
            st = ((status.get(d) or {}).get("status") or {}).get(model)
            active = st.get("active") if st else None
            if active == before[d]:
                pending.discard(d)
        if pending:
            time.sleep(poll)
    return pending

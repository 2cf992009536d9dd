"""A group rollout's quality gate: ``DEPLOY ... TO GROUP ... OPTIONS (max_metric_drop =
STRUCT('accuracy' AS metric, 0.02 AS drop), min_outcomes = 500)``.

After a wave's other gates passed, the gate reads the group's device data from its hub (samples
joined with their latest outcomes, as ``ML.DEVICE_DATA`` does) until the new version has
``min_outcomes`` labelled rows on the wave's devices and the previous version has as many on the
group (rows predicted from a day before the wave on), or the wave's time (``wave_timeout_s``) is up. The wave stops
when the new version's online metric is worse than the previous version's by more than ``drop``
(accuracy: lower; error_rate, log_loss, errors: higher) **with 95 % confidence**: the lower end of
the one-sided 95 % interval of the difference, ``worse_by - 1.645 * se``, is over ``drop``, where
``se`` is the standard error of the difference of two means of per-row values (for a proportion,
the two-proportion z test's unpooled error). The two versions are measured on different requests,
so their point values differ by sampling noise alone: at 500 outcomes each, an accuracy near 0.88
moves by about 0.02 between two equally good versions, and a bare ``worse_by > drop`` would stop
one good rollout in six. Otherwise the rollout stops and the wave is rolled back
(device_bridge/rollout.py); the reason names the metric, both values, the margin and both counts.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.deploy.data import _concat, _hub_rows, shape

MAX_ROWS = 1_000_000
POLL_S = 0.5
Z_ONE_SIDED_95 = 1.6448536269514722  # scipy.stats.norm.ppf(0.95), written out: no scipy import here
PREVIOUS_WINDOW_S = 86_400  # the previous version's rows of the last day before the wave count


def online_metric_gate(group, lm_new, load_version, gate: dict, min_outcomes: int, timeout_s: float):
    """The rollout's ``quality_gate`` callable for ``lm_new`` on ``group``; ``load_version(v)`` loads
    another version of the model (the previous one)."""
    from mlsql.ml.experiments import LOWER_IS_BETTER, row_observations

    metric, drop = gate["metric"], float(gate["drop"])
    model = lm_new.version.name

    def run(index: int, wave: list[str], version: int, before: dict) -> tuple[list[str], dict]:
        olds = Counter(v for v in before.values() if v is not None and v != version)
        if not olds:
            return (
                [
                    f"quality gate: no previous version of {model} on wave {index}'s devices to compare "
                    f"{metric} with"
                ],
                {"metric": metric},
            )
        previous = olds.most_common(1)[0][0]
        lm_prev = load_version(previous)
        started = datetime.now(UTC)
        deadline = time.monotonic() + timeout_s
        while True:
            # the last day's rows (a hub answers the oldest first, up to MAX_ROWS)
            since = started - timedelta(seconds=PREVIOUS_WINDOW_S)
            samples = _concat(_hub_rows(group, model, "samples", since, MAX_ROWS))
            outcomes = _concat(_hub_rows(group, model, "outcomes", since, MAX_ROWS))
            new_t = old_t = None
            if samples is not None and samples.num_rows:
                t = shape(samples, outcomes, lm_new, max_rows=MAX_ROWS)
                t = t.filter(pc.is_valid(t["label"]))
                in_wave = pc.is_in(t["device"], value_set=pa.array(wave, pa.string()))
                new_t = t.filter(pc.and_(pc.equal(t["version"], version), in_wave))
                old_t = t.filter(pc.equal(t["version"], previous))
            n_new = new_t.num_rows if new_t is not None else 0
            n_old = old_t.num_rows if old_t is not None else 0
            if (n_new >= min_outcomes and n_old >= min_outcomes) or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        out = {
            "metric": metric,
            "version": version,
            "previous": previous,
            "n": n_new,
            "previous_n": n_old,
            "max_drop": drop,
            "waited_s": round((datetime.now(UTC) - started).total_seconds(), 3),
        }
        if n_new < min_outcomes or n_old < min_outcomes:
            return (
                [
                    f"quality gate: {n_new} labelled rows of version {version} on the wave and {n_old} of version "
                    f"{previous} after {timeout_s:g} s; min_outcomes = {min_outcomes}"
                ],
                out,
            )
        new_x = np.asarray(row_observations(new_t, lm_new.label, lm_new.model.classes)[metric], dtype=np.float64)
        old_x = np.asarray(row_observations(old_t, lm_prev.label, lm_prev.model.classes)[metric], dtype=np.float64)
        new_v, old_v = float(new_x.mean()), float(old_x.mean())
        worse = new_v - old_v if metric in LOWER_IS_BETTER else old_v - new_v
        se = float(np.sqrt(new_x.var() / n_new + old_x.var() / n_old))
        margin = Z_ONE_SIDED_95 * se
        out.update(value=new_v, previous_value=old_v, worse_by=worse, se=se, worse_by_at_least=worse - margin)
        if worse - margin > drop:
            return (
                [
                    f"online {metric} of version {version} is {new_v:.4f} (n = {n_new}), {worse:.4f} worse than "
                    f"version {previous}'s {old_v:.4f} (n = {n_old}); at least {worse - margin:.4f} worse with 95 % "
                    f"confidence: over max_metric_drop {drop:g}"
                ],
                out,
            )
        return [], out

    return run

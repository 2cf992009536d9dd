"""The statistics of an A/B experiment: per arm and metric a value with its confidence interval,
the difference to the control arm with its p-value, the sample-ratio-mismatch check, and the
samples still needed for the configured power. Pure functions over numpy arrays; scipy.stats
underneath, imported on first use.

Which test each metric gets (``METRICS``):

- **proportions** (``accuracy``, ``error_rate``: the share of labelled rows predicted right /
  wrong): the arm's value with a Wilson interval; the difference by the two-proportion z test
  (pooled standard error under the null, as the textbook test), its interval by the unpooled
  Wald interval.
- **means** (``log_loss``, ``mean_absolute_error``, ``mean_squared_error``, ``latency_ms``): the
  arm's mean with a Student t interval; the difference by Welch's t test
  (``scipy.stats.ttest_ind(equal_var=False)``) and its interval.
- **latency percentiles** (``p50_latency_ms``, ``p95_latency_ms``, ``p99_latency_ms``, over the
  requests): a percentile bootstrap, ``BOOTSTRAP_REPLICATES`` resamples of each arm, seeded
  (``numpy.random.default_rng(seed)``), each resample's percentile drawn exactly from the order
  statistics' Beta distributions (``bootstrap_percentiles``: one sort, then O(1) per replicate);
  the interval is the bootstrap distribution's alpha/2 and 1-alpha/2 quantiles, the two-sided
  p-value twice the smaller tail of the replicated difference around 0.

**Sample ratio mismatch.** The units assigned to each arm against the configured shares, by
Pearson's chi-square (``scipy.stats.chisquare``); below ``SRM_ALPHA`` (0.001, the threshold
experiment platforms use so that the check itself rarely fires by chance) the whole readout is
marked untrustworthy.

**Power.** ``samples_needed``: the labelled rows an arm needs so that a two-sided test at
``alpha`` detects the minimum detectable effect with probability ``power`` (0.8 by default), by
the normal approximation n = (z(1-alpha/2) + z(power))^2 * (var_control + var_treatment) / mde^2.
The minimum detectable effect (``mde``): 0.02 absolute for a proportion (2 points of accuracy),
5 % of the control arm's value for a mean or a percentile, unless given. A percentile's
variance per sample is its bootstrap variance times n.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PROPORTION, MEAN, PERCENTILE = "two_proportion_z", "welch_t", "bootstrap"
METRICS = {
    "accuracy": PROPORTION,
    "error_rate": PROPORTION,
    "log_loss": MEAN,
    "mean_absolute_error": MEAN,
    "mean_squared_error": MEAN,
    "latency_ms": MEAN,
    "p50_latency_ms": PERCENTILE,
    "p95_latency_ms": PERCENTILE,
    "p99_latency_ms": PERCENTILE,
}
LOWER_IS_BETTER = {
    "error_rate",
    "log_loss",
    "mean_absolute_error",
    "mean_squared_error",
    "latency_ms",
    "p50_latency_ms",
    "p95_latency_ms",
    "p99_latency_ms",
}
SRM_ALPHA = 0.001
POWER = 0.8
DEFAULT_MDE_PROPORTION = 0.02  # absolute
DEFAULT_MDE_RELATIVE = 0.05  # of the control's value, for means and percentiles
BOOTSTRAP_REPLICATES = 2000


def percentile_of(metric: str) -> float:
    return float(metric.split("_", 1)[0][1:])


@dataclass
class ArmMetric:
    """One row of a readout: an arm's value of a metric and its comparison with the control."""

    arm: str
    metric: str
    test: str
    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None
    delta_vs_control: float | None = None
    delta_ci_low: float | None = None
    delta_ci_high: float | None = None
    relative_delta: float | None = None
    p_value: float | None = None
    significant: bool | None = None
    samples_needed: int | None = None


@dataclass
class Readout:
    rows: list[ArmMetric]
    srm_p_value: float | None
    trustworthy: bool
    assigned: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------- one arm


def _z(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def proportion_ci(x: int, n: int, alpha: float) -> tuple[float, float]:
    """Wilson's score interval of x successes in n."""
    if n == 0:
        return math.nan, math.nan
    z = _z(1 - alpha / 2)
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def mean_ci(a: np.ndarray, alpha: float) -> tuple[float, float]:
    from scipy.stats import t

    n = a.size
    if n < 2:
        return math.nan, math.nan
    se = float(np.std(a, ddof=1)) / math.sqrt(n)
    h = float(t.ppf(1 - alpha / 2, n - 1)) * se
    m = float(np.mean(a))
    return m - h, m + h


# ---------------------------------------------------------------------------- two arms


def two_proportion_z(x1: int, n1: int, x0: int, n0: int, alpha: float) -> tuple[float, float, float, float]:
    """(delta, p_value, delta_ci_low, delta_ci_high) of p1 - p0: the pooled z test, the Wald interval."""
    from scipy.stats import norm

    p1, p0 = x1 / n1, x0 / n0
    pool = (x1 + x0) / (n1 + n0)
    se0 = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n0))
    d = p1 - p0
    if se0 == 0:
        p = 1.0 if d == 0 else 0.0
    else:
        p = float(2 * norm.sf(abs(d) / se0))
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    h = _z(1 - alpha / 2) * se
    return d, p, d - h, d + h


def welch(a1: np.ndarray, a0: np.ndarray, alpha: float) -> tuple[float, float, float, float]:
    """(delta, p_value, delta_ci_low, delta_ci_high) of mean(a1) - mean(a0) by Welch's t test."""
    from scipy.stats import ttest_ind

    d = float(np.mean(a1) - np.mean(a0))
    if np.var(a1) == 0 and np.var(a0) == 0:
        return d, (1.0 if d == 0 else 0.0), d, d
    r = ttest_ind(a1, a0, equal_var=False)
    ci = r.confidence_interval(1 - alpha)
    return d, float(r.pvalue), float(ci.low), float(ci.high)


def bootstrap_percentiles(a: np.ndarray, q: float, replicates: int, rng) -> np.ndarray:
    """``replicates`` percentiles ``q`` of resamples of ``a`` (each n draws with replacement), drawn
    exactly without building the resamples: O(replicates) after one sort.

    A resample is ``sorted(a)[floor(n * U_i)]`` for n uniforms U_i, and floor is monotone, so its
    j-th smallest value is ``sorted(a)[floor(n * U_(j))]``, U_(j) the j-th order statistic of n
    uniforms: Beta(j, n - j + 1). numpy's linear percentile of the resample interpolates between
    its order statistics j and j + 1 (1-based j = floor(h) + 1, h = (n - 1) q / 100, weight
    h - floor(h)); given U_(j) = u, U_(j+1) = u + (1 - u) Beta(1, n - j). tests/test_experiment_stats.py
    checks the draws against resampling by index."""
    x = np.sort(np.asarray(a, dtype=np.float64))
    n = x.size
    h = (n - 1) * q / 100.0
    j = int(np.floor(h))  # 0-based: the order statistic j + 1
    frac = h - j
    u1 = rng.beta(j + 1, n - j, size=replicates)
    lo = x[np.minimum((u1 * n).astype(np.int64), n - 1)]
    if frac == 0.0 or j + 1 >= n:
        return lo
    u2 = u1 + (1.0 - u1) * rng.beta(1, n - j - 1, size=replicates)
    hi = x[np.minimum((u2 * n).astype(np.int64), n - 1)]
    return lo + frac * (hi - lo)


# ---------------------------------------------------------------------------- checks


def srm_p_value(counts: list[int], shares: list[float]) -> float | None:
    """Pearson's chi-square p-value of the units per arm against the configured shares."""
    from scipy.stats import chisquare

    total = sum(counts)
    if total == 0 or len(counts) < 2:
        return None
    exp = np.asarray(shares, dtype=np.float64) / sum(shares) * total
    return float(chisquare(np.asarray(counts, dtype=np.float64), exp).pvalue)


def required_n(var_control: float, var_treatment: float, mde: float, alpha: float, power: float) -> int:
    """Per-arm samples for a two-sided test at alpha to detect ``mde`` with probability ``power``."""
    if not mde or not math.isfinite(var_control + var_treatment):
        return 0
    z = _z(1 - alpha / 2) + _z(power)
    return int(math.ceil(z * z * (var_control + var_treatment) / (mde * mde)))


# ---------------------------------------------------------------------------- the readout


def readout(
    data: dict[str, dict[str, np.ndarray]],
    arms: list[str],
    shares: list[float],
    metrics: list[str],
    assigned: dict[str, int],
    *,
    alpha: float = 0.05,
    power: float = POWER,
    mde: float | None = None,
    min_samples_per_arm: int = 0,
    seed: int = 0,
    replicates: int = BOOTSTRAP_REPLICATES,
) -> Readout:
    """The readout of an experiment.

    ``data[arm][metric]``: the observations, one per labelled row (a proportion's 0/1, a mean
    metric's per-row value) or per request (latency). ``arms[0]`` is the control. ``assigned``:
    the units each arm got, for the sample-ratio check."""
    rng = np.random.default_rng(seed)
    control = arms[0]
    rows: list[ArmMetric] = []
    for metric in metrics:
        test = METRICS[metric]
        boots: dict[str, np.ndarray] = {}
        per_arm: dict[str, ArmMetric] = {}
        for arm in arms:
            a = np.asarray(data.get(arm, {}).get(metric, np.zeros(0)), dtype=np.float64)
            n = int(a.size)
            value = lo = hi = None
            if n:
                if test == PROPORTION:
                    x = int(a.sum())
                    value = x / n
                    lo, hi = proportion_ci(x, n, alpha)
                elif test == MEAN:
                    value = float(a.mean())
                    lo, hi = mean_ci(a, alpha)
                else:
                    q = percentile_of(metric)
                    value = float(np.percentile(a, q))
                    boots[arm] = bootstrap_percentiles(a, q, replicates, rng)
                    lo, hi = (float(v) for v in np.quantile(boots[arm], [alpha / 2, 1 - alpha / 2]))
            per_arm[arm] = ArmMetric(arm, metric, test, n, value, _f(lo), _f(hi))
        c = per_arm[control]
        c0 = np.asarray(data.get(control, {}).get(metric, np.zeros(0)), dtype=np.float64)
        for arm in arms:
            r = per_arm[arm]
            a = np.asarray(data.get(arm, {}).get(metric, np.zeros(0)), dtype=np.float64)
            var_c = var_t = math.nan
            if c.n >= 2:
                if test == PROPORTION:
                    var_c = c.value * (1 - c.value)
                elif test == MEAN:
                    var_c = float(np.var(c0, ddof=1))
                else:
                    var_c = float(np.var(boots[control], ddof=1)) * c.n
            if arm != control and r.n >= 2 and c.n >= 2:
                if test == PROPORTION:
                    d, p, dlo, dhi = two_proportion_z(int(a.sum()), r.n, int(c0.sum()), c.n, alpha)
                    var_t = r.value * (1 - r.value)
                elif test == MEAN:
                    d, p, dlo, dhi = welch(a, c0, alpha)
                    var_t = float(np.var(a, ddof=1))
                else:
                    diff = boots[arm] - boots[control]
                    d = r.value - c.value
                    dlo, dhi = (float(v) for v in np.quantile(diff, [alpha / 2, 1 - alpha / 2]))
                    tail = min(np.count_nonzero(diff <= 0), np.count_nonzero(diff >= 0))
                    p = min(1.0, 2 * (tail + 1) / (diff.size + 1))
                    var_t = float(np.var(boots[arm], ddof=1)) * r.n
                r.delta_vs_control, r.p_value = _f(d), _f(p)
                r.delta_ci_low, r.delta_ci_high = _f(dlo), _f(dhi)
                r.relative_delta = _f(d / c.value) if c.value else None
                r.significant = bool(p < alpha)
            elif arm == control:
                r.delta_vs_control, r.relative_delta = (0.0, 0.0) if c.n else (None, None)
                var_t = var_c
            if c.n >= 2:
                effect = (
                    mde
                    if mde is not None
                    else (
                        DEFAULT_MDE_PROPORTION
                        if test == PROPORTION
                        else DEFAULT_MDE_RELATIVE * abs(c.value or 0.0)
                    )
                )
                if test == PROPORTION and mde is None:  # the variance at the detectable value itself
                    shifted = min(max(c.value - effect, 0.0), 1.0)
                    var_t = shifted * (1 - shifted)
                need = max(
                    required_n(var_c, var_t if math.isfinite(var_t) else var_c, effect, alpha, power),
                    int(min_samples_per_arm),
                )
            else:
                need = max(int(min_samples_per_arm), 2)
            r.samples_needed = max(0, need - r.n)
            rows.append(r)
    srm = srm_p_value([int(assigned.get(a, 0)) for a in arms], shares)
    return Readout(rows, srm, srm is None or srm >= SRM_ALPHA, dict(assigned))


def _f(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def row_observations(t, label_name: str | None, classes: list | None) -> dict:
    """Per labelled row of ``t`` (ML.DEVICE_DATA's shape: ``predicted_<label>``, ``_probs``, ``label``):
    correct (0/1) as accuracy, wrong as error_rate, its log loss (classifiers, clipped at float64's
    epsilon), its absolute and squared error (regressors), as numpy arrays."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = t.num_rows
    out: dict[str, np.ndarray] = {}
    if n == 0 or label_name is None:
        return out
    pred = t[f"predicted_{label_name}"]
    label = t["label"]
    if classes is not None:
        same = (
            pc.equal(pred.cast(pa.string()), label.cast(pa.string()))
            if pred.type != label.type
            else pc.equal(pred, label)
        )
        correct = pc.fill_null(same, False).to_numpy(zero_copy_only=False).astype(np.float64)
        out["accuracy"], out["error_rate"] = correct, 1.0 - correct
        probs_col = f"predicted_{label_name}_probs"
        if probs_col in t.column_names:
            k = len(classes)
            flat = pc.list_flatten(t[probs_col])
            if len(flat) == n * k:
                cls = pc.struct_field(flat, "label").cast(pa.string()).to_numpy(zero_copy_only=False)
                p = pc.struct_field(flat, "prob").to_numpy(zero_copy_only=False).astype(np.float64)
                truth = np.repeat(label.cast(pa.string()).to_numpy(zero_copy_only=False), k)
                p_true = (p * (cls == truth)).reshape(n, k).sum(axis=1)
                # log loss per row, clipped as sklearn's log_loss clips (eps = float64's machine epsilon)
                out["log_loss"] = -np.log(np.clip(p_true, np.finfo(np.float64).eps, 1.0))
    else:
        y = label.cast(pa.float64()).to_numpy(zero_copy_only=False)
        yhat = pred.cast(pa.float64()).to_numpy(zero_copy_only=False)
        out["mean_absolute_error"] = np.abs(yhat - y)
        out["mean_squared_error"] = (yhat - y) ** 2
    return out

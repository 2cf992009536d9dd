"""The experiment readout's statistics (mlsql/ml/experiments.py) against scipy called by hand and the
textbook formulas, its calibration on simulated A/A experiments, the sample-ratio check and the power."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mlsql.ml import experiments as X

# labelled rows per arm in the simulated fleet (tests/device_bridge/test_experiment_fleet.py sends
# at least this many outcomes per arm before reading the result)
FLEET_ROWS_PER_ARM = 3000


def _by(readout, arm, metric):
    (row,) = [r for r in readout.rows if r.arm == arm and r.metric == metric]
    return row


def test_proportion_matches_the_textbook_z_test():
    rng = np.random.default_rng(1)
    a = (rng.random(1200) < 0.81).astype(float)
    b = (rng.random(1500) < 0.77).astype(float)
    r = X.readout(
        {"A": {"accuracy": a}, "B": {"accuracy": b}},
        ["A", "B"],
        [0.5, 0.5],
        ["accuracy"],
        {"A": 1200, "B": 1500},
        alpha=0.05,
    )
    x1, n1, x0, n0 = b.sum(), b.size, a.sum(), a.size
    p = (x1 + x0) / (n1 + n0)
    z = (x1 / n1 - x0 / n0) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n0))
    row = _by(r, "B", "accuracy")
    # the same float64 formula evaluated twice: equal up to a few ulps
    assert row.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-12)
    assert row.delta_vs_control == pytest.approx(x1 / n1 - x0 / n0, rel=1e-12)
    assert row.relative_delta == pytest.approx((x1 / n1 - x0 / n0) / (x0 / n0), rel=1e-12)
    assert row.n == 1500 and row.test == "two_proportion_z"
    # Wilson's interval as statsmodels/scipy compute it (scipy's binomtest)
    ci = stats.binomtest(int(x1), int(n1)).proportion_ci(0.95, method="wilson")
    assert (row.ci_low, row.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)  # scipy's own float64 path
    assert row.significant == (row.p_value < 0.05)


def test_mean_matches_scipy_welch():
    rng = np.random.default_rng(2)
    a = rng.gamma(2.0, 0.2, 800)
    b = rng.gamma(2.0, 0.23, 650)
    r = X.readout(
        {"A": {"log_loss": a}, "B": {"log_loss": b}},
        ["A", "B"],
        [0.5, 0.5],
        ["log_loss"],
        {"A": 800, "B": 650},
    )
    t = stats.ttest_ind(b, a, equal_var=False)
    ci = t.confidence_interval(0.95)
    row = _by(r, "B", "log_loss")
    assert row.p_value == pytest.approx(t.pvalue, rel=1e-12)  # the same scipy call
    assert (row.delta_ci_low, row.delta_ci_high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    # the arm's own interval: mean ± t(0.975, n-1) · s/√n, written out
    half = stats.t.ppf(0.975, b.size - 1) * b.std(ddof=1) / math.sqrt(b.size)
    assert (row.ci_low, row.ci_high) == pytest.approx((b.mean() - half, b.mean() + half), rel=1e-12)
    assert row.test == "welch_t"


def test_percentile_bootstrap_is_seeded_and_covers_the_difference():
    rng = np.random.default_rng(3)
    a = rng.lognormal(1.0, 0.4, 600)
    b = rng.lognormal(1.3, 0.4, 600)  # p95 about 35 % higher
    data = {"A": {"p95_latency_ms": a}, "B": {"p95_latency_ms": b}}
    r1 = X.readout(data, ["A", "B"], [0.5, 0.5], ["p95_latency_ms"], {"A": 600, "B": 600}, seed=7)
    r2 = X.readout(data, ["A", "B"], [0.5, 0.5], ["p95_latency_ms"], {"A": 600, "B": 600}, seed=7)
    row = _by(r1, "B", "p95_latency_ms")
    assert row == _by(r2, "B", "p95_latency_ms")  # seeded: the same numbers twice
    assert row.value == np.percentile(b, 95) and row.test == "bootstrap"
    assert row.delta_vs_control == pytest.approx(np.percentile(b, 95) - np.percentile(a, 95), rel=1e-12)
    assert row.delta_ci_low < row.delta_vs_control < row.delta_ci_high
    assert row.delta_ci_low > 0 and row.p_value < 0.01 and row.significant


def _aa_false_positive_rate(metric, draw, n, trials=200, seed=11, replicates=X.BOOTSTRAP_REPLICATES):
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(trials):
        data = {"A": {metric: draw(rng, n)}, "B": {metric: draw(rng, n)}}
        r = X.readout(data, ["A", "B"], [0.5, 0.5], [metric], {"A": n, "B": n}, seed=i, replicates=replicates)
        hits += bool(_by(r, "B", metric).significant)
    return hits / trials


@pytest.mark.parametrize(
    "metric,draw,n,replicates",
    [
        ("accuracy", lambda rng, n: (rng.random(n) < 0.8).astype(float), 2000, 0),
        ("log_loss", lambda rng, n: rng.exponential(0.4, n), 2000, 0),
        ("p95_latency_ms", lambda rng, n: rng.lognormal(1.0, 0.3, n), 400, 0),
    ],
)
def test_calibration_of_200_aa_experiments(metric, draw, n, replicates):
    """200 A/A experiments at alpha 0.05. Each is a Bernoulli(0.05) trial under a calibrated test, so
    the rate has a binomial spread: sd = sqrt(0.05 * 0.95 / 200) = 1.54 points; the band 2 %–8 % is
    about ±2 sd around 5 % (a calibrated test lands outside it about 5 % of seeds; the seed is fixed,
    and a test that is 2x too liberal or too conservative lands outside far more often)."""
    rate = _aa_false_positive_rate(metric, draw, n, replicates=replicates or X.BOOTSTRAP_REPLICATES)
    print(f"A/A false-positive rate for {metric}: {rate:.3f}")
    assert 0.02 <= rate <= 0.08


def test_srm_catches_a_60_40_assignment():
    rng = np.random.default_rng(5)
    units = 2000
    arm_of_unit = np.where(rng.random(units) < 0.6, "A", "B")  # the injected bug: 60/40 for a 50/50 split
    assigned = {"A": int((arm_of_unit == "A").sum()), "B": int((arm_of_unit == "B").sum())}
    r = X.readout(
        {"A": {"accuracy": np.ones(10)}, "B": {"accuracy": np.ones(10)}},
        ["A", "B"],
        [0.5, 0.5],
        ["accuracy"],
        assigned,
    )
    expected = stats.chisquare([assigned["A"], assigned["B"]], [units / 2, units / 2]).pvalue
    assert r.srm_p_value == pytest.approx(expected, rel=1e-12)
    assert r.srm_p_value < X.SRM_ALPHA and not r.trustworthy
    # the honest 50/50 assignment of the same units passes
    fair = np.where(rng.random(units) < 0.5, "A", "B")
    ok = X.readout(
        {"A": {"accuracy": np.ones(10)}},
        ["A", "B"],
        [0.5, 0.5],
        ["accuracy"],
        {"A": int((fair == "A").sum()), "B": int((fair == "B").sum())},
    )
    assert ok.trustworthy


def test_a_five_point_accuracy_drop_is_detected_at_the_fleet_size():
    rng = np.random.default_rng(6)
    n = FLEET_ROWS_PER_ARM
    a = (rng.random(n) < 0.85).astype(float)
    b = (rng.random(n) < 0.80).astype(float)
    r = X.readout(
        {"A": {"accuracy": a}, "B": {"accuracy": b}}, ["A", "B"], [0.5, 0.5], ["accuracy"], {"A": n, "B": n}
    )
    row = _by(r, "B", "accuracy")
    print(f"5-point drop at {n} rows per arm: p = {row.p_value:.2e}, delta = {row.delta_vs_control:.4f}")
    assert row.p_value < 0.01 and row.significant and row.delta_vs_control < 0


def test_samples_needed_is_the_normal_approximation():
    rng = np.random.default_rng(8)
    a = (rng.random(500) < 0.8).astype(float)
    r = X.readout(
        {"A": {"accuracy": a}, "B": {"accuracy": a[:300]}},
        ["A", "B"],
        [0.5, 0.5],
        ["accuracy"],
        {"A": 500, "B": 300},
        alpha=0.05,
        power=0.8,
    )
    p0 = a.mean()
    p1 = p0 - 0.02
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    need = math.ceil(z * z * (p0 * (1 - p0) + p1 * (1 - p1)) / 0.02**2)
    assert _by(r, "A", "accuracy").samples_needed == need - 500
    assert _by(r, "B", "accuracy").samples_needed == need - 300
    # min_samples_per_arm above the power's n wins
    r = X.readout(
        {"A": {"accuracy": a}, "B": {"accuracy": a}},
        ["A", "B"],
        [0.5, 0.5],
        ["accuracy"],
        {"A": 500, "B": 500},
        min_samples_per_arm=need + 1000,
    )
    assert _by(r, "B", "accuracy").samples_needed == need + 500


@pytest.mark.parametrize("n,q", [(300, 95.0), (41, 50.0), (1000, 99.0)])
def test_bootstrap_percentiles_match_resampling_by_index(n, q):
    """The bootstrap's percentiles drawn from the order statistics' Beta laws have the distribution of
    np.percentile over resamples drawn by index (the textbook bootstrap), compared on 20,000 draws
    of each by a two-sample KS test (values come from the n data points, so the test is conservative)."""
    rng = np.random.default_rng(9)
    a = rng.lognormal(1.0, 0.5, n)
    fast = X.bootstrap_percentiles(a, q, 20_000, np.random.default_rng(10))
    r = np.random.default_rng(11)
    slow = np.concatenate([np.percentile(a[r.integers(0, n, size=(2_000, n))], q, axis=1) for _ in range(10)])
    ks = stats.ks_2samp(fast, slow)
    print(f"n={n} q={q}: KS statistic {ks.statistic:.4f}, p = {ks.pvalue:.3f}")
    # equal laws: p is at least uniform (conservative on a discrete law), so p > 0.001 fails 0.1 % of seeds
    assert ks.pvalue > 0.001
    # the spread too: the two standard deviations agree within the 20,000-draw Monte Carlo error
    # (the sd's relative standard error is about 1/sqrt(2 * 20000) = 0.5 %; 5 % leaves room for the
    # heavier tails of a discrete law)
    assert fast.std() == pytest.approx(slow.std(), rel=0.05)

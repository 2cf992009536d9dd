"""A shorter run of bench/fuzz_device.py: real agent and hub, malformed bodies on every endpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.timeout(120)


def test_fuzz_agent_and_hub_no_5xx_no_crash_bounded_rss(tmp_path):
    import warnings

    from fuzz_device import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the generator's own casts of 1e300 to float32
        res = run(n_requests=2000, seconds=60, seed=5, threads=4, rss_bound_mb=400, workdir=tmp_path)
    assert res["requests"] >= 1000, res
    assert res["5xx"] == 0, res["examples_5xx"]
    assert res["errors_without_kind"] == 0, res["examples_without_kind"]
    assert res["crashes"] == 0 and res["healthy_after"] and res["connection_errors"] == 0, res
    assert res["agent_rss_mb"]["max"] < 400, res["agent_rss_mb"]
    assert res["feature_events"].get("batches", 0) > 0, res["feature_events"]  # valid events got through

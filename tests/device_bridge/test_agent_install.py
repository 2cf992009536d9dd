"""The agent installs on its own, as docs/DEVICE.md and the README tell a device owner to:
`pip install ./device_bridge` into a clean venv (the locked versions, pip's cache warm from
`make install`), with none of the notebook side's dependencies, and then serves a signed model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bridge_procs import start_bridge

ROOT = Path(__file__).resolve().parents[2]
# a clean venv sees only what was installed into it, whatever PYTHONPATH this run has
CLEAN = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
NOTEBOOK_SIDE = ("mlsql", "duckdb", "mlflow", "xgboost", "torch", "pyspark", "jupyterlab", "pandas", "onnx")


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("agent") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=CLEAN)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    # the lock as constraints: the device gets the versions the suite passed with
    done = subprocess.run([*pip, "install", "-c", str(ROOT / "requirements.lock"), str(ROOT / "device_bridge")],
                          capture_output=True, text=True, timeout=900, env=CLEAN)
    if done.returncode != 0:
        pytest.fail(f"pip install ./device_bridge failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return venv


def test_the_agent_installs_alone_and_serves_a_signed_model(agent_venv, tmp_path):
    from device_test_helpers import TOKEN, make_keys, package

    from device_bridge.client import DeviceClient
    from device_bridge.keys import PUBLIC_KEY_FILE

    py = agent_venv / "bin" / "python"
    # run outside the clone, whose mlsql/ folder would be importable from the current directory
    probe = f"import importlib.util, json; print(json.dumps([m for m in {NOTEBOOK_SIDE!r} if importlib.util.find_spec(m)]))"
    present = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, check=True,
                             cwd=tmp_path, env=CLEAN).stdout.strip()
    assert present == "[]", f"the agent's venv has notebook-side packages: {present}"

    kp = make_keys(tmp_path / "keys")
    proc, listening = start_bridge(
        ["serve", "--name", "pixel-7", "--port", "0", "--store", str(tmp_path / "store"), "--token", TOKEN,
         "--trust", str(tmp_path / "keys" / PUBLIC_KEY_FILE)],
        tmp_path, command=[str(agent_venv / "bin" / "mlsql-device")], env=CLEAN)
    try:
        client = DeviceClient(listening[0]["url"], TOKEN)
        client.install(package(kp, 1, mult=3.0))
        out = client.predict("scorer", columns={"x": [[1.0], [2.0]], "city": [["paris"], ["rome"]]})
        assert out["version"] == 1
        assert [row[0] for row in out["outputs"]["y"]] == [4.0, 6.0]  # 3x + (city == 'paris')
    finally:
        proc.terminate()
        proc.wait(timeout=30)

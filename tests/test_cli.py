"""The mlsql command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args, cwd=None, input=None):
    return subprocess.run([sys.executable, "-m", "mlsql.cli", *args], capture_output=True, text=True,
                          cwd=cwd, input=input, timeout=300)


def test_version():
    import mlsql

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"mlsql {mlsql.__version__}"


def test_run_script_prints_results(tmp_path):
    script = tmp_path / "s.sql"
    script.write_text(
        "CREATE TABLE d AS SELECT range::DOUBLE AS x, 3 * range + 1.0 AS y FROM range(40);\n"
        "CREATE MODEL lin OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT * FROM d;\n"
        "SELECT round(predicted_y, 3) AS p FROM ML.PREDICT(MODEL lin, (SELECT 10.0 AS x));\n"
    )
    out = run("run", str(script), "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 0, out.stderr
    assert "Created model lin version 1" in out.stdout
    assert "31" in [line.strip() for line in out.stdout.splitlines()]  # one float format: 31, not 31.0


def test_run_failure_exits_nonzero_with_message(tmp_path):
    out = run("run", "-e", "SELECT 41 + 1 AS answer; SELECT * FROM missing_table", "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 1
    assert "Statement 2" in out.stderr and "missing_table" in out.stderr
    assert "Traceback" not in out.stderr
    assert "answer" in out.stdout and "42" in out.stdout  # what ran before the failure is printed


def test_run_missing_file(tmp_path):
    out = run("run", str(tmp_path / "nope.sql"))
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_help_has_no_side_effects(tmp_path):
    """Every --help prints usage and exits 0 without making a workspace or a signing key."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLSQL_HOME"} | {"HOME": str(tmp_path)}
    for args in (["--help"], ["run", "--help"], ["device", "--help"], ["device", "key", "--help"],
                 ["device", "serve", "--help"], ["hub", "--help"], ["hub", "serve", "--help"],
                 ["scheduler", "--help"], ["jobs", "--help"], *[["jobs", a, "--help"] for a in (
                     "list", "show", "runs", "run", "pause", "resume", "drop", "export")]):
        out = subprocess.run([sys.executable, "-m", "mlsql.cli", *args], capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("usage:"), (args, out.stdout, out.stderr)
        assert list(tmp_path.iterdir()) == [], (args, list(tmp_path.iterdir()))
    out = subprocess.run([sys.executable, "-m", "mlsql.cli", "device", "key", "--workspace", str(tmp_path / "ws")],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and (tmp_path / "ws" / "keys" / "signing_key.pub").exists(), out.stderr
    assert out.stdout.strip() == str(tmp_path / "ws" / "keys" / "signing_key.pub")


def test_lock_file_matches_pyproject_and_the_check_catches_drift(tmp_path):
    """`make install` installs requirements.lock; its check fails once pyproject.toml's dependencies move."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    lock = root / ".ci" / "lock.py"
    ok = subprocess.run([sys.executable, str(lock), "--check"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    pins = dict(line.split("==") for line in (root / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["torch"] == "2.13.0" and {"duckdb", "sqlglot", "onnxruntime", "mlflow", "xgboost-cpu"} <= set(pins)
    (tmp_path / "device_bridge").mkdir()
    for f in ("pyproject.toml", "requirements.lock", "device_bridge/pyproject.toml"):
        shutil.copy(root / f, tmp_path / f)
    py = tmp_path / "pyproject.toml"
    py.write_text(py.read_text().replace('"duckdb>=1.2",', '"duckdb>=1.2",\n  "left-pad>=1",'))
    bad = subprocess.run([sys.executable, str(lock), "--check", "--root", str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1
    assert "dependencies changed" in bad.stderr and "left-pad is not in the lock" in bad.stderr
    assert "make lock" in bad.stderr


def test_each_device_name_gets_its_own_store_and_two_agents_cannot_share_one(tmp_path):
    """`mlsql device serve --name N` without --store serves <workspace>/devices/N: a second device on
    the machine starts empty instead of reporting the first one's models, and a second agent on a
    store that is in use is refused with the holder's name and pid (nothing of the first is touched)."""
    import json
    import urllib.request

    sys.path.insert(0, str(Path(__file__).parent))
    from bridge_procs import start_bridge

    ws = tmp_path / "ws"
    cmd = [sys.executable, "-m", "mlsql.cli", "device"]
    legacy = ws / "device"  # the store every device shared before
    legacy.mkdir(parents=True)
    (legacy / "telemetry.key").write_bytes(b"k" * 32)  # state of the old store that must carry over
    local, on_local = start_bridge(["serve", "--workspace", str(ws), "--name", "local", "--port", "0",
                                    "--token", "t"], tmp_path, "local", command=cmd)
    edge, on_edge = start_bridge(["serve", "--workspace", str(ws), "--name=edge-1", "--port", "0",
                                  "--token", "t"], tmp_path, "edge", command=cmd)
    try:
        # make lab's 'local' agent took the old shared store over; edge-1 has a store of its own
        assert (ws / "devices" / "local" / "telemetry.key").read_bytes() == b"k" * 32 and not legacy.exists()
        assert (ws / "devices" / "edge-1" / "telemetry.key").read_bytes() != b"k" * 32
        for proc, where, name in ((local, "local", "local"), (edge, "edge-1", "edge-1")):
            held = json.loads((ws / "devices" / where / "agent.lock").read_text())
            assert held["pid"] == proc.pid and held["name"] == name
        req = urllib.request.Request(on_edge[0]["url"] + "/v1/info", headers={"Authorization": "Bearer t"})
        assert json.load(urllib.request.urlopen(req, timeout=10))["name"] == "edge-1"

        second = subprocess.run([*cmd, "serve", "--workspace", str(ws), "--name", "edge-1", "--port", "0",
                                 "--token", "t"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"in use by agent 'edge-1' (pid {edge.pid}" in second.stderr, second.stderr
        assert edge.poll() is None  # the first one goes on serving
    finally:
        for p in (local, edge):
            p.terminate()
            p.wait(timeout=30)
    # a killed agent leaves no claim behind: the kernel dropped its flock with the process
    again, _ = start_bridge(["serve", "--workspace", str(ws), "--name", "edge-1", "--port", "0", "--token", "t"],
                            tmp_path, "again", command=cmd)
    again.terminate()
    again.wait(timeout=30)

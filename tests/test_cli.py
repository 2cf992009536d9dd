"""The mlsql command."""

from __future__ import annotations

import subprocess
import sys


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
    assert "31.0" in out.stdout


def test_run_failure_exits_nonzero_with_message(tmp_path):
    out = run("run", "-e", "SELECT 41 + 1 AS answer; SELECT * FROM missing_table", "--workspace", str(tmp_path / "ws"))
    assert out.returncode == 1
    assert "Statement 2" in out.stderr and "missing_table" in out.stderr
    assert "Traceback" not in out.stderr
    assert "answer" in out.stdout and "42" in out.stdout  # what ran before the failure is printed


def test_run_missing_file(tmp_path):
    out = run("run", str(tmp_path / "nope.sql"))
    assert out.returncode == 2 and "cannot read" in out.stderr

"""The example notebooks, executed for real with nbclient."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, tmp_path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    os.environ["MLSQL_HOME"] = str(tmp_path / "ws")
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("MLSQL_HOME", None)
    return nb


def outputs_text(cell) -> str:
    parts = []
    for o in cell.get("outputs", []):
        parts.append(o.get("text", ""))
        data = o.get("data", {})
        parts.append(data.get("text/plain", ""))
        parts.append(data.get("text/html", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_quickstart(tmp_path):
    nb = execute("01_quickstart.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    by_source = {c.source.split("\n")[-1][:60]: c for c in code}
    train = next(c for c in code if "CREATE OR REPLACE MODEL late_model" in c.source)
    assert "Created model late_model version 1" in outputs_text(train)
    assert "roc_auc" in outputs_text(train)
    show = next(c for c in code if c.source.strip() == "%mlsql SHOW MODELS")
    assert "late_model" in outputs_text(show)
    assert (tmp_path / "ws" / "catalog.duckdb").exists() and (tmp_path / "ws" / "mlflow.db").exists()
    assert by_source


@pytest.mark.slow
def test_export_notebook(tmp_path):
    nb = execute("03_export.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    # relative uris land in the workspace's exports folder, nothing beside the notebook
    for f in ("species_dnn.onnx", "species_dnn_int8.onnx", "species_dnn_int8.mlpkg", "species_dnn_fp16.onnx",
              "species_trees.onnx", "species_dnn.parity.json"):
        assert (tmp_path / "ws" / "exports" / f).exists(), f
    assert not [p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".mlpkg", ".json")]
    text = "\n".join(outputs_text(c) for c in nb.cells)
    assert "max_abs_diff" in text and "parity max diff" in text


@pytest.mark.slow
def test_deploy_notebook(tmp_path):
    nb = execute("04_deploy.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = "\n".join(outputs_text(c) for c in nb.cells)
    assert "Deployed species@1 to edge-1" in text and "Deployed species@2 to edge-1" in text
    assert "Rolled species back on edge-1" in text
    assert not [p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".mlpkg", ".json")]  # all in ws/


def _errors(nb) -> list:
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


@pytest.mark.slow
def test_notebooks_one_after_another_on_one_workspace(tmp_path):
    """01, 03 and 04 in turn, each in its own kernel, all on the same workspace."""
    import mlsql

    ws = tmp_path / "ws"
    for name in ("01_quickstart.ipynb", "03_export.ipynb", "04_deploy.ipynb"):
        cwd = tmp_path / name.split("_")[0]
        cwd.mkdir()
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        os.environ["MLSQL_HOME"] = str(ws)
        try:
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
        finally:
            os.environ.pop("MLSQL_HOME", None)
        assert not _errors(nb), (name, _errors(nb))
    s = mlsql.connect(ws)
    models = set(s.sql("SHOW MODELS").to_arrow().column("model").to_pylist())
    assert {"late_model", "species_dnn", "species"} <= models
    s.close()


@pytest.mark.slow
def test_notebooks_at_the_same_time_on_one_workspace(tmp_path):
    """01, 03 and 04 at once, in three kernels of three processes, on one workspace."""
    import subprocess
    import sys

    import mlsql

    ws = tmp_path / "ws"
    procs = {}
    for name in ("01_quickstart.ipynb", "03_export.ipynb", "04_deploy.ipynb"):
        cwd = tmp_path / name.split("_")[0]
        cwd.mkdir()
        (cwd / name).write_text((NOTEBOOKS / name).read_text())  # a kernel runs in its notebook's folder
        procs[name] = (cwd, subprocess.Popen(
            [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
             "--ExecutePreprocessor.timeout=900", "--ExecutePreprocessor.kernel_name=python3", str(cwd / name)],
            cwd=cwd, env={**os.environ, "MLSQL_HOME": str(ws)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    for name, (cwd, p) in procs.items():
        out, _ = p.communicate(timeout=1200)
        assert p.returncode == 0, (name, out[-3000:])
        nb = nbformat.read(cwd / name, as_version=4)
        assert not _errors(nb), (name, _errors(nb))
    s = mlsql.connect(ws)
    models = set(s.sql("SHOW MODELS").to_arrow().column("model").to_pylist())
    assert {"late_model", "species_dnn", "species"} <= models
    assert s.sql("SELECT count(*) FROM flights").scalar() == 336776
    s.close()


@pytest.mark.slow
def test_retrain_job_notebook_scheduled_against_a_local_agent(tmp_path):
    """notebooks/05 as a scheduled job: the scheduler process runs it twice; the first run deploys,
    the second retrains the same model and deploys only if it is better, which it is not."""
    import json
    import signal
    import subprocess
    import sys
    import time

    import mlsql

    ws = tmp_path / "ws"
    s = mlsql.connect(ws)
    pub = subprocess.run([sys.executable, "-m", "mlsql.cli", "device", "key", "--workspace", str(ws)],
                         capture_output=True, text=True, check=True).stdout.strip()
    ready = tmp_path / "agent.json"
    agent = subprocess.Popen([sys.executable, "-m", "device_bridge", "serve", "--name", "nightly", "--port", "0",
                              "--store", str(tmp_path / "device"), "--token", "t0k", "--trust", pub,
                              "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    sched = None
    try:
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.1)
        url = json.loads(ready.read_text())["devices"][0]["url"]
        s.sql(f"""CREATE JOB nightly_retrain OPTIONS (every = '4s', timeout = '5m',
                  parameters = {{'through_month': 3, 'device': 'nightly', 'device_url': '{url}', 'device_token': 't0k'}})
                  AS NOTEBOOK '{NOTEBOOKS / "06_retrain_job.ipynb"}'""")
        sched = subprocess.Popen([sys.executable, "-m", "mlsql.cli", "scheduler", "--workspace", str(ws)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        runs = []
        while time.time() < deadline:
            runs = s.sql("SELECT status, error, output_path FROM ML.JOB_RUNS('nightly_retrain') "
                         "WHERE status NOT IN ('running', 'skipped') ORDER BY start").to_arrow().to_pylist()
            if len(runs) >= 2:
                break
            time.sleep(1)
        assert len(runs) >= 2 and all(r["status"] == "succeeded" for r in runs[:2]), runs
        s.sql("ALTER JOB nightly_retrain PAUSE")
        first = nbformat.read(runs[0]["output_path"], as_version=4)
        second = nbformat.read(runs[1]["output_path"], as_version=4)
        assert "Deployed late_nightly@1 to nightly" in "\n".join(outputs_text(c) for c in first.cells)
        assert "Not deployed to nightly: late_nightly@2 has roc_auc" in "\n".join(outputs_text(c) for c in second.cells)
        info = s.sql("SHOW DEVICES").to_arrow().to_pylist()[0]
        assert info["models"] == ["late_nightly@1"]  # the device keeps the best model
    finally:
        if sched is not None:
            sched.send_signal(signal.SIGTERM)
            sched.wait(timeout=60)
        agent.kill()
        s.close()


# 02_spark.ipynb runs once per suite, in the browser (tests/ui/test_notebooks_browser.py, whose SHOWS
# lists what its outputs must say): it is the slowest notebook and nbclient would run the same cells.


@pytest.mark.slow
def test_closed_loop_notebook(tmp_path):
    """05_closed_loop: sampling on a real agent, late labels, online accuracy falling after the
    shift, skew on the shifted column only, an alert on a real webhook, a retrain on field data
    that is better on fresh traffic and goes to the device (the notebook asserts each step too)."""
    nb = execute("05_closed_loop.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = {c.source: outputs_text(c) for c in code}
    traffic = next(t for s, t in text.items() if s.startswith("def app("))
    assert traffic.count("{'recorded': 1000, 'unknown': 0}") == 2
    skew = next(t for s, t in text.items() if "-o skew" in s)
    assert "city" in skew and "L_INFTY" in skew
    deployed = next(t for s, t in text.items() if "DEPLOY MODEL late@champion" in s)
    assert "Deployed late@2 to phone-7 (version 2 active, previous 1)" in deployed


@pytest.mark.slow
def test_tune_and_compare_notebook(tmp_path):
    """notebooks/09: tuning draws its trials chart, ML.COMPARE_MODELS gives three rows best first whose
    r2 is scikit-learn's r2 of each model's predictions on the same TEST rows, and plot_trials draws."""
    from sklearn.metrics import r2_score

    import mlsql

    nb = execute("09_tune_and_compare.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    tune = next(c for c in code if "CREATE OR REPLACE MODEL mass_tuned" in c.source)
    assert "Tuned over 12 trials" in outputs_text(tune)
    assert any("image/png" in o.get("data", {}) for o in tune.outputs)  # the trials chart
    plot = next(c for c in code if "plot_trials" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)
    s = mlsql.connect(tmp_path / "ws")
    try:
        table = s.sql("SELECT * FROM ML.COMPARE_MODELS(['mass_default', 'mass_linear', 'mass_tuned'], "
                      "(SELECT * FROM pg WHERE split = 'TEST'))").to_arrow().to_pylist()
        assert sorted(r["model"] for r in table) == ["mass_default", "mass_linear", "mass_tuned"]
        assert [r["r2_score"] for r in table] == sorted((r["r2_score"] for r in table), reverse=True)
        for r in table:  # float64 sums in another order: rel 1e-9
            t = s.sql(f"SELECT body_mass_g, predicted_body_mass_g FROM ML.PREDICT(MODEL {r['model']}, "
                      "(SELECT * FROM pg WHERE split = 'TEST'))").to_arrow()
            assert r["r2_score"] == pytest.approx(r2_score(t.column(0).to_numpy(), t.column(1).to_numpy()), rel=1e-9)
    finally:
        s.close()


@pytest.mark.slow
def test_import_and_profile_notebook(tmp_path):
    """07: a torch CNN and an xgboost booster trained in the notebook, imported, quantized with SQL
    calibration, profiled, deployed to a local agent; the notebook's own asserts compare ML.PREDICT
    with torch by hand and the device's answers with the notebook's."""
    root = str(NOTEBOOKS.parent)  # this checkout's mlsql in the kernel, whatever is installed
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    try:
        nb = execute("07_import_and_profile.ipynb", tmp_path)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    assert not _errors(nb), _errors(nb)
    text = "\n".join(outputs_text(c) for c in nb.cells)
    assert "Imported model digits_cnn version 1 (torch)" in text and "Imported model digits_xgb" in text
    assert "quantize=int8_static" in text and "ORT format" in text
    assert "Deployed digits_cnn@1 to edge-7" in text and "same labels True" in text
    assert "CPUExecutionProvider" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))  # the bars
    assert (tmp_path / "ws" / "exports" / "digits_cnn_v1_int8_static.ort").exists()


@pytest.mark.slow
def test_forecast_notebook(tmp_path):
    nb = execute("08_forecast_and_cluster.ipynb", tmp_path)
    assert not _errors(nb), _errors(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    train = next(c for c in code if "CREATE OR REPLACE MODEL daily_flights" in c.source)
    assert "Created model daily_flights version 1 (arima_plus): 3 time series" in outputs_text(train)
    plot = next(c for c in code if "fill_between" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)  # the forecast chart was drawn
    mape = next(c for c in code if "seasonal_naive_mape" in c.source)
    assert "arima_plus_mape" in outputs_text(mape)
    # the cluster section: a kmeans model of the routes, each route in one of its 4 clusters, the scatter drawn
    km = next(c for c in code if "CREATE OR REPLACE MODEL route_clusters" in c.source)
    assert "Created model route_clusters version 1 (kmeans)" in outputs_text(km)
    scatter = next(c for c in code if "CENTROID_ID" in c.source and "scatter" in c.source)
    assert any("image/png" in o.get("data", {}) for o in scatter.outputs)
    import mlsql

    s = mlsql.connect(tmp_path / "ws")
    try:
        routes = s.sql("SELECT count(*) FROM routes").scalar()
        got = s.sql("SELECT CENTROID_ID AS c, count(*) AS n FROM ML.PREDICT(MODEL route_clusters, TABLE routes) "
                    "GROUP BY ALL").to_arrow().to_pylist()
        assert sorted(r["c"] for r in got) == [1, 2, 3, 4] and sum(r["n"] for r in got) == routes
    finally:
        s.close()


def test_experiment_notebook(tmp_path):
    """notebooks/11: an A/B experiment on two local agents; the readout finds arm B worse with p < 0.01, the
    promotion rule refuses it, and the stopped experiment keeps its readout (the notebook asserts each step)."""
    nb = execute("11_experiment.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    text = {c.source: outputs_text(c) for c in nb.cells if c.cell_type == "code"}
    assert next(t for s, t in text.items() if s.startswith('TOKEN = "demo-token"')).strip() == "6400"
    assert "not promoting m@2: accuracy delta -0.0" in next(t for s, t in text.items() if "error('not promoting" in s)
    shown = next(t for s, t in text.items() if "STOP EXPERIMENT ab" in s)
    assert "stopped" in shown and "m@2 (0.5)" in shown


@pytest.mark.slow
def test_device_features_notebook(tmp_path):
    """10_device_features: a feature view in SQL, trained on with ML.FEATURES_AT, deployed with its
    model to a real agent; events replayed to it; the agent's features and predictions equal the
    notebook's at every probe (the notebook asserts the mismatch count is 0), in a table and a plot."""
    nb = execute("10_device_features.ipynb", tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = {c.source: outputs_text(c) for c in code}
    deployed = next(t for s, t in text.items() if "DEPLOY MODEL next_purchases" in s)
    assert "next_purchases" in deployed and "phone-10" in deployed
    replay = next(t for s, t in text.items() if "def ask(" in s)
    assert "asked 300 probes" in replay
    summary = next(c for c in code if "total_mismatches" in c.source)
    table = outputs_text(summary)
    assert "last_category" in table and "predicted" in table
    plot = next(c for c in code if "plt.subplots" in c.source)
    assert any("image/png" in o.get("data", {}) for o in plot.outputs)  # the plot was drawn
    metrics = next(t for s, t in text.items() if "phone.metrics()" in s)
    assert "'events': " in metrics and "'keys': " in metrics

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
    for f in ("species_dnn.onnx", "species_dnn_int8.onnx", "species_dnn_int8.mlpkg", "species_dnn_fp16.onnx",
              "species_trees.onnx"):
        assert (tmp_path / f).exists(), f
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

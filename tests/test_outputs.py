"""What a cell shows, in a real kernel (jupyter_client, ``%load_ext mlsql``): charts and the
numbers behind them, browsable tables, number formatting, the training display, interrupts.
Plus the files and MLflow records a model leaves in the workspace."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow


class Kernel:
    """A real IPython kernel; ``run`` returns the outputs a saved notebook would hold for a cell
    (display updates applied in place, as the front end does)."""

    def __init__(self, km, kc):
        self.km, self.kc = km, kc

    def run(self, code: str, timeout: float = 300, interrupt_after: float | None = None) -> list[dict]:
        msg_id = self.kc.execute(code)
        outputs: list[dict] = []
        by_display: dict[str, int] = {}
        t0 = time.time()
        interrupted = False
        while True:
            if interrupt_after is not None and not interrupted and time.time() - t0 > interrupt_after:
                self.km.interrupt_kernel()
                interrupted = True
            if time.time() - t0 > timeout:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code[:80]}")
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                return outputs
            if kind in ("display_data", "execute_result", "stream", "error"):
                out = {"output_type": kind, **content}
                did = content.get("transient", {}).get("display_id")
                if did:
                    by_display[did] = len(outputs)
                outputs.append(out)
            elif kind == "update_display_data":
                did = content.get("transient", {}).get("display_id")
                if did in by_display:
                    outputs[by_display[did]] = {"output_type": "display_data", **content}

    def value(self, expr: str):
        """A JSON-able Python value computed in the kernel."""
        outs = self.run(f"import json as _j; print(_j.dumps({expr}, default=float))")
        text = "".join(o.get("text", "") for o in outs if o["output_type"] == "stream")
        errors = [o for o in outs if o["output_type"] == "error"]
        assert not errors, errors
        return json.loads(text)


def _errors(outs):
    return [o for o in outs if o["output_type"] == "error"]


def _images(outs) -> list[dict]:
    return [o["data"] for o in outs if "image/png" in o.get("data", {})]


def _decode_png(b64: str):
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    from jupyter_client.manager import start_new_kernel

    home = tmp_path_factory.mktemp("outputs")
    env = {**os.environ, "MLSQL_HOME": str(home / "ws"), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    km, kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(home))
    k = Kernel(km, kc)
    try:
        outs = k.run("%load_ext mlsql\nimport mlsql.datasets\nmlsql.datasets.load('penguins')")
        assert not _errors(outs), outs
        yield k
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def trained(kernel):
    """A binary xgboost classifier (is the penguin an Adelie?) and a DNN, trained in the kernel."""
    outs = kernel.run("""%%mlsql
CREATE OR REPLACE MODEL adelie OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['adelie'],
    data_split_method = 'random', data_split_eval_fraction = 0.3, max_iterations = 15)
AS SELECT island, bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g, sex, species = 'Adelie' AS adelie
   FROM penguins""")
    assert not _errors(outs), outs
    return outs


def test_create_model_shows_a_finished_bar_line_and_the_final_loss_curve(kernel, trained):
    texts = [o["data"].get("text/plain", "") for o in trained if "data" in o]
    # the widget was replaced by one line: a saved notebook holds no widget view
    assert not [o for o in trained if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert any(t.startswith("✔ Trained adelie:") for t in texts), texts
    imgs = _images(trained)
    assert len(imgs) == 1 and imgs[0]["text/plain"].startswith("Loss by iteration")
    img = _decode_png(imgs[0]["image/png"])
    assert img.size[0] > 200 and img.size[1] > 150
    loss = kernel.value("list(map(float, _.plots[0].series['training rows']))")
    kernel.run("ti0 = %mlsql SELECT loss FROM ML.TRAINING_INFO(MODEL adelie) ORDER BY iteration")
    assert loss == kernel.value("ti0.to_arrow().column('loss').to_pylist()") and len(loss) >= 2


def test_evaluate_shows_roc_and_confusion_matrix_with_their_numbers(kernel, trained):
    outs = kernel.run("r = %mlsql SELECT * FROM ML.EVALUATE(MODEL adelie, "
                      "(SELECT *, species = 'Adelie' AS adelie FROM penguins))\nr")
    assert not _errors(outs), outs
    html = next(o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {}))
    assert "roc_auc" in html
    imgs = _images(outs)
    assert len(imgs) == 1
    _decode_png(imgs[0]["image/png"])
    assert "ROC curve" in imgs[0]["text/plain"] and "Confusion matrix" in imgs[0]["text/plain"]
    roc = kernel.value("{'fpr': list(r.plots[0].curves[0].false_positive_rate), "
                       "'tpr': list(r.plots[0].curves[0].true_positive_rate), 'auc': r.plots[0].curves[0].auc, "
                       "'metric': r.to_arrow().column('roc_auc')[0].as_py(), "
                       "'cm': r.plots[1].counts.tolist(), 'classes': r.plots[1].classes}")
    fpr, tpr = np.array(roc["fpr"]), np.array(roc["tpr"])
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()  # a ROC curve never turns back
    assert roc["auc"] == pytest.approx(roc["metric"], abs=1e-12)
    assert roc["auc"] == pytest.approx(np.trapezoid(tpr, fpr), abs=1e-12)
    assert roc["classes"] == [False, True]
    assert np.array(roc["cm"]).sum() == 344  # every penguin has a known label
    # the evaluation rows kept at training time give ML.EVALUATE(MODEL m) its charts too
    outs = kernel.run("%mlsql SELECT * FROM ML.EVALUATE(MODEL adelie)")
    assert len(_images(outs)) == 1


def test_roc_curve_and_confusion_matrix_functions_draw_their_rows(kernel, trained):
    q = "(SELECT *, species = 'Adelie' AS adelie FROM penguins)"
    outs = kernel.run(f"rc = %mlsql SELECT * FROM ML.ROC_CURVE(MODEL adelie, {q})\nrc")
    assert not _errors(outs) and _images(outs) and _images(outs)[0]["text/plain"].startswith("ROC curve: AUC")
    drawn = kernel.value("[list(map(float, rc.plots[0].curves[0].false_positive_rate)), "
                         "list(map(float, rc.plots[0].curves[0].true_positive_rate))]")
    rows = kernel.value("sorted(zip(rc.to_arrow().column('false_positive_rate').to_pylist(), "
                        "rc.to_arrow().column('recall').to_pylist()))")
    assert sorted(zip(*drawn))[1:-1] == [tuple(r) for r in rows]  # plus the (0, 0) and (1, 1) ends
    outs = kernel.run(f"cm = %mlsql SELECT * FROM ML.CONFUSION_MATRIX(MODEL adelie, {q})\ncm")
    assert _images(outs) and "Confusion matrix" in _images(outs)[0]["text/plain"]
    assert kernel.value("cm.plots[0].counts.tolist()") == kernel.value(
        "[[r['false'], r['true']] for r in cm.to_arrow().rename_columns(['e', 'false', 'true']).to_pylist()]")


def test_feature_importance_bars_are_its_values(kernel, trained):
    outs = kernel.run("fi = %mlsql SELECT * FROM ML.FEATURE_IMPORTANCE(MODEL adelie)\nfi")
    assert not _errors(outs)
    assert len(_images(outs)) == 1 and "Feature importance" in _images(outs)[0]["text/plain"]
    got = kernel.value("dict(zip(fi.plots[0].names, map(float, fi.plots[0].values)))")
    want = kernel.value("dict(zip(fi.to_arrow().column('feature').to_pylist(), "
                        "fi.to_arrow().column('importance_gain').to_pylist()))")
    assert got == want
    order = kernel.value("list(map(float, fi.plots[0].values))")
    assert order == sorted(order, reverse=True)


def test_explain_predict_bars_and_training_info_curve(kernel, trained):
    outs = kernel.run("ex = %mlsql SELECT * FROM ML.EXPLAIN_PREDICT(MODEL adelie, "
                      "(SELECT * FROM penguins WHERE bill_length_mm IS NOT NULL LIMIT 1), STRUCT(4 AS top_k_features))\nex")
    assert not _errors(outs) and len(_images(outs)) == 1
    bars = kernel.value("dict(zip(ex.plots[0].names, map(float, ex.plots[0].values)))")
    row = kernel.value("{d['feature']: d['attribution'] for d in "
                       "ex.to_arrow().column('top_feature_attributions')[0].as_py()}")
    assert bars == pytest.approx(row) and len(bars) == 4
    outs = kernel.run("ti = %mlsql SELECT * FROM ML.TRAINING_INFO(MODEL adelie)\nti")
    assert len(_images(outs)) == 1
    curve = kernel.value("list(map(float, ti.plots[0].series['training rows']))")
    assert curve == kernel.value("ti.to_arrow().column('loss').to_pylist()")
    # --no-plot: the table only
    outs = kernel.run("%%mlsql --no-plot\nSELECT * FROM ML.TRAINING_INFO(MODEL adelie)")
    assert not _images(outs) and any("text/html" in o.get("data", {}) for o in outs)
    outs = kernel.run("%config MLSQLMagic.plots = False\n%mlsql SELECT * FROM ML.TRAINING_INFO(MODEL adelie)")
    assert not _images(outs)
    kernel.run("%config MLSQLMagic.plots = True")


def test_a_long_result_pages_and_sorts_in_the_kernel(kernel):
    outs = kernel.run("big = %mlsql SELECT i, (i * 7919) % 1000 AS v, 'row ' || i AS s FROM range(1000) t(i)\nbig")
    assert not _errors(outs)
    data = next(o["data"] for o in outs if "text/html" in o.get("data", {}))
    assert "application/vnd.jupyter.widget-view+json" in data  # the browsable table
    assert "1,000 rows × 3 columns, showing 1–10" in data["text/html"]  # and its static fallback
    assert data["text/html"].count("<tr>") == 1 + 10 + 1
    page = kernel.value("(lambda w: (setattr(w, 'sort_by', 'v'), setattr(w, 'descending', True), "
                        "setattr(w, 'page', 1), w.rows)[-1])(big.pager(10))")
    assert [r[1] for r in page] == [str(v) for v in range(989, 979, -1)]
    assert [int(r[0]) * 7919 % 1000 for r in page] == list(range(989, 979, -1))
    # headless runs can ask for static tables
    outs = kernel.run("%config MLSQLMagic.pager = False\n%mlsql SELECT * FROM range(1000)")
    data = next(o["data"] for o in outs if "text/html" in o.get("data", {}))
    assert "application/vnd.jupyter.widget-view+json" not in data and "showing 1–10" in data["text/html"]
    kernel.run("%config MLSQLMagic.pager = True")


def test_reports_whole_numbers_alike_json_bounded(kernel, trained):
    outs = kernel.run("d = %mlsql DESCRIBE MODEL adelie\nd")
    html = next(o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {}))
    n = kernel.value("len(d)")
    assert n > 10 and html.count("<tr>") == 1 + n  # every property, no "…"
    outs = kernel.run("%mlsql SELECT * FROM (VALUES (1546283.7::DOUBLE), (1632661.0), (857076)) t(x)")
    text = next(o["data"]["text/plain"] for o in outs if "data" in o)
    assert "1546284" in text and "1632661" in text and "857076" in text
    assert "e+" not in text and "1632661.0" not in text
    outs = kernel.run("%mlsql SELECT '{\"p50_ms\": 1.5, \"providers\": [\"cpu\"], \"inputs\": {\"a\": 1, \"b\": 2}}' AS j")
    html = next(o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {}))
    assert "max-height:9em" in html and "&quot;providers&quot;: [" in html


def test_dnn_early_stop_ends_as_a_finished_run(kernel):
    outs = kernel.run("""%%mlsql
CREATE OR REPLACE MODEL species_dnn OPTIONS (model_type = 'dnn_classifier', input_label_cols = ['species'],
    hidden_units = [16], max_iterations = 200, batch_size = 32, learn_rate = 0.05, data_split_method = 'random',
    data_split_eval_fraction = 0.3)
AS SELECT island, bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g, species FROM penguins""")
    assert not _errors(outs), outs
    lines = [o["data"]["text/plain"] for o in outs if "data" in o and o["data"].get("text/plain", "").startswith("✔")]
    assert len(lines) == 1 and "stopped early at epoch" in lines[0] and "/200" in lines[0], lines
    assert "no improvement" in lines[0]
    # quantizing it: ONNX Runtime's "consider pre-processing" warning is logged, not shown in red
    outs = kernel.run("%mlsql EXPORT MODEL species_dnn OPTIONS (quantize = 'int8')")
    assert not _errors(outs)
    streams = "".join(o.get("text", "") for o in outs if o["output_type"] == "stream")
    assert "pre-processing" not in streams and "WARNING" not in streams, streams
    html = next(o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {}))
    assert "Exported species_dnn@1" in html and "max_abs_diff" in html and "latency_ms" in html


def test_interrupted_training_says_what_was_kept(kernel, trained):
    kernel.run("%mlsql CREATE TABLE big_train AS SELECT random() AS a, random() AS b, random() AS c, "
               "random() > 0.5 AS y FROM range(400000)")
    outs = kernel.run("""%%mlsql
CREATE OR REPLACE MODEL adelie OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['y'],
    max_iterations = 3000, early_stop = FALSE, max_tree_depth = 10)
AS SELECT * FROM big_train""", interrupt_after=6, timeout=120)
    # IPython prints a UsageError as one line on stderr: no error box, no traceback
    shown = "".join(o.get("text", "") for o in outs if o["output_type"] == "stream")
    shown += "".join(o["ename"] + o["evalue"] + "".join(o["traceback"]) for o in _errors(outs))
    assert "UsageError: Interrupted" in shown and "no half-trained model is registered" in shown, outs
    for name in ("magic.py", "session.py", "xgboost", "Traceback"):
        assert name not in shown
    lines = [o["data"]["text/plain"] for o in outs if "data" in o and o["data"].get("text/plain", "").startswith("✖")]
    assert lines and "interrupted" in lines[0] and "nothing was registered" in lines[0]
    # the earlier version is intact and still the latest
    kernel.run("sm = %mlsql SHOW MODELS")
    assert kernel.value("[r['latest_version'] for r in sm.to_arrow().to_pylist() if r['model'] == 'adelie']") == [1]


# -- files and MLflow records (no kernel needed) ------------------------------------------------------
@pytest.fixture(scope="module")
def penguin_session(tmp_path_factory):
    import mlsql
    import mlsql.datasets

    home = tmp_path_factory.mktemp("records")
    s = mlsql.connect(home / "ws")
    mlsql.datasets.load("penguins", session=s)
    s.sql("""CREATE MODEL species_rec OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'],
             max_iterations = 30, early_stop = FALSE)
             AS SELECT island, bill_length_mm, flipper_length_mm, sex, species FROM penguins""")
    yield s, home
    s.close()


def test_a_version_carries_its_signature_and_links_its_run(penguin_session):
    import mlflow.models

    s, _ = penguin_session
    mv = s.registry.get("species_rec")
    sig = mlflow.models.Model.load(str(s.registry.local_path(mv) / "MLmodel")).signature
    assert sig is not None
    assert sig.inputs.input_names() == ["island", "bill_length_mm", "flipper_length_mm", "sex"]
    assert sig.outputs.input_names() == ["predicted_species", "predicted_species_probs"]
    run = s.registry.client.get_run(mv.run_id)
    assert run.data.tags["mlsql.model_version"] == "species_rec@1"
    assert run.data.tags["mlsql.model_uri"] == "models:/species_rec/1"
    assert mv.source.endswith("/model") and mv.run_id == run.info.run_id
    # the run spans the training: at least the iterations' own time
    trained_ms = sum(s.sql("SELECT duration_ms FROM ML.TRAINING_INFO(MODEL species_rec)").to_arrow()
                     .column(0).to_pylist())
    assert run.info.end_time - run.info.start_time >= trained_ms * 0.95
    assert run.info.status == "FINISHED"


def test_exports_land_in_the_workspace(penguin_session):
    s, home = penguin_session
    exports = s.workspace.exports_dir
    r = s.sql("EXPORT MODEL species_rec")
    assert r.export.path == exports / "species_rec_v1.onnx" and r.export.path.exists()
    assert (exports / "species_rec_v1.parity.json").exists()
    r = s.sql("EXPORT MODEL species_rec OPTIONS (uri = 'mine/species.onnx', package = TRUE)")
    assert r.export.path == exports / "mine" / "species.onnx"
    assert (exports / "mine" / "species.mlpkg").exists() and (exports / "mine" / "species.parity.json").exists()
    absolute = home / "elsewhere" / "s.onnx"
    r = s.sql(f"EXPORT MODEL species_rec OPTIONS (uri = '{absolute}')")
    assert r.export.path == absolute and absolute.exists()
    assert not list(home.glob("*.onnx")) and not list(__import__("pathlib").Path.cwd().glob("species*.onnx"))

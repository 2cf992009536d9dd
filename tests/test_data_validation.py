"""ML.VALIDATE_DATA_SKEW, ML.VALIDATE_DATA_DRIFT and ML.DESCRIBE_DATA against a hand computation.

The data are drawn here with a fixed seed: serving rows where `x` is shifted by one standard
deviation and `cat` has another mix, while `z` and `dog` are fresh draws from the training
distributions. Expected values are computed from the rows themselves with numpy, pyarrow and
scipy (`scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2`: scipy returns the distance, the
square root of the divergence BigQuery ML reports), never from MLSQL's statistics; the only thing
taken from the model is its stored bin edges, which are checked first to be numpy's
`linspace(min, max, 11)` of the training column.

Tolerances: each value is a sum of at most a dozen float64 terms (bins, categories) taken in
another order, with log2 from another library: ~1e-15 relative; `rel=1e-9` is far from it and far
below any difference a wrong bin, base or norm makes (those move values by more than 1e-3)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from scipy.spatial.distance import jensenshannon

N = 4000
REL = 1e-9  # float64 sums of <= 12 terms in another order (see the module's docstring)


def _rows(rng, n, *, x_mean, cat_p):
    z = rng.normal(5, 2, n)
    z[rng.random(n) < 0.05] = np.nan  # some NULLs: they are left out of both distributions
    return pa.table({
        "x": rng.normal(0, 1, n) + x_mean,
        "z": pa.array(z, from_pandas=True),
        "k": rng.integers(0, 4, n),  # zeros for DESCRIBE_DATA's num_zeros
        "cat": rng.choice(["a", "b", "c"], n, p=cat_p),
        "dog": rng.choice(["p", "q", "r", "s"], n, p=[0.4, 0.3, 0.2, 0.1]),
        "y": rng.normal(0, 1, n),
    })


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import mlsql

    rng = np.random.default_rng(24)
    s = mlsql.connect(tmp_path_factory.mktemp("validate") / "ws")
    train = _rows(rng, N, x_mean=0.0, cat_p=[0.5, 0.3, 0.2])
    serve = _rows(rng, N, x_mean=1.0, cat_p=[0.2, 0.3, 0.5])  # x: +1 std; cat: another mix
    same = _rows(rng, N, x_mean=0.0, cat_p=[0.5, 0.3, 0.2])  # a fresh draw, nothing shifted
    for name, t in (("train", train), ("serve", serve), ("same", same)):
        s.register(f"{name}_df", t)
        s.sql(f"CREATE TABLE {name} AS SELECT * FROM {name}_df")
    s.sql("""CREATE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y'])
             AS SELECT x, z, k, cat, dog, y FROM train""")
    yield s, {"train": train, "serve": serve, "same": same}
    s.close()


def _values(col) -> np.ndarray:
    x = col.to_numpy(zero_copy_only=False).astype(float)
    return x[~np.isnan(x)]


def _binned(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """[below edges[0], numpy's histogram over edges (last bin closed), above edges[-1]]."""
    inside = np.histogram(x[(x >= edges[0]) & (x <= edges[-1])], bins=edges)[0]
    return np.concatenate([[(x < edges[0]).sum()], inside, [(x > edges[-1]).sum()]])


def _shares(col, categories) -> np.ndarray:
    vc = {d["values"]: d["counts"] for d in pc.value_counts(col.drop_null()).to_pylist()}
    n = sum(vc.values())
    return np.array([vc.get(c, 0) / n for c in categories])


def _by_input(table) -> dict:
    return {r["input"]: r for r in table.to_pylist()}


def _expected_numeric(base, study, bins):
    b, s = _values(base), _values(study)
    edges = np.linspace(b.min(), b.max(), bins + 1)
    return jensenshannon(_binned(b, edges), _binned(s, edges), base=2) ** 2, edges


def test_skew_equals_the_hand_computation_and_flags_only_the_shifted_columns(ws):
    s, data = ws
    train, serve = data["train"], data["serve"]
    hist = s.model("m").meta["training_stats"]["x"]["histogram"]
    want_x, edges = _expected_numeric(train.column("x"), serve.column("x"), 10)
    assert hist["edges"] == edges.tolist()  # numpy's linspace of the training min and max, to the bit
    assert hist["counts"] == np.histogram(_values(train.column("x")), bins=edges)[0].tolist()

    got = _by_input(s.sql("""SELECT * FROM ML.VALIDATE_DATA_SKEW(MODEL m, TABLE serve,
                             STRUCT(0.1 AS numerical_default_threshold))""").to_arrow())
    assert list(got) == ["x", "z", "k", "cat", "dog"]  # the model's inputs, not the label
    assert got["x"]["metric"] == "JENSEN_SHANNON_DIVERGENCE"
    assert got["x"]["value"] == pytest.approx(want_x, rel=REL)
    want_z, _ = _expected_numeric(train.column("z"), serve.column("z"), 10)
    assert got["z"]["value"] == pytest.approx(want_z, rel=REL)
    for col in ("cat", "dog"):
        cats = ["a", "b", "c"] if col == "cat" else ["p", "q", "r", "s"]
        want = np.abs(_shares(train.column(col), cats) - _shares(serve.column(col), cats)).max()
        assert got[col]["metric"] == "L_INFTY" and got[col]["value"] == pytest.approx(want, rel=REL)
    assert got["x"]["value"] > 0.1 and got["cat"]["value"] > 0.25  # the shifts are large
    assert {c for c, r in got.items() if r["is_anomaly"]} == {"x", "cat"}
    assert got["x"]["threshold"] == 0.1 and got["cat"]["threshold"] == 0.3  # the default


def test_no_anomaly_without_a_shift(ws):
    s, data = ws
    got = _by_input(s.sql("SELECT * FROM ML.VALIDATE_DATA_SKEW(MODEL m, TABLE same)").to_arrow())
    assert not any(r["is_anomaly"] for r in got.values()) and all(0 < r["value"] < 0.05 for r in got.values())
    own = _by_input(s.sql("SELECT * FROM ML.VALIDATE_DATA_SKEW(MODEL m, (SELECT * FROM train))").to_arrow())
    assert all(r["value"] == 0 for r in own.values())  # the training rows are their own baseline


def test_categorical_jensen_shannon_and_per_column_thresholds(ws):
    s, data = ws
    got = _by_input(s.sql("""SELECT * FROM ML.VALIDATE_DATA_SKEW(MODEL m, TABLE serve,
        STRUCT('JENSEN_SHANNON_DIVERGENCE' AS categorical_metric_type, [('dog', 0.0), ('X', 0.5)] AS thresholds))""")
                    .to_arrow())
    cats = ["a", "b", "c"]
    want = jensenshannon(_shares(data["train"].column("cat"), cats), _shares(data["serve"].column("cat"), cats),
                         base=2) ** 2
    assert got["cat"]["metric"] == "JENSEN_SHANNON_DIVERGENCE" and got["cat"]["value"] == pytest.approx(want, rel=REL)
    assert got["dog"]["threshold"] == 0.0 and got["dog"]["is_anomaly"]  # any difference passes 0
    assert got["x"]["threshold"] == 0.5 and not got["x"]["is_anomaly"]  # names match as SQL does: any case


def test_drift_bins_the_base_rows_and_compares_the_common_columns(ws):
    s, data = ws
    got = _by_input(s.sql("""SELECT * FROM ML.VALIDATE_DATA_DRIFT(TABLE serve, (SELECT x, cat, y FROM train),
                             STRUCT(8 AS num_histogram_buckets))""").to_arrow())
    assert list(got) == ["x", "cat", "y"]
    for col in ("x", "y"):  # the first input is the baseline: its bins, 8 of them
        want, _ = _expected_numeric(data["serve"].column(col), data["train"].column(col), 8)
        assert got[col]["value"] == pytest.approx(want, rel=REL)
    cats = ["a", "b", "c"]
    want = np.abs(_shares(data["serve"].column("cat"), cats) - _shares(data["train"].column("cat"), cats)).max()
    assert got["cat"]["value"] == pytest.approx(want, rel=REL)
    assert {c for c, r in got.items() if r["is_anomaly"]} == {"cat"}  # x's 0.16 is under the default 0.3


def test_describe_data_against_numpy_and_pyarrow(ws):
    s, data = ws
    t = data["train"]
    got = {r["name"]: r for r in s.sql(
        "SELECT * FROM ML.DESCRIBE_DATA(TABLE train, STRUCT(4 AS num_quantiles, 2 AS top_k))").to_arrow().to_pylist()}
    assert list(got) == t.column_names
    z = _values(t.column("z"))
    r = got["z"]
    assert (r["num_rows"], r["num_nulls"], r["num_values"]) == (N, t.column("z").null_count, len(z))
    assert r["num_nulls"] > 100
    assert r["mean"] == pytest.approx(z.mean(), rel=REL) and r["stddev"] == pytest.approx(z.std(ddof=1), rel=REL)
    assert r["median"] == pytest.approx(np.median(z), rel=REL)
    # DuckDB's quantile_cont and numpy's 'linear' method interpolate alike between the same two values
    assert r["quantiles"] == pytest.approx(np.quantile(z, [0, .25, .5, .75, 1]), rel=REL)
    assert (r["min"], r["max"]) == (str(z.min()), str(z.max()))
    assert r["unique"] == len(np.unique(z)) and r["top_values"] is None
    k = t.column("k").to_numpy()
    assert got["k"]["num_zeros"] == int((k == 0).sum()) > 0 and got["k"]["min"] == "0"
    cat = got["dog"]
    vc = sorted(pc.value_counts(t.column("dog")).to_pylist(), key=lambda d: -d["counts"])
    assert cat["top_values"] == [{"value": d["values"], "count": d["counts"]} for d in vc[:2]]
    assert cat["unique"] == 4 and cat["mean"] is None and cat["num_zeros"] is None
    assert cat["avg_string_length"] == 1.0 and (cat["min"], cat["max"]) == ("p", "s")


@pytest.mark.parametrize("settings, message", [
    ("STRUCT('L_2' AS categorical_metric_type)", "categorical_metric_type = 'L_2' is not one of"),
    ("STRUCT('L_INFTY' AS numerical_metric_type)", "numerical_metric_type = 'L_INFTY' is not one of"),
    ("STRUCT(0.3 AS numeric_default_threshold)", "numeric_default_threshold"),
    ("STRUCT(1.5 AS categorical_default_threshold)", "categorical_default_threshold = 1.5 must be a number in [0, 1)"),
    ("STRUCT([('nope', 0.1)] AS thresholds)", "thresholds names column 'nope'"),
    ("STRUCT([('x', 2)] AS thresholds)", "threshold of column 'x' must be a number in [0, 1)"),
])
def test_bad_settings_name_what_is_wrong(ws, settings, message):
    from mlsql.errors import MLSQLError

    s, _ = ws
    with pytest.raises(MLSQLError, match=None) as err:
        s.sql(f"SELECT * FROM ML.VALIDATE_DATA_SKEW(MODEL m, TABLE serve, {settings})")
    assert message in str(err.value), str(err.value)


def test_a_model_without_histograms_says_to_retrain(ws):
    from mlsql.errors import MLSQLError

    s, _ = ws
    s.sql("CREATE MODEL old OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) AS SELECT x, y FROM train")
    s.sql("SELECT * FROM ML.VALIDATE_DATA_SKEW(MODEL old, TABLE serve)")  # loaded once, then aged in place
    lm = next(v for (name, _), v in s.loaded_models.items() if name == "old")
    del lm.meta["training_stats"]["x"]["histogram"]  # as stored by a version before histograms
    with pytest.raises(MLSQLError, match=r"old@1 was trained before MLSQL stored histograms .*\(x\)") as err:
        s.sql("SELECT * FROM ML.VALIDATE_DATA_SKEW(MODEL old, TABLE serve)")
    assert "CREATE OR REPLACE MODEL old" in err.value.hint


def test_spark_gives_duckdbs_values(spark_ws, shared_ws):
    pytest.importorskip("pyspark")
    body = """OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'], max_iterations = 3)
              AS SELECT island, species, bill_length_mm, flipper_length_mm, body_mass_g FROM penguins"""
    spark_ws.sql(f"CREATE OR REPLACE MODEL skew_on_spark {body}")
    shared_ws.sql(f"CREATE OR REPLACE MODEL skew_on_duckdb {body}")
    serving = ("(SELECT island, species, bill_length_mm + 10 AS bill_length_mm, flipper_length_mm FROM penguins "
               "WHERE sex = 'female')")
    queries = {
        "skew": "SELECT * FROM ML.VALIDATE_DATA_SKEW(MODEL {m}, " + serving + ")",
        "drift": "SELECT * FROM ML.VALIDATE_DATA_DRIFT(TABLE penguins, " + serving + ")",
        "describe": "SELECT * FROM ML.DESCRIBE_DATA(TABLE penguins, STRUCT(4 AS num_quantiles, 3 AS top_k))",
    }
    for what, q in queries.items():
        a = spark_ws.sql(q.format(m="skew_on_spark")).to_arrow().to_pylist()
        b = shared_ws.sql(q.format(m="skew_on_duckdb")).to_arrow().to_pylist()
        assert len(a) == len(b) > 3, what
        for ra, rb in zip(a, b, strict=True):
            for key, va in ra.items():
                vb = rb[key]
                if isinstance(va, float):  # float64 sums in another order (Spark's partitions): ~1e-16 each
                    assert va == pytest.approx(vb, rel=1e-9), (what, key, ra)
                elif isinstance(va, list) and va and isinstance(va[0], float):
                    assert va == pytest.approx(vb, rel=1e-9), (what, key, ra)
                elif key not in ("min", "max") or not isinstance(va, str) or "." not in va:
                    assert va == vb, (what, key, ra, rb)
        if what != "describe":
            assert {r["input"] for r in a if r["is_anomaly"]} >= {"bill_length_mm"}, what

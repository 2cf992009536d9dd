"""What a user sees when they get something wrong: what, where, and the nearest right name."""

from __future__ import annotations

import pytest

from mlsql.errors import (
    MLSQLError,
    OptionError,
    ParseError,
    UnknownColumnError,
    UnknownModelError,
    UnknownOptionError,
    UnknownTableError,
)

LINREG = "OPTIONS (model_type = 'linear_reg', input_label_cols = ['y'])"


@pytest.fixture
def s(session):
    session.sql("CREATE TABLE data AS SELECT range::DOUBLE AS x, range % 2 = 0 AS flag, range * 2.0 AS y, "
                "CASE WHEN range % 3 = 0 THEN 'a' ELSE 'b' END AS cat FROM range(60)")
    session.sql(f"CREATE MODEL good {LINREG} AS SELECT x, y FROM data")
    return session


def err(s, sql, cls=MLSQLError):
    with pytest.raises(cls) as info:
        s.sql(sql)
    return str(info.value)


def test_parse_error_has_line_column_and_caret(s):
    msg = err(s, "SELECT 1;\nSELECT 2;\nCREATE MODEL m OPTIONS (model_type = 'linear_reg') AS", ParseError)
    assert "Line 3" in msg and "Col:" in msg and "^" in msg


def test_unknown_table_suggests(s):
    msg = err(s, "SELECT * FROM dta", UnknownTableError)
    assert "dta" in msg and "Did you mean 'data'?" in msg


def test_duckdb_error_line_is_script_line(s):
    msg = err(s, "SELECT 1;\n\nSELECT nope_col FROM data")
    assert "Statement 2 (line 3)" in msg and "LINE 3" in msg and "nope_col" in msg


def test_unknown_model_suggests(s):
    msg = err(s, "SELECT * FROM ML.PREDICT(MODEL goood, TABLE data)", UnknownModelError)
    assert "goood" in msg and "Did you mean 'good'?" in msg


def test_unknown_version_and_alias(s):
    assert "no version 7" in err(s, "SELECT * FROM ML.PREDICT(MODEL good@7, TABLE data)")
    assert "no alias 'champion'" in err(s, "SELECT * FROM ML.PREDICT(MODEL good@champion, TABLE data)")


def test_unknown_option_suggests(s):
    msg = err(s, "CREATE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y'], max_iteration = 3) "
                 "AS SELECT x, y FROM data", UnknownOptionError)
    assert "max_iteration" in msg and "max_iterations" in msg


def test_bad_option_value(s):
    msg = err(s, "CREATE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y'], "
                 "data_split_method = 'sideways') AS SELECT x, y FROM data", OptionError)
    assert "data_split_method" in msg and "sideways" in msg


def test_unknown_model_type(s):
    msg = err(s, "CREATE MODEL m OPTIONS (model_type = 'boosted_tree_clasifier', input_label_cols = ['y']) "
                 "AS SELECT x, y FROM data")
    assert "boosted_tree_clasifier" in msg and "boosted_tree_classifier" in msg


def test_missing_label_column(s):
    msg = err(s, "CREATE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['z']) AS SELECT x, y FROM data")
    assert "'z'" in msg


def test_existing_model_needs_or_replace(s):
    msg = err(s, f"CREATE MODEL good {LINREG} AS SELECT x, y FROM data")
    assert "already exists" in msg and "CREATE OR REPLACE MODEL good" in msg


def test_predict_input_missing_a_feature(s):
    msg = err(s, "SELECT * FROM ML.PREDICT(MODEL good, (SELECT x AS xx FROM data))", UnknownColumnError)
    assert "'x'" in msg and "good@1" in msg and "Did you mean 'xx'?" in msg


def test_evaluate_input_without_label(s):
    msg = err(s, "SELECT * FROM ML.EVALUATE(MODEL good, (SELECT x FROM data))", UnknownColumnError)
    assert "label column 'y'" in msg


def test_predict_without_input(s):
    msg = err(s, "SELECT * FROM ML.PREDICT(MODEL good)")
    assert "needs input rows" in msg


def test_transform_item_needs_a_name(s):
    msg = err(s, f"CREATE MODEL t TRANSFORM (x * 2, y) {LINREG} AS SELECT x, y FROM data")
    assert "TRANSFORM item 1" in msg and "AS some_name" in msg


def test_unknown_transform_function(s):
    msg = err(s, f"CREATE MODEL t TRANSFORM (ML.STANDARD_SCALAR(x) OVER () AS xs, y) {LINREG} AS SELECT x, y FROM data")
    assert "ML.STANDARD_SCALAR" in msg and "ML.STANDARD_SCALER" in msg


def test_transform_unknown_column(s):
    msg = err(s, f"CREATE MODEL t TRANSFORM (ML.STANDARD_SCALER(xx) OVER () AS xs, y) {LINREG} AS SELECT x, y FROM data",
              UnknownColumnError)
    assert "xx" in msg and "Did you mean 'x'?" in msg


def test_unknown_variable(s):
    msg = err(s, "SELECT ${threshold}")
    assert "threshold" in msg


def test_empty_training_data(s):
    msg = err(s, f"CREATE MODEL e {LINREG} AS SELECT x, y FROM data WHERE x < 0")
    assert "no rows" in msg


def test_unknown_engine():
    import mlsql

    with pytest.raises(MLSQLError, match="Unknown engine 'sparkk'"):
        mlsql.connect(engine="sparkk")


def test_drop_unknown_model(s):
    msg = err(s, "DROP MODEL godo", UnknownModelError)
    assert "Did you mean 'good'?" in msg


def test_errors_leave_nothing_half_done(s):
    """After all the errors above, the model and table are still there and usable."""
    for bad in ("SELECT * FROM dta", "SELECT * FROM ML.PREDICT(MODEL good)", "DROP MODEL godo"):
        with pytest.raises(MLSQLError):
            s.sql(bad)
    assert s.sql("SELECT count(*) FROM data").scalar() == 60
    assert s.sql("SELECT predicted_y FROM ML.PREDICT(MODEL good, (SELECT 1.0 AS x))").scalar() == pytest.approx(2.0)


def test_a_column_of_the_wrong_type_names_column_and_types(penguin_models):
    from mlsql.errors import InputTypeError

    s = penguin_models
    with pytest.raises(InputTypeError) as info:
        s.sql("SELECT * FROM ML.PREDICT(MODEL mass_model, (SELECT 'Adelie' AS species, 'Dream' AS island, "
              "'long' AS bill_length_mm, 18.0 AS bill_depth_mm, 190 AS flipper_length_mm, 'male' AS sex))")
    msg = str(info.value)
    assert "column 'bill_length_mm' is VARCHAR" in msg and "trained on it as DOUBLE" in msg, msg
    assert "ML.PREDICT with model mass_model@" in msg and "TRY_CAST(bill_length_mm AS DOUBLE)" in msg
    with pytest.raises(InputTypeError, match="column 'island' is STRUCT, but the model was trained on it as VARCHAR"):
        s.sql("SELECT * FROM ML.PREDICT(MODEL mass_model, (SELECT 'Adelie' AS species, {'a': 1} AS island, "
              "40.0 AS bill_length_mm, 18.0 AS bill_depth_mm, 190 AS flipper_length_mm, 'male' AS sex))")
    # and nothing is lost: the model still answers good input
    assert s.sql("SELECT count(*) FROM ML.PREDICT(MODEL mass_model, TABLE penguins)").scalar() == 344


def test_messages_a_user_reads_instead_of_silence_or_noise(penguin_models, tmp_path):
    from mlsql.errors import EngineError, OptionError, UnknownOptionError

    s = penguin_models
    with pytest.raises(EngineError) as info:
        s.sql("SELEC 42")
    assert "Did you mean SELECT?" in str(info.value)
    with pytest.raises(UnknownOptionError, match="Did you mean 'top_k_features'"):
        s.sql("SELECT * FROM ML.EXPLAIN_PREDICT(MODEL species_model, TABLE penguins, STRUCT(3 AS top_k_feature))")
    with pytest.raises(OptionError, match="gs:// is not supported"):
        s.sql("EXPORT MODEL species_model OPTIONS (uri = 'gs://my-bucket/species.onnx')")
    assert not (tmp_path / "gs:").exists() and not __import__("pathlib").Path("gs:").exists()
    # BigQuery ML's backticked names
    r = s.sql("""CREATE OR REPLACE MODEL `mydataset.penguin_reg` OPTIONS (model_type = 'linear_reg',
                 input_label_cols = ['body_mass_g']) AS SELECT bill_length_mm, body_mass_g FROM penguins
                 WHERE body_mass_g IS NOT NULL""")
    assert "Created model mydataset.penguin_reg version 1" in r.message
    assert s.sql("SELECT count(*) FROM ML.PREDICT(MODEL `mydataset.penguin_reg`, TABLE penguins)").scalar() == 344


def test_every_bad_option_at_once_each_with_its_place(s):
    script = ("SELECT 1;\nCREATE MODEL m OPTIONS (model_type = 'linear_reg', input_label_cols = ['y'],\n"
              "  l2_reg = -1, max_iteration = 3, learn_rate = 'fast') AS SELECT x, y FROM data")
    with pytest.raises(OptionError) as info:
        s.sql(script)
    errors = [info.value, *info.value.also]
    line = script.split("\n")[2]
    assert [(type(e).__name__, e.line, e.column, e.end_column) for e in errors] == [
        ("OptionError", 3, line.index("-1") + 1, line.index("-1") + 3),
        ("UnknownOptionError", 3, line.index("max_iteration") + 1, line.index("max_iteration") + 14),
        ("OptionError", 3, line.index("'fast'") + 1, line.index("'fast'") + 7),
    ]
    msg = str(info.value)
    assert msg.split("\n")[0] == "Statement 2 (line 2): 3 bad options in CREATE MODEL OPTIONS"
    assert "Did you mean 'max_iterations'?" in msg and msg.count("^") == 3

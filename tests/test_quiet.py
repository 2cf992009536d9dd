"""A cell says what MLSQL says: no MLflow schema hint, no Spark JVM lines, no xgboost line per
round, unless the user asks with SET mlsql_log_level."""

from __future__ import annotations

import logging
import warnings

import pytest


def test_create_model_writes_the_signature_from_arrow_types_without_mlflows_hint(shared_ws):
    import mlflow.models

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        shared_ws.sql("""CREATE OR REPLACE MODEL quiet_model OPTIONS (model_type = 'boosted_tree_classifier',
                         input_label_cols = ['species'], max_iterations = 2)
                         AS SELECT species, island, bill_length_mm, body_mass_g, year FROM penguins""")
    hints = [str(w.message) for w in seen if "Inferred schema" in str(w.message)]
    assert hints == []
    mv = shared_ws.registry.get("quiet_model")
    sig = mlflow.models.Model.load(str(shared_ws.registry.local_path(mv) / "MLmodel")).signature
    types = {c.name: c.type.name for c in sig.inputs.inputs}
    # the query's types: penguins' year and body_mass_g are BIGINT, nullable like every query column
    assert types == {"island": "string", "bill_length_mm": "double", "body_mass_g": "long", "year": "long"}
    assert all(not c.required for c in sig.inputs.inputs)
    out = {c.name: c.type for c in sig.outputs.inputs}
    assert out["predicted_species"].name == "string"
    probs = out["predicted_species_probs"].to_dict()
    assert probs["type"] == "array" and set(probs["items"]["properties"]) == {"label", "prob"}


def test_log_level_setting_sets_the_libraries_loggers(session):
    from mlsql import logs
    from mlsql.errors import OptionError

    try:
        assert logging.getLogger("mlflow").level == logging.ERROR  # the default: libraries' errors only
        assert session.sql("SET mlsql_log_level = 'info'").message == \
            "mlsql_log_level = 'info' (library logs shown at this level)"
        assert logging.getLogger("mlflow").level == logging.INFO == logging.getLogger("XGBoost-PySpark").level
        assert logs.spark_level() == "INFO" and logs.verbose()
        with pytest.raises(OptionError, match="mlsql_log_level must be one of 'error', 'warning', 'info', 'debug'"):
            session.sql("SET mlsql_log_level = 'loud'")
        assert logs.level() == "info"  # a refused value changes nothing
    finally:
        assert session.sql("RESET mlsql_log_level").message == "mlsql_log_level = 'warning'"
    assert logging.getLogger("mlflow").level == logging.ERROR and logs.spark_level() == "ERROR"


def test_spark_training_prints_nothing_into_the_cell(spark_ws, capfd):
    """fd-level capture: the JVM and its Python workers write to <workspace>/logs/spark.log, and
    xgboost's tracker (in this process) prints no evaluation line per round."""
    capfd.readouterr()
    spark_ws.sql("""CREATE OR REPLACE MODEL quiet_spark OPTIONS (model_type = 'boosted_tree_classifier',
                    input_label_cols = ['species'], max_iterations = 3)
                    AS SELECT species, island, bill_length_mm FROM penguins""")
    spark_ws.sql("SELECT * FROM ML.PREDICT(MODEL quiet_spark, TABLE penguins) LIMIT 3")
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    log = (spark_ws.workspace.root / "logs" / "spark.log").read_text()
    assert "--- Spark (local[2]) started by pid" in log and "log4j" in log  # where its lines went instead

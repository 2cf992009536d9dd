"""Shared fixtures: real workspaces on disk, real data from PyPI packages."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _quiet_env():
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.pop("MLSQL_TRACKING_URI", None)
    yield


@pytest.fixture
def session(tmp_path):
    """A fresh session on an empty workspace."""
    import mlsql

    s = mlsql.connect(tmp_path / "ws")
    yield s
    s.close()


@pytest.fixture(scope="session")
def shared_ws(tmp_path_factory):
    """One workspace with penguins and nycflights13 loaded, shared by read-mostly tests."""
    import mlsql
    import mlsql.datasets

    ws = tmp_path_factory.mktemp("shared") / "ws"
    s = mlsql.connect(ws)
    mlsql.datasets.load("penguins", session=s)
    mlsql.datasets.load("nycflights13", session=s)
    yield s
    s.close()


@pytest.fixture(scope="session")
def penguin_models(shared_ws):
    """Penguin models trained once: body mass regression and species classifier."""
    s = shared_ws
    s.sql("""
        CREATE OR REPLACE MODEL mass_model
        OPTIONS (model_type = 'linear_reg', input_label_cols = ['body_mass_g'],
                 data_split_method = 'random', data_split_eval_fraction = 0.25)
        AS SELECT species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, sex, body_mass_g
           FROM penguins WHERE body_mass_g IS NOT NULL
    """)
    s.sql("""
        CREATE OR REPLACE MODEL species_model
        OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['species'],
                 data_split_method = 'random', data_split_eval_fraction = 0.25, max_iterations = 10)
        AS SELECT species, island, bill_length_mm, bill_depth_mm, flipper_length_mm, body_mass_g, sex
           FROM penguins
    """)
    return s


SPARK_TABLES = ("flights", "weather", "planes", "airports", "airlines", "penguins")


@pytest.fixture(scope="session")
def spark_ws(shared_ws):
    """A Spark session on the shared workspace, its DuckDB tables handed over as temp views.
    One SparkSession (local[2]) serves the whole test run: it takes ~10 s to start."""
    pytest.importorskip("pyspark")
    import mlsql

    s = mlsql.connect(shared_ws.workspace.root, engine="spark", master="local[2]")
    for t in SPARK_TABLES:
        s.sql(f"CREATE OR REPLACE TEMP VIEW {t} AS SELECT * FROM workspace.{t}")
    yield s
    s.close()


def _engines() -> list[str]:
    from mlsql.engines.base import engine_names

    return engine_names()


_others: dict = {}


@pytest.fixture(params=_engines(), scope="session")
def backend(request):
    """An engine-independent test runs once per engine (ibis's backend fixture), over every engine
    MLSQL knows (``mlsql.engines.base.engine_names``: the registered ones and any entry point), so
    an engine added later runs them all: the same tables (handed over from the workspace as views,
    as Spark's are), the same statements. Each test compares with an answer that does not come
    from the engine under test: another engine's with DuckDB's, DuckDB's with raw DuckDB (no MLSQL)
    or with the numbers redone by hand (tests/engines/by_hand.py), never a session with itself."""
    name = request.param
    if name == "duckdb":
        return request.getfixturevalue("shared_ws")
    if name == "spark":
        return request.getfixturevalue("spark_ws")
    if name not in _others:
        import mlsql

        ws = request.getfixturevalue("shared_ws")
        s = _others[name] = mlsql.connect(ws.workspace.root, engine=name)
        request.addfinalizer(s.close)
        for t in SPARK_TABLES:
            s.sql(f"CREATE OR REPLACE TEMP VIEW {t} AS SELECT * FROM workspace.{t}")
    return _others[name]

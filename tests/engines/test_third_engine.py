"""The engine contract holds for a third engine: SQLite, written in one file (sqlite_engine.py)
and registered by one line, runs plain queries, CREATE MODEL and the ML functions with the same
answers as DuckDB, and nothing else in MLSQL knows about it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest


def _points() -> pa.Table:
    rng = np.random.default_rng(7)
    n = 300
    x1, x2 = rng.normal(size=n), rng.uniform(0, 10, size=n)
    grp = np.array(["a", "b", "c"])[rng.integers(0, 3, size=n)]
    y = 2.0 * x1 - 0.5 * x2 + (grp == "b") * 3.0 + rng.normal(scale=0.3, size=n)
    return pa.table({"x1": x1, "x2": x2, "grp": grp, "y": y, "big": y > 0})


SCRIPT = [
    "SELECT grp, count(*) AS n, round(avg(y), 9) AS m, max(x2) AS top FROM pts GROUP BY grp ORDER BY grp",
    "SELECT count(*) FILTER (WHERE x1 > 0) AS pos, sum(CASE WHEN grp = 'a' THEN 1 ELSE 0 END) AS a FROM pts",
    "CREATE OR REPLACE MODEL lin OPTIONS (model_type = 'linear_reg', input_label_cols = ['y']) "
    "AS SELECT x1, x2, grp, y FROM pts",
    "CREATE OR REPLACE MODEL trees OPTIONS (model_type = 'boosted_tree_classifier', input_label_cols = ['big'], "
    "max_iterations = 5) AS SELECT x1, x2, grp, big FROM pts",
    "SELECT round(predicted_y, 9) AS p FROM ML.PREDICT(MODEL lin, (SELECT * FROM pts WHERE x2 < 1)) ORDER BY p",
    "SELECT * FROM ML.EVALUATE(MODEL trees, TABLE pts)",
    "SELECT * FROM ML.FEATURE_IMPORTANCE(MODEL trees) ORDER BY feature",
]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float) and isinstance(rb[k], float):
                assert math.isclose(ra[k], rb[k], rel_tol=1e-9, abs_tol=1e-12), (k, ra, rb)
            else:
                assert ra[k] == rb[k], (k, ra, rb)


def test_a_third_engine_is_one_file_and_one_registration_line(tmp_path, monkeypatch):
    import mlsql
    from mlsql.engines import base

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setitem(base.ENGINES, "sqlite", "sqlite_engine:SQLiteEngine")  # the one line

    lite = mlsql.connect(tmp_path / "lite", engine="sqlite")
    duck = mlsql.connect(tmp_path / "duck")
    try:
        assert type(lite.engine).__name__ == "SQLiteEngine"
        for s in (lite, duck):
            s.register("pts", _points())
        for q in SCRIPT:
            got, want = lite.sql(q).table.to_pylist(), duck.sql(q).table.to_pylist()
            _same(got, want)
        assert lite.model("lin").meta["engine"] == "sqlite" and lite.model("lin").meta["data_rows"] == 300
        assert lite.model("trees").meta["data_rows"] == duck.model("trees").meta["data_rows"]
        assert "pts" in lite.engine.table_names()
        assert {"lin", "trees"} <= set(lite.sql("SHOW MODELS").table.column("model").to_pylist())
        # an error from the new engine is an MLSQLError naming the statement, and the session goes on
        from mlsql.errors import MLSQLError

        with pytest.raises(MLSQLError, match="no_such_table"):
            lite.sql("SELECT * FROM no_such_table")
        assert lite.sql("SELECT count(*) AS n FROM pts").table.to_pylist() == [{"n": 300}]
    finally:
        lite.close()
        duck.close()

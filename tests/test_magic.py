"""The %%mlsql magic through a real IPython shell."""

from __future__ import annotations

import pytest


@pytest.fixture
def ip(tmp_path, monkeypatch):
    from IPython.testing.globalipapp import get_ipython, start_ipython

    monkeypatch.setenv("MLSQL_HOME", str(tmp_path / "ws"))
    shell = start_ipython() or get_ipython()  # the global shell starts once per process
    shell.run_line_magic("load_ext", "mlsql")
    yield shell
    magic = shell.magics_manager.registry["MLSQLMagic"]
    for s in magic._sessions.values():
        s.close()
    magic._sessions.clear()
    shell.run_line_magic("reset", "-f")


def test_cell_magic_returns_a_result_and_stores_out(ip):
    r = ip.run_cell_magic("mlsql", "-o df", "SELECT range AS i FROM range(5)")
    assert len(r) == 5
    assert list(ip.user_ns["df"].i) == [0, 1, 2, 3, 4]
    html = r._repr_html_()
    assert "<table" in html and "5 rows × 1 columns" in html


def test_line_magic(ip):
    r = ip.run_line_magic("mlsql", "SELECT 40 + 2 AS answer")
    assert r.scalar() == 42


def test_python_variables_are_bound_not_pasted(ip):
    ip.user_ns["limit_value"] = 3
    ip.user_ns["name"] = "x'); DROP TABLE t; --"
    ip.run_cell_magic("mlsql", "", "CREATE TABLE t AS SELECT range AS i FROM range(10)")
    r = ip.run_cell_magic("mlsql", "", "SELECT count(*) AS n, any_value({name}) AS s FROM t WHERE i < {limit_value}")
    assert r.fetchone() == (3, "x'); DROP TABLE t; --")
    assert ip.run_line_magic("mlsql", "SELECT count(*) FROM t").scalar() == 10
    # struct literals and strings with braces are left alone
    assert ip.run_line_magic("mlsql", "SELECT {'k': 1}.k AS k, '{limit_value}' AS s").fetchone() == (1, "{limit_value}")


def test_dataframes_in_the_notebook_are_tables(ip):
    ip.run_cell("import pandas as pd\npeople = pd.DataFrame({'name': ['a', 'b'], 'age': [30, 40]})")
    r = ip.run_line_magic("mlsql", "SELECT avg(age) FROM people")
    assert r.scalar() == 35


def test_config_traitlets(ip):
    ip.run_line_magic("config", "MLSQLMagic.displaylimit = 3")
    ip.run_line_magic("config", "MLSQLMagic.autolimit = 4")
    r = ip.run_line_magic("mlsql", "SELECT range FROM range(100)")
    assert len(r) == 4 and r.truncated
    assert r._repr_html_().count("<tr>") == 1 + 3 + 1  # header, 3 rows, ellipsis


def test_errors_are_usage_errors_without_traceback(ip, capsys):
    res = ip.run_cell("%%mlsql\nSELECT 1;\nSELECT * FROM ML.PREDICT(MODEL nope, (SELECT 1))")
    from IPython.core.error import UsageError

    assert isinstance(res.error_in_exec, UsageError)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Unknown model 'nope'" in text
    assert "Traceback" not in text


def test_training_shows_metrics_and_progress(ip, capsys):
    ip.run_cell_magic("mlsql", "", "CREATE TABLE d AS SELECT range::DOUBLE AS x, (range % 7)::DOUBLE AS z, "
                                   "(range % 2 = 0) AS label FROM range(400)")
    r = ip.run_cell_magic("mlsql", "", "CREATE MODEL clf OPTIONS (model_type = 'boosted_tree_classifier', "
                                       "max_iterations = 5) AS SELECT * FROM d")
    assert "Created model clf version 1" in r.message
    assert "roc_auc" in r.to_arrow().column_names
    err = capsys.readouterr().err
    assert "Training clf" in err


def test_workspace_option(ip, tmp_path):
    other = tmp_path / "other"
    ip.run_cell_magic("mlsql", f"--workspace {other}", "CREATE TABLE only_here AS SELECT 1 AS x")
    assert (other / "catalog.duckdb").exists()
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="only_here"):
        ip.run_line_magic("mlsql", "SELECT * FROM only_here")


def test_limit_option_unbound_variables_and_usage(ip):
    from IPython.core.error import UsageError

    r = ip.run_cell_magic("mlsql", "--limit 3", "SELECT range AS i FROM range(100)")
    assert len(r) == 3 and r.truncated
    with pytest.raises(UsageError, match="--limit takes a positive whole number"):
        ip.run_cell_magic("mlsql", "--limit x", "SELECT 1")
    ip.user_ns["airport"] = "JFK"
    with pytest.raises(UsageError) as info:
        ip.run_cell_magic("mlsql", "", "SELECT 1 AS a,\n  {airpot} AS b")
    # line 3 of the cell as the editor numbers it: "%%mlsql" is its line 1
    assert "{airpot} at line 3: no notebook variable named 'airpot'. Did you mean {airport}?" in str(info.value)
    assert ip.run_cell_magic("mlsql", "", "SELECT {airport} AS a, {'k': 1} AS s").fetchall() == [("JFK", {"k": 1})]
    doc = ip.find_line_magic("mlsql").__doc__
    for option in ("-o, --out", "--engine", "--workspace", "--limit", "--no-progress", "{name}", "%config"):
        assert option in doc, option

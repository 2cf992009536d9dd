"""Plain SQL through MLSQL gives DuckDB's answer: the same values, the same Python types, the
same pandas frames, and the same error class. Each case runs through ``mlsql.connect().sql()``
and through raw ``duckdb`` on a database with the same tables."""

from __future__ import annotations

import pandas.testing as pdt
import pytest

SETUP = """
CREATE TABLE cities AS SELECT * FROM (VALUES ('Amsterdam', 'NL', 2000, 1005), ('Amsterdam', 'NL', 2010, 1065),
    ('Amsterdam', 'NL', 2020, 1158), ('Seattle', 'US', 2000, 564), ('Seattle', 'US', 2010, 608),
    ('Seattle', 'US', 2020, 738), ('New York City', 'US', 2000, 8015), ('New York City', 'US', 2010, 8175),
    ('New York City', 'US', 2020, 8772)) t(name, country, year, population);
CREATE TABLE trades AS SELECT * FROM (VALUES ('a', TIMESTAMP '2024-01-01 10:00:05', 10),
    ('a', TIMESTAMP '2024-01-01 10:00:20', 11), ('b', TIMESTAMP '2024-01-01 10:00:07', 20)) t(sym, ts, qty);
CREATE TABLE prices AS SELECT * FROM (VALUES ('a', TIMESTAMP '2024-01-01 10:00:00', 1.5),
    ('a', TIMESTAMP '2024-01-01 10:00:10', 1.6), ('b', TIMESTAMP '2024-01-01 10:00:00', 7.0)) t(sym, ts, price);
CREATE TABLE nums AS SELECT range AS i, range % 3 AS g, range * 1.5 AS x, 'n' || range AS s FROM range(20);
"""

CASES = {
    # plain queries
    "constant": "SELECT 42 AS answer",
    "arithmetic": "SELECT 7 // 2 AS a, 7 / 2 AS b, 7 % 3 AS c, 2 ** 10 AS d",
    "point_lookup": "SELECT x FROM nums WHERE i = 7",
    "group_by_all": "SELECT g, count(*) AS n, sum(x) AS sx FROM nums GROUP BY ALL ORDER BY ALL",
    "hugeint_sum": "SELECT sum(i) AS s, sum(i)::HUGEINT * 1000000000000 AS big FROM nums",
    "from_first": "FROM nums SELECT i, s WHERE i < 3 ORDER BY i",
    "from_only": "FROM cities ORDER BY name, year LIMIT 2",
    "columns_star": "SELECT max(COLUMNS(*)) FROM nums",
    "columns_regex": "SELECT COLUMNS('^(i|x)$') FROM nums ORDER BY i LIMIT 3",
    "exclude_replace": "SELECT * EXCLUDE (s) REPLACE (x * 2 AS x) FROM nums ORDER BY i LIMIT 3",
    "qualify": "SELECT name, year, population FROM cities QUALIFY row_number() OVER (PARTITION BY name ORDER BY year DESC) = 1 ORDER BY name",
    "window": "SELECT i, sum(i) OVER (ORDER BY i ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS w FROM nums ORDER BY i LIMIT 5",
    "cte_recursive": "WITH RECURSIVE f(n, v) AS (SELECT 1, 1 UNION ALL SELECT n + 1, v * (n + 1) FROM f WHERE n < 10) SELECT * FROM f",
    "pivot": "PIVOT cities ON year USING sum(population) GROUP BY country ORDER BY country",
    "unpivot": "UNPIVOT (SELECT name, population AS p2000, population + 1 AS p2010 FROM cities WHERE year = 2000) ON p2000, p2010 INTO NAME k VALUE v ORDER BY name, k",
    "unpivot_row_struct": "SELECT * FROM (UNPIVOT (SELECT 1 AS a, 2 AS b) ON COLUMNS(*) INTO NAME k VALUE v) ORDER BY k",
    "asof_join": "SELECT t.sym, t.ts, p.price FROM trades t ASOF JOIN prices p ON t.sym = p.sym AND t.ts >= p.ts ORDER BY t.sym, t.ts",
    "positional_join": "SELECT * FROM (SELECT 1 AS a UNION ALL SELECT 2) POSITIONAL JOIN (SELECT 'x' AS b UNION ALL SELECT 'y')",
    "list_functions": "SELECT list_sort([3, 1, 2]) AS s, list_distinct([1, 1, 2]) AS d, [1, 2, 3][2] AS at, len([1, 2]) AS n",
    "lambda": "SELECT list_transform([1, 2, 3], x -> x * 10) AS t, list_filter([1, 2, 3, 4], x -> x % 2 = 0) AS f",
    "list_comprehension": "SELECT [x * 2 FOR x IN [1, 2, 3] IF x > 1] AS c",
    "list_aggregate": "SELECT list(i ORDER BY i DESC) AS l FROM nums WHERE i < 4",
    "struct": "SELECT {'a': 1, 'b': [1, 2], 'c': {'d': 'x'}} AS s, struct_pack(k := 1).k AS k",
    "struct_star": "SELECT s.* FROM (SELECT {'a': 1, 'b': 'two'} AS s)",
    "map": "SELECT MAP {'a': 1, 'b': 2} AS m, map_keys(MAP {'a': 1}) AS ks",
    "map_of_lists": "SELECT MAP {'k': [1, 2]} AS m",
    "array": "SELECT [1, 2, 3]::INTEGER[3] AS a, array_value(1.5, 2.5) AS b",
    "unnest": "SELECT unnest([1, 2, 3]) AS u",
    "strings": "SELECT upper('abc') AS u, 'abc' || 'def' AS c, regexp_extract('a1b22', '\\d+') AS r, 'hello'[2:3] AS sl",
    "string_with_dollar_brace": "SELECT 'cost: ${x}' AS s, 'it''s' AS q",
    "dollar_quoted": "SELECT $$it's ${x}$$ AS s, $tag$a;b$tag$ AS t",
    "quoted_identifier": 'SELECT 1 AS "${weird}", 2 AS "semi;colon"',
    "comments": "SELECT /* ${x} */ 1 AS a -- ${y}\n, 2 AS b",
    "dates": "SELECT DATE '2024-02-29' + INTERVAL 1 YEAR AS d, date_diff('day', DATE '2024-01-01', DATE '2024-03-01') AS n",
    "date_infinity": "SELECT 'infinity'::DATE AS d, '-infinity'::DATE AS e, 'infinity'::TIMESTAMP AS t",
    "timestamps": "SELECT TIMESTAMP '2024-01-01 12:34:56.789' AS ts, date_trunc('hour', TIMESTAMP '2024-01-01 12:34:56') AS h",
    "timestamptz": "SELECT TIMESTAMPTZ '2024-01-01 12:00:00+00' AS t",
    "interval": "SELECT INTERVAL 1 MONTH + INTERVAL 3 DAY AS i, INTERVAL '90 minutes' AS m",
    "timetz": "SELECT '12:00:00+05'::TIMETZ AS t, TIME '08:30:00' AS plain",
    "uhugeint": "SELECT 340282366920938463463374607431768211455::UHUGEINT AS u",
    "hugeint_max": "SELECT 170141183460469231731687303715884105727::HUGEINT AS h",
    "decimal": "SELECT 1.50::DECIMAL(10, 2) AS d, 123456789.123456789::DECIMAL(18, 9) AS e",
    "uuid": "SELECT '12c09cfc-7de8-449f-a69a-aa31ec4d1c89'::UUID AS u",
    "bit": "SELECT '0101'::BIT AS b",
    "varint": "SELECT 123456789012345678901234567890::VARINT AS v",
    "blob": "SELECT '\\xAA\\xBB'::BLOB AS b, 'abc'::BLOB AS c",
    "enum": "SELECT 'b'::ENUM('a', 'b') AS e",
    "union": "SELECT union_value(num := 2) AS u",
    "json": "SELECT '{\"a\": [1, 2]}'::JSON AS j, json_extract('{\"a\": 5}', '$.a') AS v",
    "nulls": "SELECT NULL AS n, NULL::INTEGER AS i, [NULL, 1] AS l",
    "booleans": "SELECT true AND NULL AS a, 'abc' ~ 'b' AS re, 'abc' LIKE 'a%' AS lk",
    "floats": "SELECT 'nan'::DOUBLE AS n, 'inf'::DOUBLE AS i, 0.1 + 0.2 AS s, 1e300 * 10 AS o",
    "case_coalesce": "SELECT CASE WHEN i > 10 THEN 'big' ELSE 'small' END AS c, coalesce(NULL, i) AS k FROM nums WHERE i IN (2, 12) ORDER BY i",
    "string_agg": "SELECT country, string_agg(DISTINCT name, ', ' ORDER BY name) AS names FROM cities GROUP BY country ORDER BY country",
    "macro": "CREATE OR REPLACE MACRO add_one(a) AS a + 1; SELECT add_one(41) AS v",
    "table_macro": "CREATE OR REPLACE MACRO first_n(n) AS TABLE SELECT * FROM nums WHERE i < n; SELECT count(*) FROM first_n(5)",
    "summarize": "SUMMARIZE nums",
    "describe": "DESCRIBE cities",
    "describe_query": "DESCRIBE SELECT 1 AS a, 'x' AS b",
    "show_table": "SHOW cities",
    "pragma_version": "PRAGMA version",
    "pragma_table_info": "PRAGMA table_info('nums')",
    "explain": "EXPLAIN SELECT count(*) FROM nums",
    "set_threads": "SET threads = 1; SELECT current_setting('threads') AS t",
    "set_unlisted_setting": "SET regex_match_operator_semantics = 'full'; SELECT 'abc' ~ 'b' AS m",
    "reset": "SET threads = 1; RESET threads; SELECT current_setting('threads') > 0 AS ok",
    "set_variable": "SET VARIABLE answer = 42; SELECT getvariable('answer') AS v",
    "prepared_style": "SELECT i FROM nums WHERE i BETWEEN 3 AND 5 ORDER BY i",
    "create_insert_select": "CREATE OR REPLACE TABLE tmp_ci AS SELECT * FROM range(10) t(i); INSERT INTO tmp_ci VALUES (99); SELECT count(*) FROM tmp_ci",
    "update_returning": "CREATE OR REPLACE TABLE tmp_u (i INTEGER, v VARCHAR); INSERT INTO tmp_u VALUES (1, 'a'), (2, 'b'); UPDATE tmp_u SET v = 'z' WHERE i = 2 RETURNING *",
    "insert_or_replace": "CREATE OR REPLACE TABLE tmp_k (k INTEGER PRIMARY KEY, v INTEGER); INSERT INTO tmp_k VALUES (1, 1); INSERT OR REPLACE INTO tmp_k VALUES (1, 2); SELECT * FROM tmp_k",
    "temp_table": "CREATE TEMP TABLE tmp_t AS SELECT 5 AS v; SELECT v FROM tmp_t",
    "view": "CREATE OR REPLACE VIEW v_big AS SELECT name FROM cities WHERE population > 5000; SELECT DISTINCT name FROM v_big",
    "sequence": "CREATE SEQUENCE IF NOT EXISTS seq_a START 10; SELECT nextval('seq_a') >= 10 AS ok",
    "attach_memory": "ATTACH IF NOT EXISTS ':memory:' AS side; CREATE OR REPLACE TABLE side.x AS SELECT 7 AS v; SELECT v FROM side.x",
    "generate_series": "SELECT * FROM generate_series(DATE '2024-01-01', DATE '2024-01-03', INTERVAL 1 DAY)",
    # a seeded sample of a one-vector table is the same rows on every connection (one thread draws it)
    "sample_repeatable": "SELECT count(*) FROM nums USING SAMPLE 50% (bernoulli, 42)",
    "sample_repeatable_rows": "SELECT i FROM nums USING SAMPLE 50% (bernoulli, 42) ORDER BY i",
    # errors: the same error class as DuckDB's
    "error_syntax": "SELEC 42",
    "error_missing_table": "SELECT * FROM no_such_table",
    "error_missing_column": "SELECT no_such_column FROM nums",
    "error_type": "SELECT 'a'::INTEGER",
    "error_division": "SELECT 1 // 0 AS d",
    "error_unknown_setting": "SET no_such_setting = 1",
    "error_unknown_function": "SELECT no_such_function(1)",
    "error_constraint": "CREATE OR REPLACE TABLE tmp_pk (k INTEGER PRIMARY KEY); INSERT INTO tmp_pk VALUES (1); INSERT INTO tmp_pk VALUES (1)",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import duckdb

    import mlsql

    tmp = tmp_path_factory.mktemp("parity")
    s = mlsql.connect(tmp / "ws")
    raw = duckdb.connect(str(tmp / "raw.duckdb"))
    s.sql(SETUP)
    raw.execute(SETUP)
    yield s, raw, tmp
    s.close()
    raw.close()


def _raw(raw, script: str):
    """DuckDB's result of the script's last statement (each statement run in turn)."""
    import duckdb

    stmts = duckdb.extract_statements(script)
    for st in stmts[:-1]:
        raw.execute(st)
    return raw.sql(stmts[-1].query)


def _types(rows):
    return [[type(v) for v in r] for r in rows]


def _same(a, b) -> bool:
    """Equal, with NaN equal to NaN (as DuckDB's own results compare in a test)."""
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", list(CASES))
def test_plain_sql_matches_duckdb(pair, name):
    import duckdb

    from mlsql.errors import MLSQLError

    s, raw, _ = pair
    script = CASES[name]
    want_error = None
    try:
        rel = _raw(raw, script)
        want_rows = rel.fetchall() if rel is not None else []
        try:
            want_frame = _raw(raw, script).df() if rel is not None and not name.startswith(
                ("sequence", "update", "set_", "reset", "macro", "table_macro", "create", "insert", "temp", "view",
                 "attach")) else None
        except duckdb.Error as exc:
            want_frame = exc
    except duckdb.Error as exc:
        want_error = type(exc).__name__
    if want_error is not None:
        with pytest.raises(MLSQLError) as info:
            s.sql(script)
        assert info.value.engine_error == want_error, (name, str(info.value))
        return
    got = s.sql(script)
    rows = got.fetchall()
    if name.startswith("explain"):  # DuckDB's physical plan, as DuckDB writes it
        assert got.to_arrow().column_names == ["explain_key", "explain_value"] and "physical_plan" in rows[0][0]
        return
    assert _same(rows, want_rows), (name, rows, want_rows)
    assert _types(rows) == _types(want_rows), name
    if rows:
        assert _same(got.fetchone(), want_rows[0]) and _same(got.scalar(), want_rows[0][0])
    if isinstance(want_frame, Exception):
        with pytest.raises(MLSQLError):
            got.to_pandas()
    elif want_frame is not None:
        pdt.assert_frame_equal(got.to_pandas(), want_frame, check_dtype=True)


def test_copy_to_and_from_a_file(pair):
    s, raw, tmp = pair
    for who, run in (("mlsql", lambda q: s.sql(q)), ("raw", lambda q: raw.execute(q))):
        out = tmp / f"{who}.parquet"
        run(f"COPY (SELECT * FROM cities ORDER BY name, year) TO '{out}' (FORMAT parquet)")
        run(f"CREATE OR REPLACE TABLE back_{who} AS SELECT * FROM read_parquet('{out}')")
        csv = tmp / f"{who}.csv"
        run(f"COPY nums TO '{csv}' (HEADER)")
        run(f"CREATE OR REPLACE TABLE nums_{who} AS FROM read_csv('{csv}')")
    assert s.sql("SELECT * FROM back_mlsql ORDER BY ALL").fetchall() == raw.sql(
        "SELECT * FROM back_raw ORDER BY ALL").fetchall()
    assert s.sql("SELECT * FROM nums_mlsql ORDER BY i").fetchall() == raw.sql("SELECT * FROM nums_raw ORDER BY i").fetchall()


def test_to_arrow_stays_zero_copy_and_typed(pair):
    s, raw, _ = pair
    got = s.sql("SELECT i, x, s FROM nums ORDER BY i").to_arrow()
    assert got.equals(raw.sql("SELECT i, x, s FROM nums ORDER BY i").to_arrow_table())

"""A third engine in one file: MLSQL on Python's sqlite3, to show what the engine contract asks.

It is registered by one line (``ENGINES["sqlite"] = "sqlite_engine:SQLiteEngine"``, or an entry
point in the group ``mlsql.engines``) and nothing else in MLSQL changes. Statements arrive in
MLSQL's SQL (DuckDB's) and are rendered for SQLite with sqlglot; rows come back as Arrow. It
trains and scores on this process (it has no executors), so it leaves the contract's two
executor hooks at their default.

It is test support, not a product engine: sqlite3 hands rows over as Python tuples, so
``query`` builds its Arrow columns from them.
"""

from __future__ import annotations

import hashlib
import itertools
import sqlite3

import numpy as np
import pyarrow as pa
import sqlglot
from sqlglot.errors import ErrorLevel

from mlsql.engines.base import Engine, Fingerprint
from mlsql.errors import EngineError

_TYPES = {"int": "INTEGER", "uint": "INTEGER", "bool": "INTEGER", "float": "REAL", "double": "REAL",
          "string": "TEXT", "large_string": "TEXT"}


class _StddevPop:
    """Population standard deviation, Welford's running mean and sum of squares (no cancellation)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def step(self, x):
        if x is None:
            return
        self.n += 1
        d = float(x) - self.mean
        self.mean += d / self.n
        self.m2 += d * (float(x) - self.mean)

    def finalize(self):
        return (self.m2 / self.n) ** 0.5 if self.n else None


class SQLiteEngine(Engine):
    name = "sqlite"
    dialect = "sqlite"
    _names = itertools.count()

    def __init__(self, path: str = ":memory:"):
        self.db = sqlite3.connect(path, check_same_thread=False)
        # the aggregates MLSQL's statements use that SQLite lacks (training statistics' std)
        self.db.create_aggregate("stddev_pop", 1, _StddevPop)

    @classmethod
    def open(cls, workspace, **conf) -> SQLiteEngine:
        return cls(str(workspace.root / "sqlite.db") if workspace is not None else ":memory:")

    def render(self, tree) -> str:
        try:
            return tree.sql("sqlite", unsupported_level=ErrorLevel.RAISE)
        except sqlglot.errors.SqlglotError as exc:
            raise EngineError(f"SQLite cannot express this: {exc}") from None

    def text(self, sql) -> str:
        """The user's text is MLSQL's (DuckDB) SQL here too: SQLite reads it transpiled."""
        return self.render(sqlglot.parse_one(sql, read="duckdb") if isinstance(sql, str) else sql)

    def query(self, sql, params=None, *, limit=None, line=1) -> pa.Table:
        text = self.text(sql)
        if limit is not None:
            text = f"SELECT * FROM ({text}) LIMIT {int(limit)}"
        try:
            cur = self.db.execute(text, params or {})
        except sqlite3.Error as exc:
            raise EngineError(f"SQLite: {exc}", hint=f"(line {line}) {text}") from None
        if cur.description is None:
            self.db.commit()
            return pa.table({})
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
        return pa.table({n: pa.array(list(col)) for n, col in zip(names, zip(*rows))} if rows
                        else {n: pa.array([], pa.null()) for n in names})

    def register(self, name, data) -> None:
        table = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data)
        cols = ", ".join(f'"{f.name}" {_TYPES.get(str(f.type).rstrip("0123456789"), "")}' for f in table.schema)
        self.db.execute(f'DROP TABLE IF EXISTS "{name}"')
        self.db.execute(f'CREATE TABLE "{name}" ({cols})')
        marks = ", ".join("?" * table.num_columns)
        self.db.executemany(f'INSERT INTO "{name}" VALUES ({marks})', zip(*table.to_pydict().values()))
        self.db.commit()

    def unregister(self, name) -> None:
        self.db.execute(f'DROP TABLE IF EXISTS "{name}"')

    def temp_name(self, kind="t") -> str:
        return f"__mlsql_{kind}_{next(self._names)}"

    def table_names(self) -> list[str]:
        rows = self.db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                               "AND name NOT LIKE '__mlsql_%' ORDER BY name").fetchall()
        return [r[0] for r in rows]

    def has_relation(self, name) -> bool:
        return name in self.table_names()

    def sample(self, query, n, seed=42, params=None) -> pa.Table:
        rows = self.query(query, params)
        if rows.num_rows <= n:
            return rows
        pick = np.sort(np.random.default_rng(seed).choice(rows.num_rows, size=n, replace=False))
        return rows.take(pa.array(pick))

    def fingerprint(self, relation) -> Fingerprint:
        total, count = 0, 0
        for row in self.db.execute(f'SELECT * FROM "{relation}"'):
            total += int.from_bytes(hashlib.blake2b(repr(row).encode(), digest_size=8).digest(), "little")
            count += 1
        return Fingerprint(count, f"{total % (1 << 64):016x}", "sqlite:sum(blake2b(repr(row)))")

    def variables(self) -> dict:
        return {}

    def settings(self) -> set[str]:
        return set()

    def close(self) -> None:
        self.db.close()

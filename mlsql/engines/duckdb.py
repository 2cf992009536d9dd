"""The DuckDB engine: runs engine SQL on an embedded database, returns Arrow."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pyarrow as pa

from ..errors import EngineError, UnknownTableError, WorkspaceError

_MISSING_TABLE = re.compile(r"Table with name (\S+) does not exist")
_LINE = re.compile(r"^LINE (\d+):", re.M)


def _locate(msg: str, sql: str) -> str:
    """DuckDB's binder errors carry no position: point at the first name they quote."""
    for name in re.findall(r'"([^"]+)"', msg.split("\n")[0]):
        m = re.search(r"(?<![\w.])" + re.escape(name) + r"(?!\w)", sql, re.IGNORECASE)
        if m:
            lno = sql.count("\n", 0, m.start()) + 1
            col = m.start() - (sql.rfind("\n", 0, m.start()) + 1)
            src = sql.splitlines()[lno - 1]
            head = f"LINE {lno}: "
            return f"\n\n{head}{src}\n{' ' * (len(head) + col)}^"
    return ""


class DuckDBEngine:
    """One DuckDB connection on the workspace catalog (or in memory)."""

    name = "duckdb"
    dialect = "duckdb"

    def __init__(self, path: Path | str | None = None, *, read_only: bool = False):
        import duckdb

        self._duckdb = duckdb
        self.path = str(path) if path else ":memory:"
        try:
            self.con = duckdb.connect(self.path, read_only=read_only)
        except duckdb.IOException as exc:
            msg = str(exc)
            if "lock" in msg.lower():
                holder = re.search(r"held in (.+?) \(PID (\d+)\)", msg)
                who = f"process {holder.group(2)} ({holder.group(1)})" if holder else "another process"
                raise WorkspaceError(
                    f"The workspace catalog {self.path} is locked by {who}",
                    hint="DuckDB lets one process write a database file at a time. Close the other "
                    "kernel, or use another workspace (%mlsql --workspace DIR, or MLSQL_HOME).",
                ) from None
            raise WorkspaceError(f"Cannot open the workspace catalog {self.path}: {msg}") from None
        self._names = itertools.count(1)
        self._settings: set[str] | None = None

    # -- running SQL ---------------------------------------------------------
    def query(self, sql: str, params: dict | None = None, *, limit: int | None = None,
              line: int = 1) -> pa.Table:
        """Run one statement; its rows as an Arrow table (DDL gives DuckDB's count row)."""
        try:
            rel = self.con.sql(sql, params=params or None)
            if rel is None:
                return pa.table({})
            if limit:
                rel = rel.limit(limit)
            return rel.to_arrow_table()
        except self._duckdb.Error as exc:
            raise self._translate(exc, line, sql) from None

    def _rows(self, sql: str, params: list | None = None) -> list[tuple]:
        """Small catalog queries, fully fetched (DuckDB refuses new work while a result is open)."""
        return self.con.sql(sql, params=params).fetchall()

    def _translate(self, exc: Exception, line: int, sql: str = "") -> Exception:
        msg = str(exc)
        if not _LINE.search(msg) and sql:
            msg += _locate(msg, sql)
        if line > 1:  # DuckDB counts lines from the statement; users read the script
            msg = _LINE.sub(lambda m: f"LINE {int(m.group(1)) + line - 1}:", msg)
        missing = _MISSING_TABLE.search(msg)
        if missing:
            name = missing.group(1).strip('"')
            head = msg.split("\n")[0].replace("!", "")
            rest = "\n".join(ln for ln in msg.split("\n")[1:] if not ln.startswith("Did you mean"))
            return UnknownTableError(name, self.table_names(), message=(head + "\n" + rest).rstrip())
        return EngineError(msg)

    # -- catalog ---------------------------------------------------------------
    def table_names(self) -> list[str]:
        rows = self._rows(
            "SELECT table_name FROM information_schema.tables WHERE table_schema NOT IN "
            "('information_schema', 'pg_catalog')"
        )
        return sorted({r[0] for r in rows})

    def has_relation(self, name: str) -> bool:
        rows = self._rows(
            "SELECT 1 FROM information_schema.tables WHERE lower(table_name) = lower(?) LIMIT 1", [name]
        )
        return bool(rows)

    def settings(self) -> set[str]:
        if self._settings is None:
            rows = self._rows("SELECT name FROM duckdb_settings()")
            self._settings = {r[0].lower() for r in rows}
        return self._settings

    # -- Arrow in --------------------------------------------------------------
    def temp_name(self, kind: str = "t") -> str:
        return f"__mlsql_{kind}_{next(self._names)}"

    def register(self, name: str, data) -> None:
        """Expose an Arrow table / pandas / polars frame as a view, without copying it."""
        self.con.register(name, data)

    def unregister(self, name: str) -> None:
        try:
            self.con.unregister(name)
        except self._duckdb.Error:
            pass

    def fingerprint(self, relation: str) -> tuple[int, str]:
        """Row count and an order-insensitive hash of every row of ``relation``."""
        ((n, h),) = self._rows(
            f"SELECT count(*), CAST(COALESCE(sum(hash(t)), 0) AS VARCHAR) FROM {relation} AS t"
        )
        return int(n), f"{int(h) % (1 << 64):016x}"

    def close(self) -> None:
        try:
            self.con.close()
        except Exception:
            pass

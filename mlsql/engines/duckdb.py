"""The DuckDB engine: runs engine SQL on an embedded database, returns Arrow.

Many processes share one workspace (kernels, the CLI, the scheduler, the Jupyter server),
and a DuckDB file has one process at a time. So each engine keeps its own in-memory
DuckDB (the session's temporary tables, registered DataFrames, settings and attached
databases of its own live there), and attaches the workspace catalog only while it
works, behind the workspace's cross-process lock (:mod:`mlsql.locks`).

Attaching costs a few milliseconds on a catalog of a hundred tables, so an engine keeps
the catalog for ``idle_release_s`` (0.25 s) after its last statement: statements that
follow each other (a cell, a script, a loop) pay it once. It lets go at once when another
process is waiting, and never holds it while idle for longer than that. docs/INTERNALS.md
weighs this against the alternatives.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlsql._lazy import pyarrow as pa  # imported by the first statement, not by connect()
from mlsql.engines.base import Engine, Fetched, Fingerprint
from mlsql.errors import EngineError, UnknownTableError, WorkspaceError
from mlsql.locks import DEFAULT_TIMEOUT_S, FileLock

_MISSING_TABLE = re.compile(r"Table with name (\S+) does not exist")
_LINE = re.compile(r"^LINE (\d+):", re.M)
_UNKNOWN_SETTING = re.compile(r'unrecognized configuration parameter "([^"]+)"')
_SYNTAX_AT = re.compile(r'syntax error at or near "([^"]+)"')
# words a statement starts with, for a did-you-mean on a mistyped first word ("SELEC 42")
_STATEMENT_WORDS = ("SELECT", "WITH", "FROM", "VALUES", "CREATE", "INSERT", "UPDATE", "DELETE", "DROP", "ALTER",
                    "COPY", "EXPLAIN", "DESCRIBE", "SUMMARIZE", "PIVOT", "UNPIVOT", "SHOW", "SET", "RESET", "ATTACH",
                    "DETACH", "INSTALL", "LOAD", "PRAGMA", "CALL", "EXPORT", "IMPORT", "VACUUM", "CHECKPOINT",
                    "BEGIN", "COMMIT", "ROLLBACK", "USE", "TRUNCATE", "MERGE", "DEPLOY")
ALIAS = "workspace"  # the catalog's name while attached: current_database() in a session
IDLE_RELEASE_S = 0.25


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


class DuckDBEngine(Engine):
    """An in-memory DuckDB of the session's own, with the workspace catalog attached while it works."""

    name = "duckdb"
    dialect = "duckdb"

    def __init__(self, catalog: Path | str | None = None, *, lock_timeout: float | None = None,
                 idle_release_s: float = IDLE_RELEASE_S, who: str | None = None):
        import duckdb

        self._duckdb = duckdb
        self.catalog = Path(catalog) if catalog else None
        self.path = str(self.catalog) if self.catalog else ":memory:"
        self.con = duckdb.connect(":memory:")
        self.lock = FileLock(self.catalog.with_suffix(".lock"), who=who) if self.catalog else None
        if lock_timeout is None:
            lock_timeout = float(os.environ.get("MLSQL_LOCK_TIMEOUT") or DEFAULT_TIMEOUT_S)
        self.lock_timeout = lock_timeout
        self.idle_release_s = idle_release_s
        self.on_wait: Callable[[str, float], None] | None = None  # (message, waited_s) while waiting
        self._busy = threading.RLock()  # one user of the connection at a time
        self._depth = 0
        self._attached = False
        self._deadline: float | None = None
        self._wake = threading.Condition(threading.Lock())
        self._releaser: threading.Thread | None = None
        self._closed = False
        self._names = itertools.count(1)
        self._settings: set[str] | None = None

    @classmethod
    def open(cls, workspace, **conf) -> DuckDBEngine:
        return cls(workspace.catalog_path if workspace is not None else None, **conf)

    # -- the workspace catalog ---------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._attached

    @contextmanager
    def holding(self) -> Iterator[None]:
        """The workspace catalog attached for the duration (re-entrant)."""
        with self._busy:
            if self.catalog is not None and not self._attached:
                self._attach()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._attached:
                    self._lease()

    def release(self) -> None:
        """Detach the catalog now (it is attached again by the next statement)."""
        with self._busy:
            if self._depth == 0 and self._attached:
                self._detach()

    def _attach(self) -> None:
        t0 = time.monotonic()
        self.lock.acquire(self.lock_timeout, self.on_wait)
        try:
            while True:
                try:
                    self.con.execute(f"ATTACH '{_quote(self.path)}' AS {ALIAS}")
                    break
                except self._duckdb.IOException as exc:  # a process outside MLSQL has the file open
                    msg = str(exc)
                    if "lock" not in msg.lower() or time.monotonic() - t0 > self.lock_timeout:
                        raise _lock_error(self.path, msg) from None
                    if self.on_wait is not None:
                        self.on_wait(f"Waiting for the workspace catalog: {_holder_of(msg)} has it open",
                                     time.monotonic() - t0)
                    time.sleep(0.1)
                except self._duckdb.Error as exc:
                    raise WorkspaceError(f"Cannot open the workspace catalog {self.path}: {exc}") from None
            self.con.execute(f"USE {ALIAS}")
        except BaseException:
            self.lock.release()
            raise
        self._attached = True

    def _detach(self) -> None:
        self._deadline = None
        try:
            self.con.execute("USE memory")
            self.con.execute(f"DETACH {ALIAS}")
        finally:
            self._attached = False
            self.lock.release()

    def _lease(self) -> None:
        """Keep the catalog a little longer for the next statement, unless someone waits for it."""
        if self.idle_release_s <= 0 or self.lock.someone_waiting():
            self._detach()
            return
        with self._wake:
            self._deadline = time.monotonic() + self.idle_release_s
            if self._releaser is None:
                self._releaser = threading.Thread(target=self._release_when_idle, daemon=True,
                                                  name="mlsql-catalog-release")
                self._releaser.start()
            self._wake.notify()

    def _release_when_idle(self) -> None:
        while not self._closed:
            with self._wake:
                while self._deadline is None and not self._closed:
                    self._wake.wait()
                deadline = self._deadline
                if deadline is not None and time.monotonic() < deadline:
                    self._wake.wait(deadline - time.monotonic())
                    continue
            if self._busy.acquire(blocking=False):  # busy: the statement's end will lease again
                try:
                    if self._depth == 0 and self._attached and self._deadline is not None \
                            and time.monotonic() >= self._deadline:
                        self._detach()
                finally:
                    self._busy.release()
            else:
                time.sleep(0.01)

    # -- running SQL ---------------------------------------------------------
    def render(self, tree) -> str:
        return tree.sql("duckdb")

    def query(self, sql, params: dict | None = None, *, limit: int | None = None,
              line: int = 1) -> pa.Table:
        """Run one statement; its rows as an Arrow table (DDL gives DuckDB's count row)."""
        sql = self.text(sql)
        with self.holding():
            try:
                rel = self.con.sql(sql, params=params or None)
                if rel is None:
                    return pa.table({})
                if limit:
                    rel = rel.limit(limit)
                return rel.to_arrow_table()
            except self._duckdb.Error as exc:
                raise self._translate(exc, line, sql) from None

    def run(self, sql, params: dict | None = None, *, limit: int | None = None, line: int = 1) -> Fetched:
        """One statement as the user typed it: Arrow rows, and DuckDB's own Python values and
        pandas frame for ``fetchall()`` and ``to_pandas()`` (see ``duckdb_values``)."""
        from mlsql.engines.duckdb_values import needs_duckdb_values, pandas_frame, python_rows

        sql = self.text(sql)
        with self.holding():
            try:
                rel = self.con.sql(sql, params=params or None)
                if rel is None:
                    return Fetched(pa.table({}))
                if limit:
                    rel = rel.limit(limit)
                types = [d[1] for d in rel.description]
                if needs_duckdb_values(types):  # the Arrow export would lose values: ask DuckDB for them
                    return self._run_exactly(rel)
                table = rel.to_arrow_table()
            except self._duckdb.Error as exc:
                raise self._translate(exc, line, sql) from None
        return Fetched(table, rows=lambda t: python_rows(t, types), frame=lambda t: pandas_frame(t, types))

    def _run_exactly(self, rel) -> Fetched:
        """Run once into a temporary table, then take Arrow, Python values and pandas from it."""
        view, tmp = self.temp_name("rel"), self.temp_name("result")
        rel.to_view(view)
        try:
            self.con.execute(f"CREATE TEMP TABLE {tmp} AS FROM {view}")
            stored = self.con.table(tmp)
            table, rows = stored.to_arrow_table(), stored.fetchall()
            try:
                frame = stored.df()
            except self._duckdb.Error as exc:  # e.g. UHUGEINT has no NumPy form: to_pandas() says so
                frame = EngineError(str(exc).split("\n")[0])
        finally:
            self.con.execute(f"DROP VIEW IF EXISTS {view}")
            self.con.execute(f"DROP TABLE IF EXISTS temp.main.{tmp}")

        def as_frame(t: pa.Table):
            if isinstance(frame, Exception):
                raise frame
            return frame.iloc[: t.num_rows]

        return Fetched(table, rows=lambda t: rows[: t.num_rows], frame=as_frame)

    def _rows(self, sql: str, params: list | None = None) -> list[tuple]:
        """Small catalog queries, fully fetched (DuckDB refuses new work while a result is open)."""
        with self.holding():
            return self.con.sql(sql, params=params).fetchall()

    def _translate(self, exc: Exception, line: int, sql: str = "") -> Exception:
        err = self._translate_message(exc, line, sql)
        err.engine_error = type(exc).__name__
        return err

    def _translate_message(self, exc: Exception, line: int, sql: str = "") -> Exception:
        msg = str(exc)
        if not _LINE.search(msg) and sql:
            msg += _locate(msg, sql)
        if line > 1:  # DuckDB counts lines from the statement; users read the script
            msg = _LINE.sub(lambda m: f"LINE {int(m.group(1)) + line - 1}:", msg)
        near = _SYNTAX_AT.search(msg)
        if near and sql:
            first = sql.split(None, 1)[0].upper() if sql.split() else ""
            if near.group(1).upper() == first and first not in _STATEMENT_WORDS:
                from mlsql.errors import did_you_mean

                guess = did_you_mean(first, _STATEMENT_WORDS)
                if guess:
                    return EngineError(msg, hint=f"Did you mean {guess}?")
        setting = _UNKNOWN_SETTING.search(msg)
        if setting:
            name = setting.group(1)
            own = f"mlsql_{name.lower()}"
            hint = (f"MLSQL's own settings start with mlsql_: SET {own} = ..." if own in ("mlsql_engine", "mlsql_lock_timeout")
                    else f"'{name}' is not a DuckDB setting. A script variable is SET VARIABLE {name} = <value> "
                         f"(read it as ${{{name}}} or getvariable('{name}')).")
            return EngineError(msg.split("\n")[0], hint=hint)
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

    def variables(self) -> dict:
        """DuckDB's own variables (``SET VARIABLE``), with their values as DuckDB returns them."""
        with self._busy:
            names = [r[0] for r in self.con.execute("SELECT name FROM duckdb_variables()").fetchall()]
            if not names:
                return {}
            row = self.con.execute("SELECT " + ", ".join("getvariable(?)" for _ in names), names).fetchall()[0]
        return dict(zip(names, row))

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
        with self._busy:
            self.con.register(name, data)

    def unregister(self, name: str) -> None:
        with self._busy:
            try:
                self.con.unregister(name)
            except self._duckdb.Error:
                pass

    # -- data ----------------------------------------------------------------------
    def sample(self, query, n: int, seed: int = 42, params: dict | None = None) -> pa.Table:
        return self.query(f"SELECT * FROM ({self.text(query)}) AS t USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE ({int(seed)})",
                          params)

    def fingerprint(self, relation: str) -> Fingerprint:
        """Row count and an order-insensitive hash of every row of ``relation``."""
        ((n, h),) = self._rows(
            f"SELECT count(*), CAST(COALESCE(sum(hash(t)), 0) AS VARCHAR) FROM {relation} AS t"
        )
        return Fingerprint(int(n), f"{int(h) % (1 << 64):016x}", "duckdb:sum(hash(row))")

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        with self._busy:
            try:
                if self._attached:
                    self._detach()
            except Exception:
                pass
            try:
                self.con.close()
            except Exception:
                pass


def _quote(s: str) -> str:
    return s.replace("'", "''")


def _holder_of(msg: str) -> str:
    holder = re.search(r"held in (.+?) \(PID (\d+)\)", msg)
    return f"process {holder.group(2)} ({holder.group(1)})" if holder else "another process"


def _lock_error(path: str, msg: str) -> WorkspaceError:
    return WorkspaceError(
        f"The workspace catalog {path} is open in {_holder_of(msg)}, outside MLSQL",
        hint="A program that opens catalog.duckdb directly (the duckdb CLI, a script) keeps it from everyone "
             "else until it closes it. Close it, or read the workspace through MLSQL.")

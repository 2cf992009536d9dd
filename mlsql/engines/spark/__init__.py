"""The Spark engine: the same MLSQL statements on a SparkSession (local, a cluster, or Spark Connect).

MLSQL's own SQL is DuckDB's (the planner, the TRANSFORM fitter and the user's statements all
write it), so this engine renders every statement into Spark SQL with sqlglot before Spark
sees it. Where sqlglot's translation would silently change the meaning, a rewrite here keeps
DuckDB's (``LOG(x)`` is base 10 in DuckDB and the natural log in Spark; ``quantile_cont`` with a
list of fractions is Spark's ``percentile``). What sqlglot cannot translate raises an
``EngineError`` naming the construct; users who want Spark's own SQL say so with
``SET mlsql_dialect = 'spark'`` and their plain statements then reach Spark as written.

Sources: the Spark catalog (tables, temp views), files by path (``'x.parquet'``,
``read_parquet``, ``read_csv``, ``read_json``), and tables of the workspace's DuckDB catalog
when named ``workspace.<table>`` (or ``duckdb.<table>``): those are read from DuckDB as Arrow
and handed to Spark as a temporary view, at each statement that names them.

The SparkSession starts on the first statement, once per process (per master or remote URL);
each engine works in its own ``newSession()`` so temporary views do not leak between sessions.
Nothing here is imported by ``import mlsql``.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel, UnsupportedError
from sqlglot.errors import ParseError as SqlglotParseError

from mlsql.engines.base import Engine, Fetched, Fingerprint
from mlsql.errors import EngineError, MLSQLError, ParseError, UnknownTableError

DEFAULT_MASTER = "local[2]"
FINGERPRINT_ALGORITHM = "spark:sum(xxhash64(row))"
# read_csv's options that mean the same to Spark's CSV reader (DuckDB name -> Spark option)
_CSV_OPTIONS = {"nullstr": "nullValue", "delim": "sep", "sep": "sep", "header": "header", "quote": "quote",
                "escape": "escape"}
# names under which a statement reaches the workspace's DuckDB tables
DUCKDB_PREFIXES = ("workspace", "duckdb")
_FILE_FORMATS = {"readparquet": "parquet", "readcsv": "csv", "readjson": "json", "read_parquet": "parquet",
                 "read_csv": "csv", "read_csv_auto": "csv", "read_json": "json", "read_json_auto": "json",
                 "read_ndjson": "json"}
_DEFAULT_CONF = {
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    # a kernel's data is small next to Spark's default of 200 shuffle partitions
    "spark.sql.shuffle.partitions": "4",
    # DuckDB's TIMESTAMP has no time zone: keep Spark's the same, so values round-trip unchanged
    "spark.sql.timestampType": "TIMESTAMP_NTZ",
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}

_shared: dict[str, Any] = {}  # master or remote URL -> the process's SparkSession
_shared_lock = threading.Lock()


def _local_session(master: str, settings: dict, log_path: Path):
    """A SparkSession whose JVM writes to ``log_path``: log4j's start-up lines, its WARNs, the JDK's
    and the Python workers' output (the workers are the JVM's children: xgboost.spark's per-round
    lines come from there) would otherwise reach the notebook cell through the kernel's stderr."""
    import subprocess

    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    conf = SparkConf().setAppName("mlsql").setMaster(master)
    for k, v in settings.items():
        conf.set(k, v)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        log.write(f"\n--- Spark ({master}) started by pid {os.getpid()} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode())
        log.flush()
        gateway = launch_gateway(conf, popen_kwargs={"stdout": log, "stderr": subprocess.STDOUT})
    return SparkSession(SparkContext(conf=conf, gateway=gateway))


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def spark_session(master: str | None = None, remote: str | None = None, conf: dict | None = None,
                  on_wait: Callable[[str, float], None] | None = None, log_path: Path | None = None):
    """The process's SparkSession for ``master`` (or Spark Connect ``remote``), started on first use.

    Starting takes seconds (a JVM for local masters), so ``on_wait`` hears about it every half
    second: the notebook shows it in the cell. A local JVM's own output goes to ``log_path``
    (default: a file in the temporary folder), never to the notebook."""
    key = f"remote:{remote}" if remote else f"master:{master or DEFAULT_MASTER}"
    with _shared_lock:
        got = _shared.get(key)
        if got is not None and not _stopped(got):
            return got
        # Python workers must run this interpreter (with pandas and pyarrow), not the system one
        os.environ["PYSPARK_PYTHON"] = sys.executable
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        if remote:
            # the Connect client's own builder: pyspark.sql's refuses a remote session in a process
            # that already runs a local one (two MLSQL sessions, one local and one remote)
            from pyspark.sql.connect.session import SparkSession
        else:
            from pyspark.sql import SparkSession

        settings = dict(_DEFAULT_CONF)
        if not remote:
            settings.setdefault("spark.sql.warehouse.dir", tempfile.mkdtemp(prefix="mlsql-spark-warehouse-"))
        settings.update({k: str(v) for k, v in (conf or {}).items()})
        builder = SparkSession.builder.appName("mlsql")
        if remote:
            builder = builder.remote(remote)
            settings = {k: v for k, v in settings.items() if not k.startswith(("spark.ui.", "spark.sql.warehouse"))}
        else:
            builder = builder.master(master or DEFAULT_MASTER)
        for k, v in settings.items():
            builder = builder.config(k, v)
        where = remote or master or DEFAULT_MASTER
        box: dict = {}

        log_path = Path(log_path or Path(tempfile.gettempdir()) / "mlsql-spark.log")

        def start():
            try:
                box["spark"] = builder.getOrCreate() if remote else _local_session(master or DEFAULT_MASTER,
                                                                                   settings, log_path)
            except BaseException as exc:  # reported in the caller's thread
                box["error"] = exc

        t0 = time.monotonic()
        worker = threading.Thread(target=start, daemon=True, name="mlsql-spark-start")
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
            if worker.is_alive() and on_wait is not None:
                on_wait(f"Starting Spark ({where})", time.monotonic() - t0)
        if "error" in box:
            exc = box["error"]
            tail = "" if remote else _log_tail(log_path)
            raise EngineError(f"Spark could not start on {where}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
                              + (f"\nIts log ({log_path}) ends with:\n{tail}" if tail else ""),
                              hint="Check that Java 17+ is installed (JAVA_HOME) and that the master/remote URL "
                                   "is reachable.") from None
        if not remote:
            from mlsql import logs

            box["spark"].sparkContext.setLogLevel(logs.spark_level())  # into the log file, not the cell
        _shared[key] = box["spark"]
        return box["spark"]


def _stopped(spark) -> bool:
    try:
        jsc = getattr(getattr(spark, "sparkContext", None), "_jsc", None)
        return jsc is not None and jsc.sc().isStopped()
    except Exception:
        return False


class SparkEngine(Engine):
    """One MLSQL session's view of a SparkSession."""

    name = "spark"
    dialect = "spark"

    def __init__(self, workspace=None, *, master: str | None = None, remote: str | None = None,
                 conf: dict | None = None, **spark_conf):
        self.workspace = workspace
        self.master = master or (None if remote else os.environ.get("MLSQL_SPARK_MASTER") or DEFAULT_MASTER)
        self.remote = remote or None
        # conf={'spark.x': ...} or spark_x=... keyword arguments: passed to the builder as they are
        self.conf = {**(conf or {}), **{k.replace("_", "."): v for k, v in spark_conf.items()}}
        self.on_wait: Callable[[str, float], None] | None = None
        self.lock_timeout = None  # SET mlsql_lock_timeout applies to the workspace catalog, read here through DuckDB
        self._spark = None
        self._names = itertools.count(1)
        self._views: set[str] = set()
        self._duckdb = None
        self._busy = threading.RLock()
        self._rendered: dict[str, str] = {}  # statement -> its Spark SQL, for statements with no handover
        self._handed_over = False

    @classmethod
    def open(cls, workspace, **conf) -> SparkEngine:
        return cls(workspace, **conf)

    def log_level_changed(self) -> None:
        if self._spark is not None and not self.remote:
            from mlsql import logs

            self._spark.sparkContext.setLogLevel(logs.spark_level())

    @property
    def spark(self):
        """This engine's SparkSession, started (once per process) on first use."""
        if self._spark is None:
            root = getattr(self.workspace, "root", None)
            base = spark_session(self.master, self.remote, self.conf, self.on_wait,
                                 log_path=Path(root) / "logs" / "spark.log" if root is not None else None)
            if self.remote:
                self._spark = base  # a Connect session is already the client's own
            else:
                self._spark = base.newSession()
                for k, v in self.conf.items():  # SQL settings are per session: the new one needs them too
                    if k.startswith("spark.sql.") and "warehouse" not in k and "catalogImplementation" not in k:
                        self._spark.conf.set(k, str(v))
                for k, v in _DEFAULT_CONF.items():
                    if k.startswith("spark.sql.") and k not in self.conf:
                        self._spark.conf.set(k, v)
        return self._spark

    @property
    def started(self) -> bool:
        return self._spark is not None

    # -- rendering -------------------------------------------------------------------------
    def render(self, sql, *, line: int = 1) -> str:
        """A plan step's tree, or MLSQL's (DuckDB) SQL text, as Spark SQL, sources resolved; an
        error names what cannot be rendered. A tree is rendered as it is, never written out and read
        again.

        A text statement that reads no file and no workspace table renders the same every time: its
        rendering is kept (parsing and generating cost tens of milliseconds a statement)."""
        if not isinstance(sql, str):
            return self._spark_sql(sql.copy())
        got = self._rendered.get(sql)
        if got is not None:
            return got
        self._handed_over = False
        text = self._render(sql, line=line)
        if not self._handed_over:
            if len(self._rendered) >= 256:
                self._rendered.clear()
            self._rendered[sql] = text
        return text

    def _render(self, sql: str, *, line: int = 1) -> str:
        try:
            trees = [t for t in sqlglot.parse(sql, read="duckdb") if t is not None]
        except SqlglotParseError as exc:
            err = exc.errors[0] if exc.errors else {}
            raise ParseError(str(exc).split("\n")[0], sql=sql, line=(err.get("line") or 1) + line - 1,
                             col=err.get("col")) from None
        if len(trees) != 1:
            raise EngineError(f"Expected one statement, got {len(trees)}")
        return self._spark_sql(trees[0])

    def _spark_sql(self, tree: exp.Expression) -> str:
        tree = self._resolve_sources(_keep_duckdb_meaning(tree))
        _refuse_duckdb_only(tree)
        try:
            return tree.sql(dialect="spark", unsupported_level=ErrorLevel.RAISE)
        except UnsupportedError as exc:
            raise EngineError(f"Spark SQL cannot express this DuckDB construct: {exc}",
                              hint="Rewrite it, or write Spark SQL directly after SET mlsql_dialect = 'spark'.") from None

    def _resolve_sources(self, tree: exp.Expression) -> exp.Expression:
        for table in list(tree.find_all(exp.Table)):
            view = None
            src = table.this
            if isinstance(src, exp.Func) and not isinstance(src, exp.Anonymous | exp.Unnest):
                fmt = _FILE_FORMATS.get(type(src).__name__.lower()) or _FILE_FORMATS.get(
                    (src.sql_name() or "").lower())
                if fmt is not None:
                    view = self._file_view(src, fmt)
            elif isinstance(src, exp.Anonymous) and src.name.lower() in _FILE_FORMATS:
                view = self._file_view(src, _FILE_FORMATS[src.name.lower()])
            elif isinstance(src, exp.Identifier) and src.quoted and not table.db and _looks_like_path(src.name):
                view = self._path_view(src.name, {})
            elif table.db.lower() in DUCKDB_PREFIXES and not table.catalog:
                view = self._duckdb_view(table.name)
            if view is not None:
                self._handed_over = True  # read anew at each statement: not kept with the rendering
                alias = table.args.get("alias") or exp.TableAlias(this=exp.to_identifier(table.name if table.db else "t"))
                table.replace(exp.Table(this=exp.to_identifier(view), alias=alias))
        return tree

    def _file_view(self, fn: exp.Expression, fmt: str) -> str:
        from mlsql.language.options import read_literal

        args = [fn.this] if fn.this is not None else []
        args += list(fn.expressions)
        paths, options = [], {}
        for a in args:
            if isinstance(a, exp.Literal) and a.is_string:
                paths.append(a.this)
            elif isinstance(a, exp.EQ | exp.PropertyEQ | exp.Kwarg):
                key = a.this.name.lower()
                options[key] = read_literal(a.expression, where=f"{fn.sql('duckdb')}: option {key}")
        if not paths:
            raise EngineError(f"{fn.sql('duckdb')}: give the file path as a string literal")
        known = _CSV_OPTIONS if fmt == "csv" else {}
        unknown = sorted(set(options) - set(known))
        if unknown:  # read differently by Spark or not at all: never a silently different table
            raise EngineError(
                f"{fn.sql('duckdb')}: option {', '.join(unknown)} has no Spark equivalent here",
                hint=(f"Options read on Spark: {', '.join(sorted(known))}. " if known else "")
                + "Or read the file on DuckDB and hand the table over (workspace.<table>).")
        return self._path_view(paths[0], options, fmt)

    def _path_view(self, path: str, options: dict, fmt: str | None = None) -> str:
        fmt = fmt or ("csv" if path.lower().endswith((".csv", ".csv.gz", ".tsv")) else
                      "json" if path.lower().endswith((".json", ".jsonl", ".ndjson")) else "parquet")
        reader = self.spark.read.format(fmt)
        if fmt == "csv":
            # DuckDB's read_csv sniffs a header and the column types; Spark does when asked to
            reader = reader.option("header", "true").option("inferSchema", "true")
            for k, v in options.items():
                reader = reader.option(_CSV_OPTIONS[k], str(v).lower() if isinstance(v, bool) else str(v))
        view = self.temp_name("file")
        try:
            reader.load(path).createOrReplaceTempView(view)
        except Exception as exc:
            raise self._translate(exc, 1, path) from None
        self._views.add(view)
        return view

    def _duckdb_view(self, table: str) -> str:
        """A table of the workspace's DuckDB catalog as a Spark temp view (read now, as Arrow)."""
        if self.workspace is None:
            raise EngineError(f"workspace.{table}: this session has no workspace to read DuckDB tables from")
        if self._duckdb is None:
            from mlsql.engines.duckdb import DuckDBEngine

            self._duckdb = DuckDBEngine(self.workspace.catalog_path)
        if self.lock_timeout is not None:
            self._duckdb.lock_timeout = self.lock_timeout
        self._duckdb.on_wait = self.on_wait
        if not self._duckdb.has_relation(table):
            raise UnknownTableError(table, self._duckdb.table_names(),
                                    message=f"The workspace's DuckDB catalog has no table '{table}'")
        data = self._duckdb.query(f'SELECT * FROM "{table}"')
        self._duckdb.release()
        view = f"__mlsql_duckdb_{table.lower()}"
        self.register(view, data)
        return view

    # -- running SQL -----------------------------------------------------------------------
    def query(self, sql, params: dict | None = None, *, limit: int | None = None,
              line: int = 1, dialect: str | None = None) -> pa.Table:
        """Run one statement; ``dialect='spark'``: the text is Spark SQL already, sent as written."""
        with self._busy:
            text = sql if dialect == "spark" else self.render(sql, line=line)
            try:
                df = self.spark.sql(text, args=_spark_params(params))
                if limit:
                    df = df.limit(limit)
                return _from_spark(df.toArrow())
            except MLSQLError:
                raise
            except Exception as exc:
                raise self._translate(exc, line, text) from None

    def dataframe(self, sql, params: dict | None = None, *, line: int = 1, dialect: str | None = None):
        """The statement as a Spark DataFrame, not yet run: training and scoring work on it in the
        executors, and nothing reaches the driver until the user fetches rows."""
        with self._busy:
            text = sql if dialect == "spark" else self.render(sql, line=line)
            try:
                return self.spark.sql(text, args=_spark_params(params))
            except MLSQLError:
                raise
            except Exception as exc:
                raise self._translate(exc, line, text) from None

    def executor_trainer(self, family: str):
        """Classic sessions train every family in the executors (``dnn`` is refused there with a
        hint). Spark Connect sessions train linear models, kmeans and pca in the executors too;
        boosted trees, random forests and DNNs come to the driver, because xgboost.spark needs a
        SparkContext, which Connect hides. kmeans and pca train with Spark ML; arima_plus series in a
        grouped Arrow UDF."""
        if family == "arima":  # one grouped Arrow UDF call per series, classic and Connect alike
            from mlsql.engines.spark import forecast as spark_forecast

            return spark_forecast
        if family in ("kmeans", "pca"):
            from mlsql.engines.spark import unsupervised

            return unsupervised
        if self.remote is None or family == "linear":
            from mlsql.engines.spark import train as spark_train

            return spark_train
        return None

    def executor_scorer(self):
        """ML functions score in the executors, classic and Spark Connect sessions alike."""
        from mlsql.engines.spark import score as spark_score

        return spark_score

    def workers(self) -> int:
        """Task slots to spread one training over (xgboost.spark's ``num_workers``)."""
        try:
            return max(1, int(self.spark.sparkContext.defaultParallelism))
        except Exception:
            return 1

    def run(self, sql, params: dict | None = None, *, limit: int | None = None, line: int = 1,
            dialect: str | None = None) -> Fetched:
        return Fetched(self.query(sql, params, limit=limit, line=line, dialect=dialect))

    def _translate(self, exc: Exception, line: int, sql: str = "") -> MLSQLError:
        try:
            cond = exc.getCondition() or ""  # pyspark 4: the error class, e.g. TABLE_OR_VIEW_NOT_FOUND
        except Exception:
            cond = ""
        msg = str(exc).strip().split("\n")[0]
        if cond.startswith("TABLE_OR_VIEW_NOT_FOUND"):
            params = {}
            try:
                params = exc.getMessageParameters() or {}
            except Exception:
                pass
            name = (params.get("relationName") or "").replace("`", "").split(".")[-1] or "?"
            err = UnknownTableError(name, self.table_names(), message=f"Table {name} does not exist (Spark)")
        else:
            err = EngineError(f"Spark: {msg}")
        err.engine_error = cond or type(exc).__name__
        return err

    # -- Arrow in --------------------------------------------------------------------------
    def temp_name(self, kind: str = "t") -> str:
        return f"__mlsql_{kind}_{next(self._names)}"

    def register(self, name: str, data) -> None:
        if _is_spark_frame(data):  # a DataFrame of this session stays where it is
            with self._busy:
                data.createOrReplaceTempView(name)
                self._views.add(name)
            return
        table = _to_arrow(data)
        with self._busy:
            try:
                df = self.spark.createDataFrame(_sparkable(table))
            except Exception as exc:
                raise EngineError(f"Spark cannot take the data registered as '{name}': {str(exc).splitlines()[0]}") from None
            df.createOrReplaceTempView(name)
            self._views.add(name)

    def unregister(self, name: str) -> None:
        if self._spark is None:
            return
        with self._busy:
            try:
                self._spark.catalog.dropTempView(name)
            except Exception:
                pass
            self._views.discard(name)

    # -- catalog ---------------------------------------------------------------------------
    def table_names(self) -> list[str]:
        return sorted({t.name for t in self.spark.catalog.listTables()})

    def has_relation(self, name: str) -> bool:
        try:
            return bool(self.spark.catalog.tableExists(name))
        except Exception:
            return False

    # -- data ------------------------------------------------------------------------------
    def _functions(self):
        """Column functions of this engine's kind of session (a process may hold a local session
        and a Connect one, and pyspark.sql.functions picks one kind for the whole process)."""
        if self.remote:
            from pyspark.sql.connect import functions
        else:
            from pyspark.sql import functions
        return functions

    def sample(self, query, n: int, seed: int = 42, params: dict | None = None) -> pa.Table:
        """Rows ordered by a hash of their values and the seed: the same rows for the same data,
        whatever the partitioning (Spark's TABLESAMPLE depends on it)."""
        F = self._functions()
        with self._busy:
            try:
                df = self.spark.sql(self.render(query), args=_spark_params(params))
                keyed = [F.col(f"`{c}`") for c in df.columns]
                df = df.orderBy(F.xxhash64(*keyed, F.lit(int(seed)))).limit(int(n))
                return _from_spark(df.toArrow())
            except MLSQLError:
                raise
            except Exception as exc:
                raise self._translate(exc, 1, query) from None

    def fingerprint(self, relation: str) -> Fingerprint:
        F = self._functions()
        with self._busy:
            df = self.spark.table(relation)
            h = F.xxhash64(*[F.col(f"`{c}`") for c in df.columns])
            # Σ hash mod 2⁶⁴ as Σ(upper 32 bits, signed)·2³² + Σ(lower 32 bits): two long sums, which
            # cannot overflow below 2³¹ rows, instead of a decimal(38) sum (a quarter of the pass)
            n, hi, lo = df.agg(F.count(F.lit(1)), F.sum(F.shiftright(h, 32)),
                               F.sum(h.bitwiseAND(F.lit(0xFFFFFFFF)))).first()
        total = ((hi or 0) << 32) + (lo or 0)
        return Fingerprint(int(n), f"{total % (1 << 64):016x}", FINGERPRINT_ALGORITHM)

    # -- settings --------------------------------------------------------------------------
    def variables(self) -> dict:
        return {}  # Spark SQL variables (DECLARE VARIABLE) are not exposed as ${name}

    def settings(self) -> set[str]:
        try:
            return {k.lower() for k in self.spark.conf.getAll}
        except Exception:
            return set()

    def close(self) -> None:
        """Drop this engine's views; the process's SparkSession stays for the next session."""
        if self._spark is not None:
            for name in list(self._views):
                self.unregister(name)
            if self.remote:
                try:
                    self._spark.stop()
                except Exception:
                    pass
                with _shared_lock:
                    _shared.pop(f"remote:{self.remote}", None)
            self._spark = None
        if self._duckdb is not None:
            self._duckdb.close()
            self._duckdb = None


# -- DuckDB meaning kept -------------------------------------------------------------------


def _keep_duckdb_meaning(tree: exp.Expression) -> exp.Expression:
    """Rewrite the constructs sqlglot would translate into a Spark query that means something else."""

    def fix(node: exp.Expression) -> exp.Expression:
        # DuckDB: LOG(x) is log10; Spark: LOG(x) is ln. Say the base.
        if isinstance(node, exp.Log) and node.args.get("expression") is None:
            return exp.Log(this=exp.Literal.number(10), expression=node.this)
        # DuckDB's quantile_cont interpolates like Spark's percentile (PERCENTILE_CONT(x, p) is not Spark SQL)
        if isinstance(node, exp.PercentileCont | exp.Quantile) and node.args.get("expression") is not None:
            return exp.Anonymous(this="PERCENTILE", expressions=[node.this, node.expression])
        if isinstance(node, exp.Median):
            return exp.Anonymous(this="PERCENTILE", expressions=[node.this, exp.Literal.number(0.5)])
        # DuckDB numbers weekdays Sunday = 0 (dayofweek, weekday, dow) or Monday = 1 (isodow);
        # Spark's DAYOFWEEK is Sunday = 1 and its WEEKDAY is Monday = 0
        part = _weekday_part(node)
        if part is not None:
            day, iso = part
            if iso:
                return exp.Paren(this=exp.Add(this=exp.Anonymous(this="WEEKDAY", expressions=[day]),
                                              expression=exp.Literal.number(1)))
            return exp.Paren(this=exp.Sub(this=exp.Anonymous(this="DAYOFWEEK", expressions=[day]),
                                          expression=exp.Literal.number(1)))
        return node

    return tree.transform(fix, copy=False)


def _weekday_part(node: exp.Expression) -> tuple[exp.Expression, bool] | None:
    """``(date, iso)`` when ``node`` is a DuckDB day-of-week, in any of its spellings."""
    if isinstance(node, exp.DayOfWeekIso):
        return node.this, True
    if isinstance(node, exp.DayOfWeek):
        return node.this, False
    if isinstance(node, exp.Anonymous) and node.name.lower() in ("weekday", "isodow") and node.expressions:
        return node.expressions[0], node.name.lower() == "isodow"
    if isinstance(node, exp.Extract) or (isinstance(node, exp.Anonymous) and node.name.lower() == "date_part"
                                         and len(node.expressions) == 2):
        unit, day = (node.this, node.expression) if isinstance(node, exp.Extract) else node.expressions
        name = unit.name.lower() if isinstance(unit, exp.Var | exp.Identifier | exp.Literal | exp.Column) else ""
        if name in ("dow", "dayofweek", "weekday"):
            return day, False
        if name == "isodow":
            return day, True
    return None


def _refuse_duckdb_only(tree: exp.Expression) -> None:
    """DuckDB's star modifiers and COLUMNS(), which sqlglot writes out unchanged for Spark (whose
    parser then fails somewhere else): an error naming the construct instead."""
    found = None
    for node in tree.walk():
        if isinstance(node, exp.Star):
            for key, what in (("replace", "SELECT * REPLACE (...)"), ("rename", "SELECT * RENAME (...)"),
                              ("ilike", "SELECT * ILIKE '...'")):
                if node.args.get(key):
                    found = what
        elif isinstance(node, exp.Columns):
            found = "COLUMNS(...)"
        if found:
            raise EngineError(
                f"Spark SQL cannot express this DuckDB construct: {found}",
                hint="Name the columns, or write Spark SQL directly after SET mlsql_dialect = 'spark'.")


def _looks_like_path(name: str) -> bool:
    low = name.lower()
    return "/" in name or low.endswith((".parquet", ".csv", ".csv.gz", ".tsv", ".json", ".jsonl", ".ndjson"))


# -- Arrow conversions ---------------------------------------------------------------------


def _spark_params(params: dict | None) -> dict | None:
    if not params:
        return None
    return {k: v for k, v in params.items()}


def _is_spark_frame(data) -> bool:
    mod = type(data).__module__
    return mod.startswith("pyspark.sql") and type(data).__name__ == "DataFrame"


def _to_arrow(data) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    mod = type(data).__module__.split(".")[0]
    if mod == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    if mod == "polars":
        return (data.collect() if hasattr(data, "collect") else data).to_arrow()
    if mod == "pyarrow" and hasattr(data, "to_table"):  # a dataset
        return data.to_table()
    raise EngineError(f"Cannot register a {type(data).__name__} on Spark",
                      hint="Give an Arrow table, a pandas or polars DataFrame.")


def _spark_type(t: pa.DataType) -> pa.DataType:
    """The nearest Arrow type Spark's Arrow reader accepts."""
    if pa.types.is_dictionary(t):
        return _spark_type(t.value_type)
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_uint8(t) or pa.types.is_uint16(t):
        return pa.int32()
    if pa.types.is_uint32(t):
        return pa.int64()
    if pa.types.is_uint64(t):
        return pa.decimal128(20, 0)
    if pa.types.is_null(t):
        return pa.string()
    if pa.types.is_time(t):
        return pa.string()
    if pa.types.is_timestamp(t) and t.unit == "ns":
        return pa.timestamp("us", t.tz)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(_spark_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _spark_type(f.type)) for f in t])
    return t


def _sparkable(table: pa.Table) -> pa.Table:
    target = pa.schema([pa.field(f.name, _spark_type(f.type)) for f in table.schema])
    return table if target == table.schema else table.cast(target)


def _from_spark(table: pa.Table) -> pa.Table:
    """Spark's Arrow as DuckDB gives it: naive timestamps stay naive."""
    fields = []
    changed = False
    for f in table.schema:
        t = f.type
        if pa.types.is_large_string(t):
            t, changed = pa.string(), True
        fields.append(pa.field(f.name, t))
    return table.cast(pa.schema(fields)) if changed else table

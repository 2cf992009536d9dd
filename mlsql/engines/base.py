"""The engine contract, and the registry of engines by name.

An engine runs SQL for a session and hands back Arrow. Everything else in MLSQL (the
planner, the trainers, the export) talks to it through this class only, so a new engine
is one module with one subclass plus a line in ``ENGINES`` (or an entry point in the
``mlsql.engines`` group), imported only when a session asks for it.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlsql._lazy import pyarrow as pa  # imported by the first statement, not by connect()
from mlsql.errors import MLSQLError, did_you_mean

if TYPE_CHECKING:
    from sqlglot import exp

    from mlsql.workspace import Workspace

# What an engine runs: a plain statement's text exactly as the user typed it, or a tree of a plan
# step (``mlsql.plan.planner``), which the engine renders in its own dialect (``render``).
SQL = "str | exp.Expression"

# name -> "module:Class"; third-party engines register in the entry-point group "mlsql.engines"
ENGINES = {
    "duckdb": "mlsql.engines.duckdb:DuckDBEngine",
    "spark": "mlsql.engines.spark:SparkEngine",
}
EXTRAS = {"spark": "spark"}  # engine name -> the pip extra that brings its dependencies


@dataclass(frozen=True)
class Fingerprint:
    """Row count and an order-insensitive digest of a relation's rows; ``algorithm`` names how
    the digest was computed, so two digests are compared only when they were made alike."""

    rows: int
    digest: str
    algorithm: str


@dataclass
class Fetched:
    """A statement's rows as Arrow, with the engine's own Python values when they differ from
    Arrow's (``rows(table)`` → what the engine's ``fetchall`` gives; ``frame(table)`` → its pandas)."""

    table: pa.Table
    rows: Any = None
    frame: Any = None


class Engine(ABC):
    """One engine serving one session. Subclasses set ``name`` and ``dialect`` (sqlglot's)."""

    name: str = ""
    dialect: str = ""
    # -- training and ML functions where the data is (optional) ------------------
    # An engine whose data lives elsewhere (Spark's executors) may train and score there. It
    # returns the code that does so from these two hooks, and the steps call it without knowing
    # the engine; by default the rows come to this process as Arrow and MLSQL's own trainers and
    # ML functions run on them.

    def executor_trainer(self, family: str):
        """For CREATE MODEL of this model family (``boosted_tree``, ``linear``, ``dnn``) where the
        data is: an object with ``prepare(engine, step, params, temps)`` → ``(transform, raw Arrow
        schema, Fingerprint, frame, example rows, example features)`` and ``train(engine, frame,
        opts, progress)`` → ``TrainedModel`` (``mlsql.engines.spark.train`` is one). None: train here."""
        return None

    def executor_scorer(self):
        """For ML.PREDICT, ML.EXPLAIN_PREDICT and ML.EVALUATE where the data is: an object with
        ``predict(engine, loaded_model, frame, func, settings)`` → a lazy frame and
        ``evaluate(engine, loaded_model, frame, threshold)`` → ``Evaluation`` (``mlsql.engines.spark.score``
        is one), the frames read by ``self.dataframe(sql, params)``. None: score here."""
        return None

    # -- running SQL -----------------------------------------------------------
    @abstractmethod
    def render(self, tree: exp.Expression) -> str:
        """A plan step's tree as this engine's SQL text (sqlglot's generator for its dialect, and
        whatever the engine resolves itself, such as Spark's views of workspace tables)."""

    def text(self, sql: SQL) -> str:
        """What the engine sends: the user's text as typed, or the tree rendered once."""
        return sql if isinstance(sql, str) else self.render(sql)

    @abstractmethod
    def query(self, sql: SQL, params: dict | None = None, *, limit: int | None = None,
              line: int = 1) -> pa.Table:
        """Run one statement (``sql``: text in this engine's SQL, or a tree it renders); its rows
        as Arrow. Errors are MLSQLErrors (``line``: where the statement starts in the user's
        script, for positions). ``$name`` placeholders take ``params``."""

    def run(self, sql: SQL, params: dict | None = None, *, limit: int | None = None, line: int = 1) -> Fetched:
        """``query`` of a statement's last step, keeping what the engine knows about its own
        Python values (DuckDB's ``fetchall`` types)."""
        return Fetched(self.query(sql, params, limit=limit, line=line))

    def dataframe(self, sql: SQL, params: dict | None = None, *, line: int = 1):
        """The statement as the engine's own lazy frame, for an engine whose ``executor_trainer`` or
        ``executor_scorer`` works where the data is; by default its rows as Arrow (``query``)."""
        return self.query(sql, params, line=line)

    def workers(self) -> int:
        """How many tasks one training may spread over where the data is (1: this process)."""
        return 1

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Keep the workspace's shared state available across several calls (a statement that
        queries more than once). Engines with nothing to hold need not override it."""
        yield

    # -- Arrow in --------------------------------------------------------------
    @abstractmethod
    def register(self, name: str, data: Any) -> None:
        """Expose an Arrow table (or a pandas/polars frame) as a temporary relation ``name``."""

    @abstractmethod
    def unregister(self, name: str) -> None:
        """Drop a relation made by ``register``; unknown names are ignored."""

    @abstractmethod
    def temp_name(self, kind: str = "t") -> str:
        """A fresh name for a temporary relation."""

    # -- catalog -----------------------------------------------------------------
    @abstractmethod
    def table_names(self) -> list[str]:
        """Tables and views the user can query by name."""

    @abstractmethod
    def has_relation(self, name: str) -> bool:
        """Is ``name`` a table or view of the catalog?"""

    # -- data ------------------------------------------------------------------------
    @abstractmethod
    def sample(self, query: SQL, n: int, seed: int = 42, params: dict | None = None) -> pa.Table:
        """At most ``n`` rows of ``query`` (with its named ``params``), the same ones for the same data and seed."""

    @abstractmethod
    def fingerprint(self, relation: str) -> Fingerprint:
        """Row count and order-insensitive digest of the relation's rows."""

    # -- settings ----------------------------------------------------------------------
    @abstractmethod
    def variables(self) -> dict[str, Any]:
        """The script variables the engine holds (DuckDB: ``SET VARIABLE``), by name."""

    @abstractmethod
    def settings(self) -> set[str]:
        """Names of the engine's own settings (lower case)."""

    @classmethod
    @abstractmethod
    def open(cls, workspace: Workspace | None, **conf) -> Engine:
        """An engine on ``workspace`` (None: nothing shared, everything in memory)."""

    def log_level_changed(self) -> None:
        """``SET mlsql_log_level`` changed :mod:`mlsql.logs`' level: apply it to what the engine
        runs outside Python's loggers (Spark's JVM). Nothing to do for an in-process engine."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release everything the engine holds."""


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass registered under ``name``, imported on first use."""
    key = str(name).lower()
    target = ENGINES.get(key) or _entry_points().get(key)
    if target is None:
        names = engine_names()
        near = did_you_mean(key, names)
        raise MLSQLError(f"Unknown engine '{name}'",
                         hint=(f"Did you mean '{near}'? " if near else "") + f"Available engines: {', '.join(names)}.")
    module, _, cls = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get(key, key)
        raise MLSQLError(f"The {key} engine needs {exc.name}, which is not installed",
                         hint=f"pip install 'mlsql[{extra}]'") from None
    return getattr(mod, cls)


def open_engine(name: str, workspace: Workspace, **conf) -> Engine:
    """A new engine of kind ``name`` on ``workspace``."""
    return engine_class(name).open(workspace, **conf)


def engine_names() -> list[str]:
    return sorted({*ENGINES, *_entry_points()})


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    try:
        return {ep.name.lower(): ep.value for ep in entry_points(group="mlsql.engines")}
    except Exception:  # a broken third-party distribution must not break the built-in engines
        return {}

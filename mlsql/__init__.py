"""MLSQL: machine learning in SQL, from a notebook cell to a model on a device.

``import mlsql`` stays light: the engine, the trainers and MLflow load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlsql.errors import MLSQLError

__version__ = "0.1.0"
__all__ = ["MLSQLError", "Session", "connect", "__version__", "load_ipython_extension", "plot_trials"]

if TYPE_CHECKING:  # pragma: no cover
    from mlsql.runtime.session import Session


def connect(workspace: str | None = None, engine: str = "duckdb", **kwargs) -> Session:
    """Open a session on a workspace folder (default ``./.mlsql`` or ``MLSQL_HOME``)."""
    from mlsql.runtime.session import Session

    return Session(workspace, engine, **kwargs)


def load_ipython_extension(ipython) -> None:
    """``%load_ext mlsql``: registers the ``%mlsql`` / ``%%mlsql`` magics."""
    from mlsql.notebook.magic import MLSQLMagic

    ipython.register_magics(MLSQLMagic(ipython))


def __getattr__(name: str):
    if name == "Session":
        from mlsql.runtime.session import Session

        return Session
    if name == "monitor":  # the live device monitor (mlsql.notebook.monitor: anywidget loads on first use)
        from mlsql.notebook.monitor import monitor

        return monitor
    if name == "experiment_monitor":  # an A/B experiment's live panel (mlsql.notebook.experiment_monitor)
        from mlsql.notebook.experiment_monitor import experiment_monitor

        return experiment_monitor
    if name == "plot_trials":  # a tuned model's charts again (mlsql.notebook.trials)
        from mlsql.notebook.trials import plot_trials

        return plot_trials
    raise AttributeError(f"module 'mlsql' has no attribute {name!r}")

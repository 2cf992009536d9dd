"""How much the libraries under MLSQL may say: ``SET mlsql_log_level = 'error' | 'warning' | 'info' | 'debug'``.

A notebook cell shows what MLSQL says (results, progress, errors, its own warnings). The libraries
it drives (MLflow and its migrations, xgboost.spark, py4j, Spark's JVM) log things a user cannot act
on, so at the default level ('warning') their loggers pass errors only, Spark's JVM logs at ERROR
into ``<workspace>/logs/spark.log`` (mlsql/engines/spark/__init__.py) and xgboost.spark prints no line per
round. 'info' and 'debug' let them all speak at that level (xgboost.spark's per-round lines too),
and 'error' quiets MLSQL's own warnings as well. The setting is the process's, as Python's
loggers are.
"""

from __future__ import annotations

import logging

LEVELS = ("error", "warning", "info", "debug")
DEFAULT = "warning"
# loggers of the libraries MLSQL drives: quiet below ERROR unless the user asked for more
LIBRARIES = ("mlflow", "alembic", "XGBoost-PySpark", "xgboost", "py4j", "pyspark", "urllib3", "httpx",
             "apscheduler")

_level = DEFAULT


def level() -> str:
    return _level


def library_level() -> int:
    """The Python logging level the libraries' loggers get."""
    return logging.ERROR if _level in ("error", "warning") else getattr(logging, _level.upper())


def spark_level() -> str:
    """Spark's own log level (``SparkContext.setLogLevel``)."""
    return "ERROR" if _level in ("error", "warning") else _level.upper()


def verbose() -> bool:
    """Whether libraries may print their progress lines (xgboost.spark's per-round evaluation)."""
    return _level in ("info", "debug")


def apply() -> None:
    """Set every library logger (and MLSQL's own) to the current level; safe to call again after a
    library configured its loggers on import."""
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(library_level())
    logging.getLogger("mlsql").setLevel(getattr(logging, _level.upper()))


def set_level(name: str) -> str:
    """Change the level (a name from ``LEVELS``) and apply it; returns the name."""
    global _level
    want = str(name).lower()
    if want not in LEVELS:
        from mlsql.errors import OptionError

        raise OptionError(f"mlsql_log_level must be one of {', '.join(repr(v) for v in LEVELS)}, got {name!r}")
    _level = want
    apply()
    return want

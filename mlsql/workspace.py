"""The workspace folder: everything a user makes lives here.

``./.mlsql`` by default, or ``MLSQL_HOME``. Holds the DuckDB catalog, the MLflow
store and its artifacts, the device list, the job store and the signing key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> Workspace:
        root = Path(path or os.environ.get("MLSQL_HOME") or ".mlsql").expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLSQL_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def devices_path(self) -> Path:
        return self.root / "devices.json"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

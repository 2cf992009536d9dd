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
    def feature_views_dir(self) -> Path:
        """One JSON view spec per feature view (mlsql.runtime.steps.feature_views)."""
        return self.root / "feature_views"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    def sample_salt(self) -> str:
        """The workspace's secret salt for hashed sample columns (DEPLOY ... sample_hash): the same
        value hashes alike on every device of the workspace, and differently in another workspace.
        Made on first use, readable by the owner only."""
        import secrets

        path = self.keys_dir / "sample_salt"
        if not path.exists():
            self.keys_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # the first writer wins; a racing one reads its salt
            except FileExistsError:
                pass
            tmp.unlink(missing_ok=True)
        return path.read_text().strip()

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

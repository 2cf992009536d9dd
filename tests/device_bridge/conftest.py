"""Fixtures for the device bridge's tests: a real PostgreSQL server for the hub's database."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from pathlib import Path

import pytest

_db_numbers = itertools.count()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session, started and stopped here; each call of the fixture's
    value is a fresh database on it. Its folder is not under pytest's (kept 0700 by pytest): run as
    root, pgserver runs the server as its own system user, which must reach the folder."""
    import pgserver
    import psycopg

    folder = Path(tempfile.mkdtemp(prefix="mlsql-pg-"))
    srv = pgserver.get_server(folder, cleanup_mode="stop")
    uri = srv.get_uri()

    def new_database() -> str:
        name = f"hub{next(_db_numbers)}"
        with psycopg.connect(uri, autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return uri.replace("/postgres?", f"/{name}?")

    yield new_database
    srv.cleanup()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request):
    """None (the default: SQLite in STORE/hub.db) or a fresh PostgreSQL database."""
    return None if request.param == "sqlite" else request.getfixturevalue("postgres")()

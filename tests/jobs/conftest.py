"""Fixtures of the job tests: an empty workspace and its job store."""

from __future__ import annotations

import pytest


@pytest.fixture
def ws(tmp_path):
    from mlsql.workspace import Workspace

    return Workspace.open(tmp_path / "ws")


@pytest.fixture
def store(ws):
    from mlsql.jobs import JobStore

    return JobStore(ws)

"""The session's step handlers, one module per kind of plan step.

- ``ml_functions``: ``ML.PREDICT``, ``ML.EVALUATE``, ``ML.EXPLAIN_PREDICT``, ... (loads models)
- ``training``: ``CREATE MODEL``
- ``export``: ``EXPORT MODEL``, signed device packages
- ``devices``: ``CREATE/DROP DEVICE [GROUP]``, ``SHOW DEVICES``, ``DEPLOY``, ``ROLLBACK``
- ``catalog``: ``SHOW MODELS``, ``DESCRIBE MODEL``, ``DROP MODEL``

Each handler is a plain function taking the session explicitly; ``mlsql.runtime.session`` maps
plan step types to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mlsql.deploy.devices import DeviceStore
    from mlsql.engines.base import Engine
    from mlsql.runtime.registry import Registry
    from mlsql.workspace import Workspace


class SessionState(Protocol):
    """What a step handler may use of the session (``mlsql.runtime.session.Session`` is one)."""

    workspace: Workspace
    engine: Engine
    registry: Registry
    devices: DeviceStore
    progress: Any  # factory(title, total) -> reporter with update(i, total, metrics), close(); or None
    loaded_models: dict  # (name, version) -> steps.ml_functions.LoadedModel

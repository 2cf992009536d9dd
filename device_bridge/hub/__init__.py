"""The fleet hub: content-addressed packages, desired state per agent, status and telemetry.

Agents (``mlsql-device serve --hub URL``) register, poll ``GET /v1/agents/{name}/desired``,
pull ``GET /v1/blobs/{sha256}``, and push ``POST /v1/agents/{name}/report`` (status +
buffered telemetry). Operators (HubClient, rollout) upload packages and set desired state.

Two kinds of credential. The operator token (``--token``) may do everything. Each agent has
its own credential, enrolled once (``POST /v1/agents/{name}/enroll`` by the operator, or
``mlsql-device hub enroll NAME --store DIR``), kept at the hub only as a sha256 in
the hub's database, and revocable: it opens only that agent's own paths
(``/v1/agents/{name}/register|desired|report``) and the packages its desired state names;
anything else is 403 ``forbidden``. What an agent reports is attributed to the credential's
name, never to a name from the body. State (agents, groups, desired state, credentials, last
reports, events) lives in one database (``db``: SQLite in ``STORE/hub.db`` by default, PostgreSQL
with ``--db postgresql://...``), so several hub processes on one database answer alike; blobs are
files named by their sha256.

One job per module, as the agent has: ``app`` (routes and who may call them), ``state`` (agents,
groups, desired state, blobs), ``credentials`` (agent credentials), ``db`` (the database, its
schema versions, the import of the old JSON store), ``data`` (device data), ``errors``.
"""

from __future__ import annotations

from device_bridge.hub.app import create_hub_app
from device_bridge.hub.credentials import Credentials
from device_bridge.hub.errors import HubError
from device_bridge.hub.state import HubState

__all__ = ["Credentials", "HubError", "HubState", "create_hub_app"]

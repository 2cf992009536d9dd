"""The workspace's experiments (``experiments.json``), shared by every session: each experiment ever
started, its arms and settings, its state, and the final readout it was stopped with.

Writes go to a temporary file and replace the old one in one rename, under a lock file (as
``devices.json``). The device side of an experiment (installing its arms, starting and stopping
the assignment on each agent) is :func:`start_on_devices` / :func:`stop_on_devices`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlsql.errors import MLSQLError, UnknownNameError
from mlsql.locks import flocked


class UnknownExperimentError(UnknownNameError):
    kind = "experiment"


class ExperimentStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def locked(self):
        return flocked(self.path)

    def all(self) -> list[dict[str, Any]]:
        """Every experiment, oldest first (an experiment created again under its name is a new entry)."""
        if not self.path.exists():
            return []
        try:
            return json.loads(self.path.read_text())["experiments"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise MLSQLError(
                f"The experiment list {self.path} is not valid ({exc})",
                hint="Fix or remove the file; its experiments are then forgotten.",
            ) from None

    def get(self, name: str) -> dict[str, Any]:
        """The newest experiment called ``name``."""
        found = [e for e in self.all() if e["name"] == name]
        if not found:
            raise UnknownExperimentError(
                name, sorted({e["name"] for e in self.all()}), where="(CREATE EXPERIMENT starts one)"
            )
        return found[-1]

    def running_on(self, group: str) -> dict[str, Any] | None:
        return next((e for e in self.all() if e["group"] == group and e["status"] == "running"), None)

    def put(self, record: dict[str, Any]) -> None:
        """Add ``record`` or replace the one with its id (call under ``locked()``)."""
        data = self.all()
        data = [e for e in data if e["id"] != record["id"]] + [record]
        data.sort(key=lambda e: e["started_at"])
        tmp = self.path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"experiments": data}, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def store_of(workspace) -> ExperimentStore:
    return ExperimentStore(Path(workspace.root) / "experiments.json")


def agent_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The experiment as an agent takes it (device_bridge.experiments.check)."""
    return {
        "id": record["id"],
        "unit": record["unit"],
        "arms": [{"version": a["version"], "share": a["share"]} for a in record["arms"]],
    }


def start_on_devices(
    devices: list, model: str, packages: list[tuple[int, bytes]], deploy: dict | None, record: dict[str, Any]
) -> list[dict[str, Any]]:
    """Install every arm's package on each device (none activated, so the app's unpinned traffic keeps
    its version until the experiment routes it), activate the control where the device has no version
    active, and start the assignment. A device that fails stops the experiment on those already
    started (their installed versions stay), and the error names the device."""
    from mlsql.deploy.remote import client_for, wrap

    started: list = []
    rows = []
    try:
        for dev in devices:
            c = client_for(dev)
            try:
                for _version, data in packages:
                    c.install(data, providers=["cpu"], activate=False, model=model, deploy=deploy)
                info = c.info()
                if ((info.get("models") or {}).get(model) or {}).get("active") is None:
                    c.activate(model, record["arms"][0]["version"])
                r = c.set_experiment(model, agent_settings(record))
                started.append(dev)
                rows.append({"device": dev.name, "arm_version": r.get("arm")})
            except Exception as exc:
                raise wrap(
                    exc, f"Starting experiment '{record['name']}' on device '{dev.name}' failed"
                ) from None
            finally:
                c.close()
    except MLSQLError:
        stop_on_devices(started, model, quiet=True)
        raise
    return rows


def stop_on_devices(devices: list, model: str, quiet: bool = False) -> None:
    from mlsql.deploy.remote import client_for, wrap

    for dev in devices:
        c = client_for(dev)
        try:
            c.stop_experiment(model)
        except Exception as exc:
            if not quiet:
                raise wrap(exc, f"Stopping the experiment on device '{dev.name}' failed") from None
        finally:
            c.close()




def _wait_hub(hub, names: list[str], model: str, want: str | None, timeout_s: float) -> list[str]:
    """Wait until every agent reports ``want`` as the model's experiment id (None: no experiment);
    the agents that did not, when the time is up."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = hub.status()
        pending = [
            n
            for n in names
            if ((status.get(n, {}).get("status") or {}).get(model) or {}).get("experiment") != want
        ]
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(0.2)


def start_on_hub(
    group,
    model: str,
    packages: list[tuple[int, bytes]],
    deploy: dict | None,
    record: dict,
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    """The same through the group's hub: every arm's package uploaded, each agent's desired state the
    control with the experiment (the agents install every arm and start it), then the wait until each
    reports it; an agent that does not in ``timeout_s`` gets its previous desired state back, and the
    error names it."""
    from device_bridge.client import HubClient
    from device_bridge.experiments import arm_index
    from mlsql.deploy.remote import _HUB_AUTH_HINT, hub_names, wrap
    from mlsql.errors import DeviceError

    hub = HubClient(group.hub, group.hub_token or "", timeout=30.0)
    try:
        names = hub_names(group, hub)
        try:
            shas = {v: hub.upload(data)["sha256"] for v, data in packages}
            record["hub_shas"] = {str(v): sha for v, sha in shas.items()}
            settings = agent_settings(record)
            for a in settings["arms"]:
                a["sha256"] = shas[a["version"]]
            control = record["arms"][0]["version"]
            hub.set_desired(
                model,
                sha256=shas[control],
                devices=names,
                providers=["cpu"],
                deploy=deploy,
                experiment=settings,
            )
            pending = _wait_hub(hub, names, model, record["id"], timeout_s)
            if pending:
                hub.set_desired(model, devices=names, restore_previous=True)
                raise DeviceError(
                    f"Starting experiment '{record['name']}' on group '{group.name}' failed: "
                    f"{', '.join(pending)} did not report it within {timeout_s:g} s; the group's "
                    "previous desired state is restored"
                )
        except MLSQLError:
            raise
        except Exception as exc:
            raise wrap(
                exc, f"Starting experiment '{record['name']}' on group '{group.name}' failed", _HUB_AUTH_HINT
            ) from None
    finally:
        hub.close()
    shares = [a["share"] for a in record["arms"]]
    return [
        {
            "device": n,
            "arm_version": record["arms"][arm_index(record["id"], n, shares)]["version"]
            if record["unit"] == "device"
            else None,
        }
        for n in names
    ]


def stop_on_hub(group, record: dict, timeout_s: float = 60.0) -> None:
    """Each agent's desired state back to the control without the experiment; waits until they report it."""
    from device_bridge.client import HubClient
    from mlsql.deploy.remote import _HUB_AUTH_HINT, hub_names, wrap
    from mlsql.errors import DeviceError

    hub = HubClient(group.hub, group.hub_token or "", timeout=30.0)
    try:
        names = hub_names(group, hub)
        control = str(record["arms"][0]["version"])
        try:
            hub.set_desired(
                record["model"],
                sha256=record["hub_shas"][control],
                devices=names,
                providers=["cpu"],
                deploy=record.get("deploy"),
            )
            pending = _wait_hub(hub, names, record["model"], None, timeout_s)
        except Exception as exc:
            raise wrap(
                exc, f"Stopping experiment '{record['name']}' on group '{group.name}' failed", _HUB_AUTH_HINT
            ) from None
        if pending:
            raise DeviceError(
                f"Stopping experiment '{record['name']}': {', '.join(pending)} still report it after "
                f"{timeout_s:g} s (their desired state has none; they stop at their next poll)"
            )
    finally:
        hub.close()

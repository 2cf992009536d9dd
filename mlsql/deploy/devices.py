"""The workspace's devices and device groups (``devices.json``), shared by every session.

Writes go to a temporary file and replace the old one in one rename, under a
lock file, so two kernels on one workspace never lose each other's devices.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlsql.errors import MLSQLError, OptionError, UnknownDeviceError
from mlsql.language.options import options_of, validate
from mlsql.locks import flocked

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# declared, with their types and defaults, in mlsql.language.options' table
DEVICE_OPTIONS = {o.name for o in options_of("CREATE DEVICE")}
GROUP_OPTIONS = {o.name for o in options_of("CREATE DEVICE GROUP")}


@dataclass
class Device:
    name: str
    url: str
    token: str = ""
    providers: list[str] = field(default_factory=list)
    description: str = ""
    timeout_s: float = 30.0
    verify_tls: bool = True


@dataclass
class DeviceGroup:
    name: str
    devices: list[str] = field(default_factory=list)
    hub: str = ""
    hub_token: str = ""
    description: str = ""


class DeviceStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def _locked(self):
        return flocked(self.path)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"devices": {}, "groups": {}}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise MLSQLError(f"The device list {self.path} is not valid JSON ({exc})",
                             hint="Fix or remove the file; devices can be added again with CREATE DEVICE.") from None
        data.setdefault("devices", {})
        data.setdefault("groups", {})
        return data

    def _write(self, data: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        # holds device tokens: created 0600, never readable by others even for a moment (a leftover
        # from a crash is removed first, since O_CREAT keeps an existing file's mode)
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # -- devices ---------------------------------------------------------------
    def devices(self) -> list[Device]:
        return [Device(**d) for _, d in sorted(self._read()["devices"].items())]

    def get(self, name: str) -> Device:
        data = self._read()["devices"]
        if name not in data:
            raise UnknownDeviceError(name, list(data), where="(CREATE DEVICE registers one)")
        return Device(**data[name])

    def add(self, name: str, options: dict, *, replace: bool = False, if_not_exists: bool = False) -> Device | None:
        _check_name(name, "device")
        o = validate("CREATE DEVICE", options, defaults=True)  # url required, http(s) only
        dev = Device(name=name, url=o["url"].rstrip("/"), token=o["token"], providers=o["providers"],
                     description=o["description"], timeout_s=o["timeout_s"], verify_tls=o["verify_tls"])
        with self._locked():
            data = self._read()
            if name in data["devices"]:
                if if_not_exists:
                    return None
                if not replace:
                    raise MLSQLError(f"Device '{name}' already exists",
                                     hint=f"Use CREATE OR REPLACE DEVICE '{name}' to change it, or DROP DEVICE '{name}'.")
            data["devices"][name] = asdict(dev)
            self._write(data)
        return dev

    def drop(self, name: str, *, if_exists: bool = False) -> bool:
        with self._locked():
            data = self._read()
            if name not in data["devices"]:
                if if_exists:
                    return False
                raise UnknownDeviceError(name, list(data["devices"]))
            del data["devices"][name]
            for g in data["groups"].values():
                if name in g.get("devices", []):
                    g["devices"].remove(name)
            self._write(data)
        return True

    # -- groups ----------------------------------------------------------------
    def groups(self) -> list[DeviceGroup]:
        return [DeviceGroup(**g) for _, g in sorted(self._read()["groups"].items())]

    def group(self, name: str) -> DeviceGroup:
        data = self._read()["groups"]
        if name not in data:
            raise UnknownDeviceError(name, list(data), message=f"Unknown device group '{name}'")
        return DeviceGroup(**data[name])

    def add_group(self, name: str, options: dict, *, replace: bool = False, if_not_exists: bool = False):
        _check_name(name, "device group")
        options = validate("CREATE DEVICE GROUP", options, defaults=True)
        members = options["devices"]
        with self._locked():
            data = self._read()
            unknown = [m for m in members if m not in data["devices"]]
            if unknown and not options.get("hub"):
                raise UnknownDeviceError(unknown[0], list(data["devices"]),
                                         where=f"in device group '{name}'")
            if name in data["groups"]:
                if if_not_exists:
                    return None
                if not replace:
                    raise MLSQLError(f"Device group '{name}' already exists",
                                     hint=f"Use CREATE OR REPLACE DEVICE GROUP '{name}'.")
            g = DeviceGroup(name=name, devices=list(members), hub=str(options.get("hub") or "").rstrip("/"),
                            hub_token=str(options.get("hub_token") or ""),
                            description=str(options.get("description") or ""))
            data["groups"][name] = asdict(g)
            self._write(data)
        return g

    def drop_group(self, name: str, *, if_exists: bool = False) -> bool:
        with self._locked():
            data = self._read()
            if name not in data["groups"]:
                if if_exists:
                    return False
                raise UnknownDeviceError(name, list(data["groups"]), message=f"Unknown device group '{name}'")
            del data["groups"][name]
            self._write(data)
        return True


def _check_name(name: str, what: str) -> None:
    if not NAME.match(name or ""):
        raise OptionError(f"Invalid {what} name {name!r}: use letters, digits, '_', '.', ':' or '-'")

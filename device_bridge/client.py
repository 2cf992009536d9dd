"""Clients for the device agent and the hub (stdlib only: http.client, keep-alive per thread)."""

from __future__ import annotations

import http.client
import io
import json
import select
import socket
import ssl
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

from device_bridge.errors import DeviceError, DeviceUnreachableError, error_for_status

# a request with one of these methods means the same sent twice: retried once when its connection goes
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


def _dropped(sock: socket.socket) -> bool:
    """Has the server closed (or written unasked to) this idle connection? Readable means either."""
    try:
        if hasattr(select, "poll"):  # not select() here: a busy process has descriptors above 1023
            p = select.poll()
            p.register(sock, select.POLLIN)
            return bool(p.poll(0))
        return bool(select.select([sock], [], [], 0)[0])  # Windows: no poll(), and no such limit
    except (OSError, ValueError):  # closed under us
        return True


class _HTTP:
    def __init__(self, url: str, token: str | None, timeout: float, verify: bool | str = True):
        u = urllib.parse.urlsplit(url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise DeviceError(f"bad URL {url!r}: expected http(s)://host:port")
        self.url = url.rstrip("/")
        self.scheme, self.host = u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.base = u.path
        self.token = token
        self.timeout = timeout
        self.ctx = None
        if u.scheme == "https":
            self.ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                self.ctx.check_hostname = False
                self.ctx.verify_mode = ssl.CERT_NONE
        self.local = threading.local()

    def _conn(self, timeout=None) -> http.client.HTTPConnection:
        c = getattr(self.local, "conn", None)
        if c is not None and c.sock is not None and _dropped(c.sock):
            # the server closed this idle keep-alive connection (its timeout, a restart): a request
            # sent on it would be lost with no way to tell whether it was applied; open a new one
            self.close()
            c = None
        if c is None:
            if self.ctx is not None:
                c = http.client.HTTPSConnection(self.host, self.port, timeout=timeout or self.timeout,
                                                context=self.ctx)
            else:
                c = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
            self.local.conn = c
        return c

    def close(self) -> None:
        c = getattr(self.local, "conn", None)
        if c is not None:
            c.close()
            self.local.conn = None

    def last_header(self, name: str) -> str | None:
        """A header of this thread's last answer."""
        resp = getattr(self.local, "last", None)
        return resp.getheader(name) if resp is not None else None

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
                params: dict | None = None, raw: bool = False, accept: str | None = None,
                headers: dict | None = None, retry: bool | None = None) -> Any:
        """``retry``: send the request again, once, when its connection goes before the answer;
        default: for the methods where twice means once (GET, PUT, DELETE...). A POST is retried only
        where the caller says it is safe (a prediction, an upload keyed by its content or id)."""
        if retry is None:
            retry = method in _IDEMPOTENT
        if params:
            path += "?" + urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if ctype:
            headers["Content-Type"] = ctype
        if accept:
            headers["Accept"] = accept
        for attempt in (0, 1):
            conn = self._conn()
            sent = False
            try:
                conn.request(method, self.base + path, body=body, headers=headers)
                sent = True
                resp = conn.getresponse()
                data = resp.read()
                self.local.last = resp
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    http.client.CannotSendRequest) as exc:
                self.close()
                if sent and not retry:
                    # the whole request went out: the server may have applied it before the
                    # connection went, and a second one could apply it twice (two installs, a batch
                    # of outcomes recorded twice). Said, not retried.
                    raise DeviceUnreachableError(
                        f"{self.url}: connection lost after the request was sent ({exc}); {method} {path} "
                        "may or may not have been applied: check before sending it again", url=self.url) from None
                if attempt:
                    raise DeviceUnreachableError(f"{self.url}: connection lost: {exc}", url=self.url) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                kind = "timed out" if isinstance(exc, socket.timeout) else str(exc)
                raise DeviceUnreachableError(f"{self.url} unreachable: {kind}", url=self.url) from None
        if resp.status >= 400:
            raise _answer_error(resp.status, data, self.url)
        if raw or (accept and resp.getheader("content-type", "").startswith(accept)):
            return data
        return json.loads(data) if data else None

    def stream(self, path: str, params: dict | None = None) -> Iterator[dict]:
        if params:
            path += "?" + urllib.parse.urlencode(params)
        if self.ctx is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ctx)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Accept": "text/event-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            conn.request("GET", self.base + path, headers=headers)
            resp = conn.getresponse()
            if resp.status >= 400:
                raise _answer_error(resp.status, resp.read(), self.url)
            data_lines: list[str] = []
            for line in resp:
                line = line.decode().rstrip("\r\n")
                if line.startswith("data:"):
                    data_lines.append(line[5:].strip())
                elif not line and data_lines:
                    yield json.loads("\n".join(data_lines))
                    data_lines = []
        except OSError as exc:
            raise DeviceUnreachableError(f"{self.url}: stream lost: {exc}", url=self.url) from None
        finally:
            conn.close()


def _answer_error(status: int, data: bytes, url: str) -> DeviceError:
    """The typed error for an error answer: its ``kind`` picks the class (device_bridge.errors)."""
    retry = None
    try:
        err = json.loads(data)
        msg, kind = str(err.get("error", err)), err.get("kind")
        retry = err.get("retry_after_s")
    except (ValueError, AttributeError):
        msg, kind = data[:300].decode("utf-8", "replace"), None
    exc = error_for_status(status, f"{url}: {msg}", url, kind if isinstance(kind, str) else None)
    if isinstance(retry, int | float) and hasattr(exc, "retry_after"):
        exc.retry_after = retry
    return exc


def _npz(columns: dict[str, Any]) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    arrays = {}
    for k, v in columns.items():
        a = np.asarray(v)
        if a.dtype.kind == "O":
            a = a.astype(str)
        arrays[k] = a
    np.savez(buf, **arrays)
    return buf.getvalue()


class DeviceClient:
    """Talk to one agent. Errors are DeviceError subclasses carrying the agent's message."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, verify: bool | str = True):
        self.http = _HTTP(url, token, timeout, verify)
        self.url = self.http.url

    def health(self) -> dict:
        return self.http.request("GET", "/v1/health")

    def info(self) -> dict:
        return self.http.request("GET", "/v1/info")

    def model(self, name: str) -> dict:
        return self.http.request("GET", f"/v1/models/{_q(name)}")

    def install(self, package_bytes: bytes, providers: list[str] | None = None,
                strict_providers: bool = False, activate: bool = True, model: str | None = None,
                deploy: dict | None = None) -> dict:
        """``deploy``: deploy settings (priority, max_concurrency, max_queue, timeout_ms, memory_mb,
        isolation; docs/DEVICE.md), over the package's own."""
        path = f"/v1/models/{_q(model)}/install" if model else "/v1/models/install"
        # query form: lists comma-separated (sample_exclude, sample_hash), objects as JSON (trigger)
        settings = {k: ",".join(v) if isinstance(v, list | tuple) else json.dumps(v) if isinstance(v, dict) else v
                    for k, v in (deploy or {}).items()}
        params = {"providers": ",".join(providers) if providers else None,
                  "strict_providers": "true" if strict_providers else "false",
                  "activate": "true" if activate else "false", **settings}
        return self.http.request("POST", path, bytes(package_bytes), "application/octet-stream", params)

    def install_from_url(self, model: str, url: str, sha256: str | None = None,
                         providers: list[str] | None = None, strict_providers: bool = False,
                         token: str | None = None, deploy: dict | None = None) -> dict:
        """Have the device download a package itself (`token`: bearer token for that URL, e.g. the hub's)."""
        body = {"url": url, "sha256": sha256, "providers": providers, "strict_providers": strict_providers,
                **(deploy or {})}
        if token:
            body["token"] = token
        return self.http.request("POST", f"/v1/models/{_q(model)}/install", _json(body), "application/json")

    def activate(self, model: str, version: int, providers: list[str] | None = None,
                 strict_providers: bool = False, deploy: dict | None = None) -> dict:
        body = {"version": version, "providers": providers, "strict_providers": strict_providers, **(deploy or {})}
        return self.http.request("POST", f"/v1/models/{_q(model)}/activate", _json(body), "application/json")

    def rollback(self, model: str) -> dict:
        return self.http.request("POST", f"/v1/models/{_q(model)}/rollback", b"{}", "application/json")

    def profile(self, model: str, batch_sizes: list[int], runs: int, provider: str = "cpu",
                version: int | None = None) -> dict:
        """ML.PROFILE on the device: ``{"name", "version", "rows": [...]}`` (device_bridge.profiling)."""
        body = {"batch_sizes": list(batch_sizes), "runs": int(runs), "provider": provider}
        if version is not None:
            body["version"] = int(version)
        return self.http.request("POST", f"/v1/models/{_q(model)}/profile", _json(body), "application/json")

    def delete(self, model: str, version: int | None = None) -> dict:
        return self.http.request("DELETE", f"/v1/models/{_q(model)}",
                                 params={"version": version} if version else None)

    def predict(self, model: str, columns: dict[str, list] | None = None, rows: list[dict] | None = None,
                version: int | None = None, request_ids: list[str] | None = None) -> dict:
        """JSON prediction; the answer's ``request_ids`` name each row (``request_ids``: the caller's
        own, one per row, for outcomes posted later)."""
        if (columns is None) == (rows is None):
            raise DeviceError("give columns or rows")
        body: dict[str, Any] = {"columns": columns} if columns is not None else {"rows": rows}
        if request_ids is not None:
            body["request_ids"] = list(request_ids)
        return self.http.request("POST", f"/v1/models/{_q(model)}/predict", _json(body), "application/json",
                                 {"version": version} if version else None, retry=True)

    def predict_batch(self, model: str, columns: dict[str, Any], version: int | None = None,
                      fmt: str = "columns") -> dict:
        """Binary batch: one numpy array per input column, sent as application/x-mlsql-columns
        (``fmt='columns'``, see device_bridge.columns) or as an .npz (``fmt='npz'``). The answer
        comes back in the same form, outputs as numpy arrays (JSON when an output is not a tensor)."""
        import io

        import numpy as np

        from device_bridge import columns as colfmt

        params = {"version": version} if version else None
        path = f"/v1/models/{_q(model)}/predict"
        if fmt == "columns":
            ans = self.http.request("POST", path, colfmt.encode(columns), colfmt.CONTENT_TYPE, params,
                                    accept=colfmt.CONTENT_TYPE, retry=True)
            if isinstance(ans, bytes | bytearray):
                arrays, meta = colfmt.decode(bytes(ans))
                return {**meta, "outputs": arrays}
            return ans
        ans = self.http.request("POST", path, _npz(columns), "application/x-npz", params, accept="application/x-npz",
                                 retry=True)
        if isinstance(ans, bytes | bytearray):
            with np.load(io.BytesIO(ans), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(arrays.pop("__meta__").tobytes().decode())
            return {**meta, "outputs": arrays}
        return ans

    def post_events(self, table: str, rows: list[dict] | None = None, columns: dict | None = None,
                    batch_id: str | None = None) -> dict:
        """Events for the device's feature views: JSON ``rows``, or ``columns`` (numpy arrays) sent as
        application/x-mlsql-columns. All are applied, or none (an error). ``batch_id`` (default: a new
        random one) makes the request's own retry, after a lost answer, apply the batch once."""
        if (rows is None) == (columns is None):
            raise DeviceError("give rows or columns")
        batch_id = batch_id or uuid.uuid4().hex
        if rows is not None:
            return self.http.request("POST", "/v1/events", _json({"table": table, "rows": rows, "batch_id": batch_id}),
                                     "application/json", retry=True)
        from device_bridge import columns as colfmt

        return self.http.request("POST", "/v1/events", colfmt.encode(columns, {"table": table, "batch_id": batch_id}),
                                 colfmt.CONTENT_TYPE, retry=True)

    def features(self, view: str, key: Any, at: int | str | None = None) -> dict:
        """A key's feature values as of ``at`` (microseconds since the epoch or ISO-8601; None: now)."""
        params = {"key": key, **({"at": at} if at is not None else {})}
        return self.http.request("GET", f"/v1/features/{_q(view)}", params=params)

    def metrics(self, columns: bool = True) -> dict:
        return self.http.request("GET", "/v1/metrics", params=None if columns else {"columns": "0"})

    def samples(self, model: str, kind: str = "samples", since: int = 0, max_rows: int = 100_000):
        """The device's sampled rows (``kind='samples'``) or recorded outcomes (``'outcomes'``) of
        ``model`` after cursor ``since``, oldest first: (pyarrow.Table with a ``seq`` column, the
        cursor to pass next time). For a device without a hub (one with a hub keeps only what the
        hub has not acknowledged yet)."""
        import pyarrow as pa

        data = self.http.request("GET", "/v1/samples", params={"model": model, "kind": kind, "since": since,
                                                               "max_rows": max_rows}, raw=True)
        cursor = int(self.http.last_header("X-Next-Cursor") or since)
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all(), cursor

    def outcomes(self, model: str, outcomes: list[dict]) -> dict:
        """Record late true answers: ``[{"request_id": ..., "label": ...}]`` -> {"recorded", "unknown"}
        (unknown: ids of no sampled request of this model; counted, not an error)."""
        return self.http.request("POST", f"/v1/models/{_q(model)}/outcomes", _json({"outcomes": outcomes}),
                                 "application/json")

    def set_experiment(self, model: str, experiment: dict) -> dict:
        """Start an experiment on the model: ``{"id", "unit": "device" | "request", "arms": [{"version",
        "share"}]}`` (its arms' versions installed); unpinned predictions then run their arm's version."""
        return self.http.request("PUT", f"/v1/models/{_q(model)}/experiment", _json(experiment), "application/json")

    def stop_experiment(self, model: str) -> dict:
        return self.http.request("DELETE", f"/v1/models/{_q(model)}/experiment")

    def events(self) -> list[dict]:
        return self.http.request("GET", "/v1/events")["events"]

    def stream(self, interval: float = 1.0, count: int | None = None, columns: bool = True) -> Iterator[dict]:
        params = {"interval": interval, "columns": "1" if columns else "0"}
        if count is not None:
            params["count"] = count
        return self.http.stream("/v1/metrics/stream", params)

    def close(self) -> None:
        self.http.close()


class HubClient:
    def __init__(self, url: str, token: str, timeout: float = 30.0, verify: bool | str = True):
        self.http = _HTTP(url, token, timeout, verify)
        self.url = self.http.url

    def upload(self, package_bytes: bytes) -> dict:
        return self.http.request("POST", "/v1/blobs", bytes(package_bytes), "application/octet-stream", retry=True)

    def set_desired(self, model: str, package: bytes | None = None, *, sha256: str | None = None,
                    devices: list[str] | None = None, group: str | None = None,
                    providers: list[str] | None = None, strict_providers: bool = False,
                    absent: bool = False, restore_previous: bool = False, deploy: dict | None = None,
                    percent: float | None = None, experiment: dict | None = None) -> dict:
        """``group`` (without ``devices``): also the group's rule for devices that join it later;
        ``percent``: only the group's devices whose wave point is under it (device_bridge/waves.py).
        ``experiment``: ``{"id", "unit", "arms": [{"version", "share", "sha256"}]}``, every arm an
        uploaded package of the model: the agents install them all and route by arm."""
        if package is not None:
            sha256 = self.upload(package)["sha256"]
        body = {"model": model, "sha256": sha256, "devices": devices, "group": group, "providers": providers,
                "strict_providers": strict_providers, "absent": absent, "restore_previous": restore_previous,
                "deploy": deploy, "percent": percent, "experiment": experiment}
        # the same desired state set twice is set once; restoring the previous one twice is not
        return self.http.request("POST", "/v1/desired", _json({k: v for k, v in body.items() if v is not None}),
                                 "application/json", retry=not restore_previous)

    def set_group(self, group: str, devices: list[str]) -> dict:
        return self.http.request("POST", f"/v1/groups/{_q(group)}", _json({"devices": devices}),
                                 "application/json", retry=True)

    def schedule_rollout(self, model: str, group: str, waves: list[float], every_s: float,
                         package: bytes | None = None, *, sha256: str | None = None, **desired) -> dict:
        """A rollout the hub advances itself, ``waves`` percents of the group (the last 100), one
        every ``every_s`` seconds; ``desired``: providers, strict_providers, deploy (docs/DEVICE.md,
        "Scheduled rollouts and the lease")."""
        if package is not None:
            sha256 = self.upload(package)["sha256"]
        body = {"model": model, "group": group, "sha256": sha256, "waves": waves, "every_s": every_s, **desired}
        return self.http.request("POST", "/v1/rollouts", _json(body), "application/json")

    def rollouts(self) -> dict:
        """``{"rollouts": [...], "lease": {"holder", "expires_in_s"} or None, "replica": this hub's name}``."""
        return self.http.request("GET", "/v1/rollouts")

    def stop_rollout(self, group: str, model: str, rollback: bool = False) -> dict:
        return self.http.request("POST", f"/v1/rollouts/{_q(group)}/{_q(model)}/stop", _json({"rollback": rollback}),
                                 "application/json")

    def agents(self) -> list[dict]:
        return self.http.request("GET", "/v1/agents")["agents"]

    def agent(self, name: str) -> dict:
        return self.http.request("GET", f"/v1/agents/{_q(name)}")

    def status(self) -> dict[str, dict]:
        return {a["name"]: a for a in self.agents()}

    def events(self) -> list[dict]:
        return self.http.request("GET", "/v1/events")["events"]

    def post_event(self, event: str, **fields) -> dict:
        """Record an operator event at the hub (``rollout_stopped`` ...), shown with the agents' events."""
        return self.http.request("POST", "/v1/events", _json({"event": event, **fields}), "application/json")

    def device_data(self, kind: str = "samples", group: str | None = None, model: str | None = None,
                    since=None, max_rows: int = 100_000):
        """The samples or outcomes agents uploaded (operator token): a pyarrow.Table, oldest first,
        schemas unified. ``since``: an ISO timestamp string or a datetime (rows at or after it)."""
        import pyarrow as pa

        if since is not None and not isinstance(since, str):
            since = since.isoformat()
        data = self.http.request("GET", f"/v1/data/{_q(kind)}",
                                 params={"group": group, "model": model, "since": since, "max_rows": max_rows},
                                 raw=True)
        return pa.ipc.open_stream(pa.py_buffer(data)).read_all()

    def data_usage(self) -> dict:
        """Bytes, files and dropped rows of device data per group at the hub."""
        return self.http.request("GET", "/v1/data/usage")

    def enroll(self, name: str) -> str:
        """A fresh credential for agent ``name`` (operator only; replaces any earlier one)."""
        return self.http.request("POST", f"/v1/agents/{_q(name)}/enroll", b"{}", "application/json")["token"]

    def revoke(self, name: str) -> bool:
        """Refuse agent ``name``'s credential from now on (operator only); False when it had none."""
        return self.http.request("DELETE", f"/v1/agents/{_q(name)}/credential")["revoked"]

    def close(self) -> None:
        self.http.close()


def _q(s: str) -> str:
    return urllib.parse.quote(str(s), safe="")


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

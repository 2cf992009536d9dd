"""Agent side of the hub: register, poll desired state, install it, push status + telemetry.

Telemetry that cannot be sent stays in a bounded deque on the device and goes
with the next successful report.

Device data (sampling.py) goes after each report: per (model, kind), the store's chunks in seq
order, as Arrow IPC streams with zstd buffers of at most ``UPLOAD_BYTES`` of rows (a body stays
under the hub's 8 MiB), to ``POST /v1/agents/{name}/data``. A chunk is deleted only once the hub
has acknowledged every row of it; a failed or cut upload is sent again whole, and the hub's
high-water mark keeps the retry from storing a row twice.

The agent talks to the hub with its own credential (never the device token): ``--hub-token``,
``--hub-token-file``, or ``STORE/hub_token``; without one it asks the hub to enroll it, which
only a hub started with ``--enroll-open`` does, and keeps the answer in ``STORE/hub_token`` (0600).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from device_bridge import delta, origins, urls
from device_bridge import package as pkg
from device_bridge import providers as prov
from device_bridge.agent.core import AgentCore, AgentError
from device_bridge.web import dumps

log = logging.getLogger("device_bridge.hubsync")

_SHA = re.compile(r"[0-9a-f]{64}")
UPLOAD_BYTES = 4 << 20     # rows (uncompressed Arrow) per upload; zstd makes the body smaller still
MAX_UPLOAD_BODY = 8 << 20  # the hub's limit: a body over it is split in halves by rows
UPLOAD_SECONDS = 5.0       # of uploading per report cycle at most (the desired state is polled meanwhile)
# test hooks (read with MLSQL_DEVICE_TEST_HOOKS=1 only): seconds to sleep between the hub's answer to
# an upload and the agent's deleting what it acknowledged (a kill -9 there: the retry case), and
# rows per upload at most (many small uploads)
UPLOAD_PAUSE_ENV = "MLSQL_DEVICE_TEST_UPLOAD_PAUSE"
UPLOAD_ROWS_ENV = "MLSQL_DEVICE_TEST_UPLOAD_ROWS"


class HubAnswer(OSError):
    """An HTTP error answer from the hub, with its message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_token_file(path: str | Path) -> str | None:
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    return token or None


def write_token_file(path: str | Path, token: str) -> None:
    """Atomically, created 0600 (it is a credential)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class HubSync:
    def __init__(self, core: AgentCore, hub_url: str, token: str | None, agent_url: str,
                 interval: float = 1.0, buffer: int = 120, group: str | None = None,
                 token_file: str | Path | None = None, wait: float = 30.0):
        self.core = core
        self.hub = hub_url.rstrip("/")
        self.token_file = Path(token_file) if token_file else Path(core.store) / "hub_token"
        self.token = token or read_token_file(self.token_file)
        core.config.hub_token = self.token
        self.agent_url = agent_url
        self.interval = interval
        # long-poll (hub/longpoll.py): a thread of its own holds GET desired?wait= with the ETag of
        # the state it has; the report loop then reconciles the last desired state locally, each
        # interval, with no desired GET. 0, or a hub that does not answer with X-MLSQL-Max-Wait:
        # the timed poll, a GET every interval
        self.wait = wait
        self.etag: str | None = None
        self.models: dict | None = None  # the last desired state the hub sent
        self.watching = False
        self.max_wait = 0.0
        self.watcher: threading.Thread | None = None
        self.wake = threading.Event()  # a new desired state applied: report at once
        self.apply_mu = threading.Lock()
        self.group = group
        self.buffer: deque = deque(maxlen=buffer)
        self.errors: dict[str, str] = {}
        self.failed: dict[str, tuple] = {}  # model -> the (sha256, providers, strict) that failed
        self.registered = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name=f"hubsync-{core.config.name}", daemon=True)
        self.last_ok: float | None = None
        self.pause = float(os.environ.get(UPLOAD_PAUSE_ENV, "0") or 0) if core.hooks else 0.0
        self.max_rows = int(os.environ.get(UPLOAD_ROWS_ENV, "0") or 0) if core.hooks else 0
        self.uploaded_rows = 0

    def start(self) -> None:
        self.thread.start()

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 10.0,
              auth: bool = True):
        data = None if body is None else dumps(body)  # strict JSON: a non-finite number goes as null
        req = urllib.request.Request(self.hub + path, data=data, method=method)
        if auth:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urls.open_url(req, timeout=timeout) as resp:  # no redirects: the token stays with the hub
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:  # say what the hub said (a revoked credential, ...)
            try:
                msg = json.loads(exc.read(4096)).get("error")
            except Exception:  # noqa: BLE001 - not the hub's JSON
                msg = None
            if exc.code == 401 and auth:  # refused: a new credential may have been put in the file
                fresh = read_token_file(self.token_file)
                if fresh and fresh != self.token:
                    self.token = self.core.config.hub_token = fresh
            raise HubAnswer(exc.code, f"hub answered {exc.code} to {method} {path}: {msg or exc.reason}") from None

    def _enroll(self) -> bool:
        """No credential: ask the hub to enroll this agent (a hub with --enroll-open does), and keep it."""
        name = self.core.config.name
        try:
            answer = self._call("POST", f"/v1/agents/{name}/enroll", {}, auth=False)
        except HubAnswer as exc:
            self.errors["hub"] = (f"not enrolled at the hub ({exc}); enroll it (mlsql-device hub enroll {name}) "
                                  "and start the agent with --hub-token-file")[:400]
            return False
        token = answer.get("token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            self.errors["hub"] = "the hub's enrollment answer holds no token"
            return False
        write_token_file(self.token_file, token)
        self.token = self.core.config.hub_token = token
        return True

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.cycle()
                hub_error = self.errors.get("hub")
                self.core.note_background("hubsync", ConnectionError(hub_error) if hub_error else None)
            except Exception as exc:  # noqa: BLE001 - the loop outlives any error, and says so
                log.exception("hub sync cycle failed")
                self.core.note_background("hubsync", exc)
            self.wake.wait(self.interval)
            self.wake.clear()

    def _desired(self, etag: str | None, wait: float) -> tuple[int, dict | None, str | None, float]:
        """GET desired (``wait`` s, ``If-None-Match: etag``): (status 200 or 304, the document, its
        ETag, the hub's longest wait; 0 when it does not long-poll)."""
        name = self.core.config.name
        req = urllib.request.Request(f"{self.hub}/v1/agents/{name}/desired" + (f"?wait={wait:g}" if wait else ""))
        req.add_header("Authorization", f"Bearer {self.token}")
        if etag:
            req.add_header("If-None-Match", etag)
        try:
            with urls.open_url(req, timeout=wait + 10) as resp:
                return 200, json.loads(resp.read() or b"null"), resp.headers.get("ETag"), \
                    float(resp.headers.get("X-MLSQL-Max-Wait") or 0)
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                return 304, None, exc.headers.get("ETag") or etag, float(exc.headers.get("X-MLSQL-Max-Wait") or 0)
            try:
                msg = json.loads(exc.read(4096)).get("error")
            except Exception:  # noqa: BLE001 - not the hub's JSON
                msg = None
            raise HubAnswer(exc.code, f"hub answered {exc.code} to GET desired: {msg or exc.reason}") from None

    def _take(self, doc, etag: str | None) -> None:
        models = doc.get("models", {}) if isinstance(doc, dict) else {}
        with self.apply_mu:
            self.apply(models)
            self.models, self.etag = models, etag

    def watch(self) -> None:
        """The long-poll loop: a new desired state is applied (and reported) as soon as the hub has it."""
        while not self.stop.is_set():
            try:
                status, doc, etag, max_wait = self._desired(self.etag, min(self.wait, self.max_wait))
                if not max_wait:  # a hub without long-poll: back to the timed poll
                    self.watching = False
                    self.watcher = None
                    return
                self.watching = True
                if status == 200:
                    self._take(doc, etag)
                    self.wake.set()
            except (HubAnswer, urllib.error.URLError, OSError, ValueError) as exc:
                self.watching = False  # the report loop polls meanwhile
                self.errors["hub"] = str(exc)[:200]
                self.stop.wait(self.interval)

    def cycle(self) -> None:
        name = self.core.config.name
        try:
            if not self.token:  # a credential dropped in meanwhile, or enrollment at an open hub
                self.token = self.core.config.hub_token = read_token_file(self.token_file)
            if not self.token and not self._enroll():
                return
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.errors["hub"] = str(exc)[:200]
            return
        try:
            if not self.registered:
                self._call("POST", f"/v1/agents/{name}/register",
                           {"url": self.agent_url, "group": self.group,
                            "providers": self.core.available_providers()})
                self.registered = True
            if self.watching and self.models is not None:  # long-poll brings changes: reconcile locally
                with self.apply_mu:
                    self.apply(self.models)
            else:  # the timed poll: with the ETag of the state it has, an unchanged one is a bare 304
                have = self.etag if self.models is not None else None
                status, desired, etag, max_wait = self._desired(have, 0)
                if status == 304:
                    with self.apply_mu:
                        self.apply(self.models)
                else:
                    self._take(desired, etag)
                if self.wait > 0 and max_wait and etag and self.watcher is None:
                    self.max_wait = max_wait
                    self.watcher = threading.Thread(target=self.watch, name=f"hubwatch-{name}", daemon=True)
                    self.watcher.start()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.errors["hub"] = str(exc)[:200]
        try:
            self.buffer.append(self.core.metrics(columns=True))
        finally:
            self.report()

    def report(self) -> None:
        items = list(self.buffer)
        body = {"url": self.agent_url, "status": self.core.status(), "errors": dict(self.errors),
                "telemetry": items, "time": time.time()}
        try:
            self._call("POST", f"/v1/agents/{self.core.config.name}/report", body)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.errors["hub"] = str(exc)[:200]
            return
        self.errors.pop("hub", None)
        self.last_ok = time.time()
        for _ in items:  # sent: drop them (new ones may have arrived meanwhile)
            if self.buffer:
                self.buffer.popleft()
        try:
            self.upload()
            self.errors.pop("data", None)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.errors["data"] = str(exc)[:300]

    def _post_data(self, model: str, kind: str, first: int, last: int, body: bytes) -> dict:
        from urllib.parse import urlencode

        path = f"/v1/agents/{self.core.config.name}/data?" + urlencode(
            {"kind": kind, "model": model, "first": first, "last": last})
        req = urllib.request.Request(self.hub + path, data=body, method="POST")
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/vnd.apache.arrow.stream")
        try:
            with urls.open_url(req, timeout=60) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                msg = json.loads(exc.read(4096)).get("error")
            except Exception:  # noqa: BLE001 - not the hub's JSON
                msg = None
            raise HubAnswer(exc.code, f"hub answered {exc.code} to the {kind} upload of {model}: "
                                      f"{msg or exc.reason}") from None

    def _send(self, model: str, kind: str, table) -> None:
        """One upload of ``table`` (rows with seq), split in halves while its body is over the limit;
        each acknowledged part deletes the chunks it completes."""
        from device_bridge.agent.sampling import ipc_bytes

        body = ipc_bytes(table, compression="zstd")
        if len(body) > MAX_UPLOAD_BODY and table.num_rows > 1:
            half = table.num_rows // 2
            self._send(model, kind, table.slice(0, half))
            self._send(model, kind, table.slice(half))
            return
        seq = table.column("seq")
        first, last = int(seq[0].as_py()), int(seq[-1].as_py())
        answer = self._post_data(model, kind, first, last, body)
        acked = answer.get("acked") if isinstance(answer, dict) else None
        if not isinstance(acked, int):
            raise ValueError(f"the hub's answer to an upload holds no acked seq: {str(answer)[:200]}")
        if self.pause:
            time.sleep(self.pause)
        self.core.samples.acked(model, kind, min(acked, last))
        self.uploaded_rows += table.num_rows

    def upload(self) -> None:
        """Send what the sample store holds, oldest first, for at most UPLOAD_SECONDS."""
        store = self.core.samples
        if store is None:
            return
        import pyarrow as pa

        deadline = time.monotonic() + UPLOAD_SECONDS
        for model, kind, chunks in store.pending(4 * UPLOAD_BYTES):
            i = 0
            while i < len(chunks):
                if time.monotonic() > deadline:
                    return
                batch, size = [chunks[i]], chunks[i][3]
                i += 1
                while i < len(chunks) and chunks[i][2] == batch[0][2] and size + chunks[i][3] <= UPLOAD_BYTES:
                    batch.append(chunks[i])
                    size += chunks[i][3]
                    i += 1
                tables = [t for t in (store.chunk_table(c[0]) for c in batch) if t is not None]
                if not tables:
                    continue
                table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
                step = self.max_rows or table.num_rows
                for off in range(0, table.num_rows, step):
                    self._send(model, kind, table.slice(off, step))

    def _headers_for(self, url: str) -> dict:
        """The agent's hub credential goes to the hub's exact origin only, never to a static origin."""
        return {"Authorization": f"Bearer {self.token}"} if self.token and urls.same_origin(url, self.hub) else {}

    def download(self, model: str, want: dict) -> bytes:
        """The package of a desired entry, its sha256 checked: rebuilt from a delta against the newest
        installed version when the hub offers one (delta.py), else from the first of its URLs that
        gives it (origins.py: the hub's own blob store, static origins; resumed with Range). Each
        download is an event (``download``: via delta or which URL, bytes moved, what failed)."""
        sha = want["sha256"]
        limit = self.core.config.max_package_bytes
        info: dict = {"model": model, "sha256": sha}
        data = self._via_delta(model, want, sha, limit, info)
        if data is not None:
            self.core.telemetry.event("download", **info)
            return data
        attempts: list[origins.Attempt] = []
        try:
            fetched = origins.fetch(origins.resolve(self.hub, want.get("urls"), sha), sha,
                                    Path(self.core.store) / "downloads", limit, self._headers_for, attempts=attempts)
        except origins.FetchError as exc:
            self.core.telemetry.event("download", **info, via="none", error=str(exc)[:300],
                                      attempts=[_attempt(a) for a in attempts[-8:]])
            raise AgentError(424, f"cannot download the package: {exc}", "download") from None
        self.core.telemetry.event("download", **info, via="full", url=fetched.url, bytes=len(fetched.data),
                                  attempts=[_attempt(a) for a in fetched.attempts[-8:]])
        return fetched.data

    def _via_delta(self, model: str, want: dict, sha: str, limit: int, info: dict) -> bytes | None:
        """The package rebuilt from a delta against an installed version, or None (no installed
        base, no delta offered or worth sending, or none that rebuilds ``sha``: ``info['delta_error']``
        says why). First the deltas ``hub publish`` put on the static origins (``deltas``: each from
        a base this device has, the newest base first, its URLs in order), then the hub's own."""
        m = self.core.state["models"].get(model) or {}
        shas = m.get("sha256", {})
        bases = [v for v in m.get("versions", []) if shas.get(str(v)) and v < (want.get("version") or 0)]
        if not bases:
            return None
        by_sha = {shas[str(v)]: v for v in bases}
        listed = want.get("deltas") if isinstance(want.get("deltas"), list) else []
        published = sorted((d for d in listed[:16] if isinstance(d, dict) and d.get("from") in by_sha
                            and isinstance(d.get("sha256"), str) and _SHA.fullmatch(d["sha256"])  # a file name
                            and isinstance(d.get("urls"), list)),
                           key=lambda d: -by_sha[d["from"]])
        failed: list[str] = []
        for d in published[:2]:
            base = by_sha[d["from"]]
            attempts: list[origins.Attempt] = []
            try:
                old = self._base_package(model, base, d["from"])
                got = origins.fetch([u for u in d["urls"][:16] if isinstance(u, str)], d["sha256"],
                                    Path(self.core.store) / "downloads" / "deltas", limit, attempts=attempts)
                new = delta.apply(old, got.data, limit)
                if hashlib.sha256(new).hexdigest() != sha:
                    raise delta.DeltaError(f"the rebuilt package is not {sha[:12]}")
            except (OSError, ValueError, pkg.PackageError) as exc:  # FetchError is an OSError, DeltaError a ValueError
                failed.append(f"origin delta from version {base}: {type(exc).__name__}: {exc}"[:300])
                continue
            info.update(via="delta", url=got.url, base=base, base_sha256=d["from"], bytes=len(got.data),
                        package_bytes=len(new), attempts=[_attempt(a) for a in attempts[-8:]])
            if failed:  # an earlier delta (a newer base) that did not do
                info["delta_error"] = "; ".join(failed)
            return new
        path = want.get("delta")
        if not isinstance(path, str) or not path.startswith("/"):
            if failed:
                info["delta_error"] = "; ".join(failed)
            return None
        base = max(bases)
        old_sha = shas[str(base)]
        try:
            old = self._base_package(model, base, old_sha)
            req = urllib.request.Request(f"{self.hub}{path}?from={old_sha}",
                                         headers={"Authorization": f"Bearer {self.token}"})
            with urls.open_url(req, timeout=60) as resp:
                d = resp.read(limit + 1)
            if len(d) > limit:
                raise delta.DeltaError("the delta is over the package limit")
            new = delta.apply(old, d, limit)
            if hashlib.sha256(new).hexdigest() != sha:
                raise delta.DeltaError(f"the rebuilt package is not {sha[:12]}")
        except urllib.error.HTTPError as exc:
            failed.append(f"hub answered {exc.code}" + (" (no delta)" if exc.code == 404 else ""))
            info["delta_error"] = "; ".join(failed)
            return None
        except (OSError, ValueError, pkg.PackageError) as exc:  # DeltaError is a ValueError
            failed.append(f"{type(exc).__name__}: {exc}"[:300])
            info["delta_error"] = "; ".join(failed)
            return None
        info.update(via="delta", url=f"{self.hub}{path}", base=base, base_sha256=old_sha, bytes=len(d),
                    package_bytes=len(new))
        return new

    def _base_package(self, model: str, version: int, sha: str) -> bytes:
        """An installed version's package bytes, rebuilt from its folder and checked against its sha256."""
        old = pkg.encode_installed(self.core._folder(model, version))
        if hashlib.sha256(old).hexdigest() != sha:
            raise delta.DeltaError(f"installed version {version} no longer rebuilds its package")
        return old

    @staticmethod
    def _other_deploy(m: dict, version: int, deploy: dict | None) -> bool:
        """The hub asks for this installed build with other deploy settings (priority, isolation...)."""
        return bool(deploy) and m.get("config", {}).get(str(version), {}).get("deploy") != deploy

    @staticmethod
    def _other_providers(m: dict, version: int, providers: list | None, strict: bool) -> bool:
        """The hub asks for this installed build with another provider preference (a deploy run again)."""
        if not providers:
            return False
        try:
            names = [prov.to_ort_name(p) for p in providers]
        except prov.ProviderError:
            return False
        cfg = m.get("config", {}).get(str(version), {})
        return cfg.get("providers") != names or bool(cfg.get("strict")) != strict

    def _experiment(self, model: str, m: dict | None, want: dict, providers, strict: bool, deploy) -> None:
        """An experiment in the desired state: every arm installed (not activated), then the agent's
        experiment set to it; none there: a running one stopped."""
        e = want.get("experiment") if isinstance(want.get("experiment"), dict) else None
        core = self.core
        if e is None:
            if m is not None and m.get("experiment"):
                core.clear_experiment(model)
            return
        for a in e.get("arms", []):
            if not (m and a.get("version") in m.get("versions", [])
                    and m.get("sha256", {}).get(str(a.get("version"))) == a.get("sha256")):
                core.install_from_url(model, f"{self.hub}/v1/blobs/{a.get('sha256')}", a.get("sha256"), providers,
                                      strict, False, self.token, deploy)
                m = core.state["models"].get(model)
        settings = {"id": e.get("id"), "unit": e.get("unit"),
                    "arms": [{"version": a.get("version"), "share": a.get("share")} for a in e.get("arms", [])]}
        if (m or {}).get("experiment") != settings:
            core.set_experiment(model, settings)

    def apply(self, models: dict) -> None:
        core = self.core
        for model, want in models.items():
            if not isinstance(want, dict):
                continue
            m = core.state["models"].get(model)
            providers, strict = want.get("providers"), bool(want.get("strict_providers", False))
            deploy = want.get("deploy") if isinstance(want.get("deploy"), dict) else None
            # what failed is not retried as is
            wish = (want.get("sha256"), tuple(providers or ()), strict, json.dumps(deploy, sort_keys=True))
            try:
                if want.get("absent"):
                    if m is not None:
                        core.delete(model)
                    self.errors.pop(model, None)
                    continue
                self._experiment(model, m, want, providers, strict, deploy)
                m = core.state["models"].get(model)
                sha, version = want.get("sha256"), want.get("version")
                if m and version in m.get("versions", []) and m.get("sha256", {}).get(str(version)) == sha:
                    if version in m.get("suspended", []):
                        self.errors[model] = {"sha256": sha, "suspended": True,
                                              "error": f"version {version} is suspended by the circuit breaker"}
                    else:
                        if m.get("active") != version or self._other_providers(m, version, providers, strict) \
                                or self._other_deploy(m, version, deploy):
                            if self.failed.get(model) == wish:
                                continue  # this activation failed already: its error stays reported
                            core.activate(model, version, providers or None, strict, deploy=deploy)
                        self.errors.pop(model, None)
                    continue
                if self.failed.get(model) == wish:
                    continue
                data = self.download(model, want)
                core.install(model, data, providers, strict, True, sha256=sha, deploy=deploy)
                self.errors.pop(model, None)
            except AgentError as exc:
                self.errors[model] = {"sha256": want.get("sha256"), "error": exc.message[:300]}
                if exc.kind in ("package", "untrusted", "version", "conflict", "load", "providers", "request",
                                "memory", "memory_budget"):
                    self.failed[model] = wish
            except Exception as exc:  # never let the loop die
                self.errors[model] = {"sha256": want.get("sha256"), "error": f"{type(exc).__name__}: {exc}"[:300]}


def _attempt(a: origins.Attempt) -> dict:
    return {"url": a.url, "start": a.start, "status": a.status, "received": a.received, "error": a.error}

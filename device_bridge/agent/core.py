"""The agent's model store and runtime, independent of HTTP.

Store layout (``--store DIR``)::

    DIR/state.json                  which versions exist and which is active (the ONE switch)
    DIR/trusted_keys/*.pub          public keys whose packages this device installs
    DIR/models/<name>/<version>/    manifest.json, manifest.sig, model.onnx, extra files,
                                    providers.json (cached node placement)
    DIR/models/<name>/.incoming-*   an install in progress (removed at start-up)

Install: verify -> unpack into ``.incoming-*`` (files fsynced) -> rename to
``<version>/`` -> load a session -> write ``state.json.tmp``, fsync, ``os.replace``
onto ``state.json``, fsync the folder. A crash before the replace leaves the old
state (and an orphan folder that start-up removes); after it, the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_bridge import keys as keys_mod
from device_bridge import package as pkg
from device_bridge import providers as prov
from device_bridge import urls
from device_bridge.agent import deploy as deploy_mod
from device_bridge.agent import features as feat_mod
from device_bridge.agent import inputs as inp
from device_bridge.agent import memlimit
from device_bridge.agent.deploy import DeploySettings
from device_bridge.agent.sampling import DB_FILE as SAMPLES_DB
from device_bridge.agent.sampling import SampleSpec, SampleStore, spec_for
from device_bridge.agent.scheduler import DeadlineMissed, Lane, Scheduler
from device_bridge.agent.workers import CoreReserve, WorkerDown, WorkerProcess, WorkerSpec
from device_bridge.errors import ApiError
from device_bridge.experiments import arm_index
from device_bridge.experiments import check as check_experiment
from device_bridge.telemetry import CircuitBreaker, Telemetry

STATE_FILE = "state.json"
PLACEMENT_FILE = ".placement.json"  # the agent's own measurement; a package cannot ship a dot-file
INSTALL_PAUSE_ENV = "MLSQL_DEVICE_TEST_INSTALL_PAUSE"  # test hook: seconds to sleep mid-install
# test hook: with this env set to 1, a version folder holding a file ".test_broken" fails every run,
# as a session whose provider died would (for the circuit breaker tests)
TEST_HOOKS_ENV = "MLSQL_DEVICE_TEST_HOOKS"
CANARY_EVERY = 64  # the known-good row is refreshed from every 64th small request (a copy per request cost)

log = logging.getLogger("device_bridge.agent")


RESERVE_ENV = "MLSQL_DEVICE_REALTIME_RESERVE"
READ_YOUR_WRITES_S = 2.0  # outcomes and sample reads first wait this long at most for queued samples

class AgentError(ApiError):
    """An error with an HTTP status, a message for the caller and a ``kind`` (device_bridge.errors)."""


class StoreError(Exception):
    """The store cannot be used as it is; the agent does not start."""


@dataclass
class AgentConfig:
    name: str
    store: Path
    keep_versions: int = 3
    max_package_bytes: int = 256 * 1024 * 1024
    max_body_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 16 * 1024 * 1024  # JSON bodies: Python objects cost ~20x their bytes
    trust_files: list[str] = field(default_factory=list)
    breaker_window: int = 100
    breaker_min_requests: int = 20
    breaker_threshold: float = 0.5
    hub_url: str | None = None
    hub_token: str | None = None
    available_providers: list[str] | None = None  # override (tests); None = ORT's list
    ort_threads: int = 1  # intra-op threads per ORT session; 0 = ORT's default (one per core)
    cores: int = 0               # the budget of cores the scheduler shares out; 0 = os.cpu_count()
    priorities: bool = True      # False (--priorities off): one first-come-first-served queue for all
    batch_cpu: str = "idle"      # batch worker processes' CPU priority: idle (SCHED_IDLE), nice, normal
    batch_nice: int = 10         # their nice value with batch_cpu = "nice" (or where SCHED_IDLE is missing)
    memory_budget_mb: int | None = None  # the device's total for the active versions' memory_mb
    # cores kept free of batch worker processes while realtime requests arrive (workers.CoreReserve);
    # None: env MLSQL_DEVICE_REALTIME_RESERVE, else 1 on a device of 4 cores or more, 0 below (on 2
    # cores it would halve batch throughput)
    realtime_reserve: int | None = None
    realtime_window_ms: int = 1000  # ... for this long after the last realtime request
    # how a worker's memory_mb is enforced (memlimit.py): auto (a cgroup where the agent may make one,
    # else RLIMIT_AS), cgroup (refuse to start without one), rlimit (RLIMIT_AS)
    memory_limit: str = "auto"


@dataclass
class LoadedVersion:
    manifest: pkg.Manifest
    folder: Path
    session: Any
    specs: list[inp.InputSpec]
    output_names: list[str]
    providers: list[str]
    requested: list[str]
    attempts: list[dict]
    node_providers: dict[str, int] | None
    breaker: CircuitBreaker
    strict: bool
    canary: dict | None = None  # one row of a recent small request that ran: a known-good input
    since_canary: int = 0
    deploy: DeploySettings = field(default_factory=DeploySettings)
    lane: Lane | None = None            # its place in the scheduler
    worker: WorkerProcess | None = None  # isolation = 'process': the worker that holds the session
    threads: int = 1                    # ONNX Runtime intra-op threads of its session
    sampling: SampleSpec | None = None  # what its deploy samples (None: sample_rate = 0, nothing kept)
    binding: Any = None                 # features.Binding: inputs filled in from feature views (or None)
    request_specs: list | None = None   # with a binding: the columns a request sends (keys, not features)
    input_names: frozenset = frozenset()

    @property
    def key(self) -> tuple[str, int]:
        return (self.manifest.name, self.manifest.version)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class AgentCore:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.store = Path(config.store)
        self.store.mkdir(parents=True, exist_ok=True)
        (self.store / "models").mkdir(exist_ok=True)
        (self.store / "trusted_keys").mkdir(exist_ok=True)
        self.lock = threading.RLock()          # all mutations
        self.load_lock = threading.Lock()
        self.hooks = os.environ.get(TEST_HOOKS_ENV) == "1"  # read once, at the agent's start
        self.loop = None  # the agent's event loop, once it runs (attach_loop): it reads worker answers
        self.cores = config.cores if config.cores > 0 else (os.cpu_count() or 1)
        self.scheduler = Scheduler(self.cores, priorities=config.priorities)
        self.reserve = CoreReserve(self._realtime_reserve() if config.priorities else 0,
                                   config.realtime_window_ms / 1000.0, self._batch_workers)
        self.telemetry = Telemetry(secret=self._secret())
        self.memory_limits = memlimit.detect(config.memory_limit)  # memlimit.Unavailable: refused
        self.loaded: dict[tuple[str, int], LoadedVersion] = {}
        self.background: dict[str, dict] = {}  # background loop -> last ok / last error
        self.unaccounted: list[str] = []
        self.rebuilt = False
        self.experiments: dict[str, tuple[dict, int | None]] = {}  # model -> (experiment, the device's arm)
        self.state = self._read_state()  # (every state write indexes the experiments again)
        self._index_experiments()
        self.started = time.time()
        if not self.rebuilt:
            self._cleanup()
        self.load_errors: dict[str, str] = {}
        self.samples: SampleStore | None = None  # opened when a deploy first samples (or one left rows)
        self.samples_lock = threading.Lock()
        if (self.store / SAMPLES_DB).exists():
            self.sample_store()
        self.features: feat_mod.FeatureStore | None = None  # opened when a package first carries a view
        self.features_lock = threading.Lock()
        self.triggers = None  # triggers.Triggers, started by the first deploy with a trigger
        if (self.store / feat_mod.DB_FILE).exists():
            self.feature_store()
        for name, m in self.state["models"].items():
            if m.get("active") is not None:
                try:
                    self.check_memory_budget(name, self._settings_of(name, m["active"]))
                    self._load(name, m["active"])
                except Exception as exc:  # keep serving the others; report it
                    self.load_errors[name] = str(exc)
                    self.telemetry.event("load_failed", model=name, version=m["active"], error=str(exc)[:300])

    # ------------------------------------------------------------------ state

    def _secret(self) -> bytes:
        """This agent's key for hashing string values in telemetry (stable across restarts)."""
        path = self.store / "telemetry.key"
        try:
            return path.read_bytes()
        except OSError:
            pass
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def _read_state(self) -> dict:
        path = self.store / STATE_FILE
        if path.exists():
            try:
                st = json.loads(path.read_bytes())
                if _valid_state(st):
                    return st
                why = "state.json does not hold a valid state"
            except (OSError, ValueError, RecursionError) as exc:
                why = f"state.json cannot be read ({type(exc).__name__})"
            return self._rebuild_state(why)
        if any(v.is_dir() and v.name.isdigit() for m in (self.store / "models").iterdir() if m.is_dir()
               for v in m.iterdir()):
            # state.json is written when a store is created, before any install: versions without it
            # mean it was removed, not that the first install was cut short
            return self._rebuild_state("state.json is missing but installed versions are on disk")
        st = {"models": {}, "generation": 0}
        self._write_state(st)
        return st

    def _rebuild_state(self, why: str) -> dict:
        """A damaged state.json: rebuild it from the version folders whose signed manifests verify
        (the newest verified version of each model becomes active) and delete nothing; folders that
        do not verify stay on disk, listed as ``unaccounted`` in /v1/info."""
        trusted = self.trusted_keys()
        damaged = self.store / STATE_FILE
        if damaged.exists():
            keep = self.store / f"{STATE_FILE}.damaged-{int(time.time())}"
            try:
                os.replace(damaged, keep)
            except OSError as exc:
                raise StoreError(f"{damaged}: {why}, and it cannot be moved aside ({exc})") from None
        models: dict[str, dict] = {}
        for mdir in sorted((self.store / "models").iterdir()):
            if not mdir.is_dir():
                continue
            for vdir in sorted((v for v in mdir.iterdir() if v.is_dir() and not v.name.startswith(".")),
                               key=lambda v: (not v.name.isdigit(), int(v.name) if v.name.isdigit() else 0)):
                try:
                    manifest = pkg.verify_installed(vdir, trusted)
                    if manifest.name != mdir.name or str(manifest.version) != vdir.name:
                        raise pkg.PackageError("folder name does not match its manifest")
                except pkg.PackageError as exc:
                    self.unaccounted.append(f"{mdir.name}/{vdir.name}: {exc}")
                    continue
                m = models.setdefault(mdir.name, {"active": None, "versions": [], "suspended": [],
                                                  "config": {}, "sha256": {}, "floor": 0})
                m["versions"].append(manifest.version)
                m["sha256"][str(manifest.version)] = None  # the package bytes are not kept: unknown
                m["active"] = manifest.version
                m["floor"] = manifest.version
        st = {"models": models, "generation": 0}
        self.rebuilt = True
        self._write_state(st)
        log.error("%s: rebuilt the state from the verified version folders (%s); unaccounted: %s",
                  self.store, ", ".join(f"{n}@{m['active']}" for n, m in models.items()) or "none",
                  self.unaccounted or "none")
        self.telemetry.event("state_rebuilt", reason=why, models={n: m["versions"] for n, m in models.items()},
                             unaccounted=self.unaccounted[:20])
        return st

    def note_background(self, name: str, error: BaseException | None = None) -> None:
        """A background loop's last outcome, shown in /v1/info (a failing loop is seen, not silent)."""
        entry = self.background.setdefault(name, {"last_ok": None, "last_error": None, "last_error_time": None,
                                                  "errors": 0})
        if error is None:
            entry["last_ok"] = time.time()
        else:
            entry["errors"] += 1
            entry["last_error"] = f"{type(error).__name__}: {error}"[:300]
            entry["last_error_time"] = time.time()

    def _write_state(self, state: dict) -> None:
        state["generation"] = int(state.get("generation", 0)) + 1
        atomic_write(self.store / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())
        self.state = state
        self._index_experiments()  # a model deleted (or installed again) takes its experiment with it

    def _copy_state(self) -> dict:
        return json.loads(json.dumps(self.state))

    def _cleanup(self) -> None:
        """Remove half-done installs and folders the state does not list."""
        models_dir = self.store / "models"
        for mdir in models_dir.iterdir():
            if not mdir.is_dir():
                continue
            known = {str(v) for v in self.state["models"].get(mdir.name, {}).get("versions", [])}
            for vdir in mdir.iterdir():
                if vdir.name.startswith(".incoming-") or (vdir.is_dir() and vdir.name not in known):
                    shutil.rmtree(vdir, ignore_errors=True)
            if mdir.name not in self.state["models"] and not any(mdir.iterdir()):
                shutil.rmtree(mdir, ignore_errors=True)
        for tmp in self.store.glob(".state.json.*.tmp"):
            tmp.unlink(missing_ok=True)

    def trusted_keys(self) -> dict:
        out = {}
        files = list((self.store / "trusted_keys").glob("*.pub")) + [Path(p) for p in self.config.trust_files]
        for f in files:
            try:
                k = keys_mod.load_public_key(f)
            except ValueError:
                continue
            out[keys_mod.key_id(k)] = k
        return out

    def available_providers(self) -> list[str]:
        if self.config.available_providers is not None:
            return list(self.config.available_providers)
        import onnxruntime as ort

        return list(ort.get_available_providers())

    # ------------------------------------------------------------------ loading

    def _folder(self, name: str, version: int) -> Path:
        return self.store / "models" / name / str(version)

    def settings_for(self, manifest: pkg.Manifest, requested: dict | None) -> DeploySettings:
        """The deploy settings a version runs with: class defaults <- the package's ``deploy`` field
        <- the request's (see deploy.py)."""
        return deploy_mod.effective(manifest.extra.get("deploy"), requested, self.cores,
                                    [c.name for c in manifest.inputs])

    def class_threads(self, s: DeploySettings) -> int:
        """ONNX Runtime intra-op threads for a session of this class, from the budget of cores:
        realtime 1 (requests run side by side, none waits for a pool), normal --ort-threads, batch
        what is left once one core is kept for realtime, shared among its runs at once."""
        if not self.config.priorities or s.priority == "normal":
            return self.config.ort_threads
        if s.priority == "realtime":
            return 1
        return max(1, (self.cores - 1) // max(1, s.max_concurrency))

    def _realtime_reserve(self) -> int:
        if self.config.realtime_reserve is not None:
            return self.config.realtime_reserve
        env = os.environ.get(RESERVE_ENV, "").strip()
        if env:
            try:
                return max(0, int(env))
            except ValueError:
                log.warning("%s=%r is not a number of cores: ignored", RESERVE_ENV, env)
        return 1 if self.cores >= 4 else 0

    def _batch_workers(self) -> list[WorkerProcess]:
        return [lv.worker for lv in list(self.loaded.values())
                if lv.worker is not None and lv.deploy.priority == "batch"]

    def class_cpu(self, s: DeploySettings) -> tuple[str | None, int]:
        """A worker's CPU priority: batch workers below everything else (with priorities on)."""
        if self.config.priorities and s.priority == "batch" and self.config.batch_cpu != "normal":
            return self.config.batch_cpu, self.config.batch_nice
        return None, 0

    def check_memory_budget(self, name: str, s: DeploySettings) -> None:
        """Refuse to make active a version whose memory_mb, with the other models' active versions,
        would pass the device's budget (--memory-budget-mb)."""
        budget = self.config.memory_budget_mb
        if not budget:
            return
        used = self.memory_committed_mb(exclude=name)
        if used + s.memory_mb > budget:
            raise AgentError(409, f"model {name} needs memory_mb {s.memory_mb}, and the device's other models "
                                  f"hold {used} MB of its budget of {budget} MB (--memory-budget-mb): lower "
                                  "memory_mb, or remove a model first", "memory_budget")

    def memory_committed_mb(self, exclude: str | None = None) -> int:
        total = 0
        for n, m in self.state["models"].items():
            lv = self.loaded.get((n, m.get("active")))
            if n != exclude and lv is not None:
                total += lv.deploy.memory_mb
        return total

    def attach_loop(self, loop) -> None:
        """The event loop the agent serves on: worker processes' answers are read there from now on."""
        self.loop = loop
        with self.load_lock:
            workers = [lv.worker for lv in self.loaded.values() if lv.worker is not None]
        for w in workers:
            w.attach(loop)

    def _worker_event(self, name: str, version: int):
        def event(what: str, **fields) -> None:
            self.telemetry.event(what, model=name, version=version, **fields)
            if what == "worker_start_failed":
                # a worker that cannot even run its known-good row again fails for everyone
                lv = self.loaded.get((name, version))
                if lv is not None and lv.breaker.record(True):
                    self.suspend(name, version, "its worker process does not start again")
        return event

    def _load(self, name: str, version: int, providers: list[str] | None = None,
              strict: bool | None = None, folder: Path | None = None, deploy: dict | None = None) -> LoadedVersion:
        key = (name, version)
        with self.load_lock:
            if key in self.loaded and folder is None:
                return self.loaded[key]
        explicit = folder is not None  # a new session asked for, replacing a loaded one
        folder = folder or self._folder(name, version)
        manifest = pkg.manifest_from_json((folder / pkg.MANIFEST_FILE).read_bytes())
        cfg = self.state["models"].get(name, {}).get("config", {}).get(str(version), {})
        if providers is None:
            providers = cfg.get("providers") or list(manifest.providers)
        if strict is None:
            strict = bool(cfg.get("strict", False))
        settings = self.settings_for(manifest, deploy if deploy is not None else cfg.get("deploy"))
        try:
            plan = prov.plan_providers(providers, self.available_providers(), strict)
        except prov.ProviderError as exc:
            raise AgentError(422, str(exc), "providers") from None
        model_path = str(folder / pkg.MODEL_FILE)
        cache = folder / PLACEMENT_FILE
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = None
        fresh = not isinstance(cached, dict) or cached.get("node_providers") is None
        threads = self.class_threads(settings)
        worker = None
        if settings.isolation == "process":
            worker = WorkerProcess(WorkerSpec(
                name=name, version=version, folder=folder, model_path=model_path, preference=plan.preference,
                available=plan.available, candidates=plan.candidates, strict=plan.strict, threads=threads,
                concurrency=settings.max_concurrency, memory_mb=settings.memory_mb,
                nice=self.class_cpu(settings)[1], cpu_policy=self.class_cpu(settings)[0], profile=fresh,
                limits=self.memory_limits),
                self._worker_event(name, version), self.loop)
            if settings.priority == "batch":
                worker.cpus = self.reserve.confine()
            ready = worker.start()
            session, res_providers = None, ready["providers"]
            requested, attempts = ready["requested"], ready["attempts"]
            sess_inputs, output_names = ready["inputs"], ready["outputs"]
            profiled = ready.get("node_providers")
        else:
            try:
                res = prov.create_session(model_path, plan, threads=threads, profile=fresh)
            except prov.ProviderError as exc:
                raise AgentError(422, f"model {name} version {version} cannot be loaded: {exc}", "load") from None
            session, res_providers, requested, attempts = res.session, res.providers, res.requested, res.attempts
            sess_inputs = {i.name: i.shape for i in res.session.get_inputs()}
            output_names = [o.name for o in res.session.get_outputs()]
            profiled = res.node_providers
        if fresh:
            node_providers = profiled
        elif cached.get("providers") == res_providers:
            node_providers = cached["node_providers"]
        elif worker is None:  # a provider came or went since the placement was recorded
            node_providers = prov.profile_node_providers(model_path, requested, plan.strict)
        else:
            node_providers = None
        if node_providers is not None and (fresh or node_providers != cached.get("node_providers")
                                           or res_providers != cached.get("providers")):
            try:
                atomic_write(cache, json.dumps({"providers": res_providers,
                                                "node_providers": node_providers}).encode())
            except OSError:
                pass
        specs = [inp.make_spec(c, sess_inputs.get(c.name)) for c in manifest.inputs]
        missing = [c.name for c in manifest.inputs if c.name not in sess_inputs]
        if missing:
            if worker is not None:
                worker.stop(0)
            raise AgentError(422, f"manifest inputs not in the ONNX graph: {', '.join(missing)}", "package")
        lv = LoadedVersion(
            manifest=manifest, folder=folder, session=session, specs=specs,
            output_names=output_names, providers=res_providers,
            requested=requested, attempts=attempts, node_providers=node_providers,
            breaker=CircuitBreaker(self.config.breaker_window, self.config.breaker_min_requests,
                                   self.config.breaker_threshold),
            strict=plan.strict, deploy=settings, worker=worker, threads=threads,
        )
        fv = manifest.extra.get("feature_views")
        if fv:
            fs = self.feature_store()
            views = fs.check_install(fv)
            fs.install(views, name, settings.max_keys, settings.max_state_mb)
            lv.binding = feat_mod.bind(specs, views)
            if lv.binding is not None:
                lv.request_specs = lv.binding.request_specs(specs)
        lv.input_names = frozenset(s.name for s in specs)
        if settings.trigger:
            from device_bridge.agent import triggers as trig_mod

            if not fv:
                raise AgentError(400, "deploy setting trigger: the package carries no feature view, so no event "
                                      "can trigger it", "request")
            trig_mod.check(settings.trigger, self.features, lv)
            self.trigger_runner()
        lv.sampling = spec_for(self.config.name, lv)
        if lv.sampling is not None:
            self.sample_store()
        lv.lane = self.scheduler.lane(key, settings.priority, settings.max_concurrency, settings.max_queue,
                                      settings.timeout_ms)
        vt = self.telemetry.get(name, version)
        vt.providers = list(res_providers)
        vt.node_providers = node_providers
        vt.vocab = _vocab(manifest)
        with self.load_lock:
            old = self.loaded.get(key)
            if old is not None and not explicit and worker is not None:  # loaded meanwhile by another request
                worker.stop(0)
                return old
            self.loaded[key] = lv
        if old is not None and old is not lv and old.worker is not None:
            old.worker.stop()
        return lv

    # ------------------------------------------------------------------ samples

    def sample_store(self) -> SampleStore:
        """The device's sample store (sampling.py), opened on first use: a device whose deploys never
        sample has no samples.db at all."""
        if self.samples is None:
            with self.samples_lock:
                if self.samples is None:
                    self.samples = SampleStore(self.store, self.config.name, self.note_background)
        return self.samples

    def feature_store(self) -> feat_mod.FeatureStore:
        """The device's feature views (features.py), opened on first use: a device whose packages carry
        no view has no features.db."""
        if self.features is None:
            with self.features_lock:
                if self.features is None:
                    self.features = feat_mod.FeatureStore(self.store)
        return self.features

    def trigger_runner(self):
        """The thread that runs triggered models (triggers.py), started with the first trigger."""
        if self.triggers is None:
            from device_bridge.agent.triggers import Triggers

            with self.features_lock:
                if self.triggers is None:
                    self.triggers = Triggers(self)
                    self.feature_store().listener = self.triggers.on_events
        return self.triggers

    def active_versions(self) -> list[LoadedVersion]:
        out = []
        for n, m in list(self.state["models"].items()):
            lv = self.loaded.get((n, m.get("active")))
            if lv is not None:
                out.append(lv)
        return out

    def sample_budget(self, name: str) -> int:
        """The bytes ``name``'s samples and outcomes may take: its active version's sample_max_mb."""
        m = self.state["models"].get(name) or {}
        lv = self.loaded.get((name, m.get("active")))
        return (lv.deploy.sample_max_mb if lv else deploy_mod.DeploySettings.sample_max_mb) << 20

    def record_outcomes(self, name: str, outcomes: list[tuple[str, str]]) -> dict:
        """Late true answers (checked already by the route): recorded for the sampled request ids of
        this model, counted as unknown for the others (sampling.py)."""
        self._model(name)
        store = self.sample_store()
        # an app posts an outcome right after its answer: the rows it answered may still be on
        # their way to disk (the writer commits every 25 ms), and must count as known
        store.flush(READ_YOUR_WRITES_S)
        return store.record_outcomes(name, outcomes, self.sample_budget(name))

    # ------------------------------------------------------------------ info

    def info(self) -> dict:
        import onnxruntime as ort

        sample_stats = self.samples.stats() if self.samples is not None else {}
        models = {}
        for name, m in self.state["models"].items():
            active = m.get("active")
            lv = self.loaded.get((name, active)) if active is not None else None
            models[name] = {
                "active": active, "versions": m.get("versions", []), "suspended": m.get("suspended", []),
                "sha256": m.get("sha256", {}),
                "providers": lv.providers if lv else None,
                "node_providers": lv.node_providers if lv else None,
                "preferred_providers": m.get("config", {}).get(str(active), {}).get("providers"),
                "requested_providers": lv.requested if lv else None,
                "provider_attempts": lv.attempts if lv else None,
                "inputs": [c.to_dict() for c in lv.manifest.inputs] if lv else None,
                "outputs": [c.to_dict() for c in lv.manifest.outputs] if lv else None,
                "training_stats": _training_moments(lv.manifest) if lv else None,
                "load_error": self.load_errors.get(name),
                "deploy": lv.deploy.to_dict() if lv else None,
                "intra_op_threads": lv.threads if lv else None,
                "worker": lv.worker.info() if lv and lv.worker else None,
                "samples": dict(sample_stats.get(name, _NO_SAMPLES)),
                "feature_views": sorted({v for _, v, _ in lv.binding.fills}) if lv and lv.binding else [],
                "experiment": m.get("experiment"),
                "experiment_arm": (self.experiments.get(name) or (None, None))[1],
            }
        return {
            "name": self.config.name, "agent_version": "0.1.0",
            "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "memory_bytes": _memory_bytes(), "onnxruntime": ort.__version__,
            "available_providers": self.available_providers(), "ort_threads": self.config.ort_threads,
            "trusted_keys": sorted(self.trusted_keys()), "models": models,
            "uptime_s": round(time.time() - self.started, 3), "hub": self.config.hub_url,
            "background": json.loads(json.dumps(self.background)),
            "state": {"rebuilt": self.rebuilt, "unaccounted": list(self.unaccounted)},
            "scheduler": {**self.scheduler.describe(), "cores": self.cores,
                          "batch_cpu": self.config.batch_cpu if self.config.priorities else "normal",
                          "batch_nice": self.config.batch_nice, "realtime_reserve": self.reserve.describe(),
                          "intra_op_threads": {c: self.class_threads(DeploySettings(**deploy_mod.class_defaults(c, self.cores)))
                                               for c in deploy_mod.PRIORITIES}},
            "memory_budget_mb": self.config.memory_budget_mb, "memory_committed_mb": self.memory_committed_mb(),
            "memory_limit": self.memory_limits.describe(),
        }

    def status(self) -> dict:
        """Compact state for the hub."""
        return {name: {"active": m.get("active"), "versions": m.get("versions", []),
                       "suspended": m.get("suspended", []),
                       "sha256": m.get("sha256", {}).get(str(m.get("active"))),
                       "experiment": (m.get("experiment") or {}).get("id")}
                for name, m in self.state["models"].items()}

    # ------------------------------------------------------------------ install

    def install(self, name: str | None, data: bytes, providers: list[str] | None = None,
                strict: bool = False, activate: bool = True, sha256: str | None = None,
                deploy: dict | None = None) -> dict:
        """``sha256``: the package's digest when the caller has just checked it (a hub download).
        ``deploy``: the request's deploy settings (deploy.py), over the package's own."""
        if len(data) > self.config.max_package_bytes:
            raise AgentError(413, f"package is {len(data)} bytes, over the limit of "
                                  f"{self.config.max_package_bytes}", "package")
        trusted = self.trusted_keys()
        if not trusted:
            raise AgentError(422, "this device trusts no signing key: put the workspace's public key in "
                                  f"{self.store / 'trusted_keys'}/ or start the agent with --trust KEYFILE",
                             "untrusted")
        try:
            manifest, files = pkg.verify_package(data, trusted, self.config.max_package_bytes)
            signature = pkg.signature_of(data)
        except pkg.UntrustedKeyError as exc:
            raise AgentError(422, f"package refused: {exc}", "untrusted") from None
        except pkg.PackageError as exc:
            raise AgentError(422, f"package refused: {exc}", "package") from None
        if name is not None and manifest.name != name:
            raise AgentError(400, f"package holds model {manifest.name!r}, not {name!r}", "package")
        name, version = manifest.name, manifest.version
        if providers is not None:
            try:
                providers = [prov.to_ort_name(p) for p in providers]
            except prov.ProviderError as exc:
                raise AgentError(400, str(exc)) from None
        deploy = deploy_mod.parse(deploy)
        settings = self.settings_for(manifest, deploy)  # a bad deploy field in the package: refused here
        if manifest.extra.get("feature_views"):  # a bad or conflicting view: refused before anything is written
            if not isinstance(manifest.extra["feature_views"], list):
                raise AgentError(422, "package refused: feature_views must be a list of view specs", "package")
            views = self.feature_store().check_install(manifest.extra["feature_views"])
            feat_mod.bind([inp.make_spec(c, None) for c in manifest.inputs], views)
        sha = sha256 or hashlib.sha256(data).hexdigest()
        with self.lock:
            m = self.state["models"].get(name)
            if m and version in m.get("versions", []):
                known = m.get("sha256", {}).get(str(version))
                if known is None and self._same_manifest(name, version, manifest):
                    known = self._adopt_sha(name, version, sha)  # a rebuilt state learns the package's digest
                if known != sha:
                    raise AgentError(409, f"model {name} version {version} is already installed with "
                                          "different content; bump the version", "conflict")
                active = m.get("active")
                if activate and active is not None and version < active:
                    raise AgentError(409, f"model {name} version {version} is older than the active version "
                                          f"{active}: installing a package never moves a model back; use "
                                          "activate or rollback (ROLLBACK MODEL) for that", "version")
                if activate and (active != version or providers is not None or deploy is not None):
                    return self.activate(name, version, providers=providers, strict=strict, deploy=deploy)
                return {"model": name, "version": version, "installed": False, "active": active}
            newest = max([*(m or {}).get("versions", []), int((m or {}).get("floor") or 0)], default=0)
            if version < newest:
                raise AgentError(409, f"model {name} version {version} is older than version {newest}, which "
                                      "this device has installed: older versions are not installed again "
                                      "(anti-rollback); roll back to an installed version, or publish the old "
                                      "model as a new version", "version")
            if activate:
                self.check_memory_budget(name, settings)
            mdir = self.store / "models" / name
            mdir.mkdir(parents=True, exist_ok=True)
            incoming = mdir / f".incoming-{uuid.uuid4().hex[:12]}"
            incoming.mkdir()
            try:
                all_files = dict(files)
                all_files[pkg.MANIFEST_FILE] = manifest.canonical_bytes()
                all_files[pkg.SIGNATURE_FILE] = signature  # kept: a damaged state is rebuilt from these
                for fname, content in all_files.items():
                    target = incoming / fname
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as f:
                        f.write(content)
                        f.flush()
                        os.fsync(f.fileno())
                fsync_dir(incoming)
                final = self._folder(name, version)
                if final.exists():  # orphan of an earlier crash
                    shutil.rmtree(final)
                os.rename(incoming, final)
                fsync_dir(mdir)
            except OSError as exc:
                shutil.rmtree(incoming, ignore_errors=True)
                raise AgentError(507, f"cannot write the package to the store: {exc}", "store") from None
            pause = os.environ.get(INSTALL_PAUSE_ENV)
            if pause:
                time.sleep(float(pause))
            try:
                lv = self._load(name, version, providers, strict, folder=final, deploy=deploy)
            except ApiError:
                shutil.rmtree(final, ignore_errors=True)
                raise
            except Exception as exc:
                shutil.rmtree(final, ignore_errors=True)
                raise AgentError(422, f"model {name} version {version} cannot be loaded: {exc}", "load") from None
            st = self._copy_state()
            mm = st["models"].setdefault(name, {"active": None, "versions": [], "suspended": [],
                                                "config": {}, "sha256": {}})
            mm["versions"].append(version)
            mm["floor"] = max(int(mm.get("floor") or 0), version)
            mm["sha256"][str(version)] = sha
            mm["config"][str(version)] = {"providers": providers or _ort_names(manifest.providers),
                                          "strict": bool(strict)}
            if deploy:
                mm["config"][str(version)]["deploy"] = deploy
            previous = mm.get("active")
            if activate:
                mm["active"] = version
                if version in mm["suspended"]:
                    mm["suspended"].remove(version)
            pruned = self._prune(mm, previous if activate else None)
            self._write_state(st)  # <- the switch
            self.load_errors.pop(name, None)
            for v in pruned:
                self._unload(name, v)
                shutil.rmtree(self._folder(name, v), ignore_errors=True)
            self._retire_inactive(name)
            self.telemetry.event("installed", model=name, version=version, activated=activate,
                                 previous=previous, providers=lv.providers)
            return {"model": name, "version": version, "installed": True, "active": mm["active"],
                    "previous": previous, "providers": lv.providers, "node_providers": lv.node_providers,
                    "provider_attempts": lv.attempts, "pruned": pruned, "deploy": lv.deploy.to_dict()}

    def _same_manifest(self, name: str, version: int, manifest: pkg.Manifest) -> bool:
        try:
            return (self._folder(name, version) / pkg.MANIFEST_FILE).read_bytes() == manifest.canonical_bytes()
        except OSError:
            return False

    def _adopt_sha(self, name: str, version: int, sha: str) -> str:
        st = self._copy_state()
        st["models"][name]["sha256"][str(version)] = sha
        self._write_state(st)
        return sha

    def _prune(self, mm: dict, previous: int | None = None) -> list[int]:
        """Drop the oldest versions over --keep-versions, never the active one nor the one it
        replaced: that is where a rollback goes, and anti-rollback would refuse to install it again.
        A running experiment's arms are never dropped either."""
        keep = max(1, self.config.keep_versions)
        arms = {a["version"] for a in (mm.get("experiment") or {}).get("arms", [])}
        pruned = []
        while len(mm["versions"]) > keep:
            victim = next((v for v in mm["versions"] if v != mm.get("active") and (v != previous or keep < 2)
                           and v not in arms), None)
            if victim is None:
                break
            mm["versions"].remove(victim)
            mm["sha256"].pop(str(victim), None)
            mm["config"].pop(str(victim), None)
            if victim in mm["suspended"]:
                mm["suspended"].remove(victim)
            pruned.append(victim)
        return pruned

    def _unload(self, name: str, version: int) -> None:
        with self.load_lock:
            lv = self.loaded.pop((name, version), None)
        self.scheduler.drop((name, version))
        if lv is not None and lv.worker is not None:
            lv.worker.stop()

    def _retire_inactive(self, name: str) -> None:
        """A worker process holds memory out of the device's budget: only the active version keeps
        one (another version starts its worker again when a request names it)."""
        active = self.state["models"].get(name, {}).get("active")
        for (n, v), lv in list(self.loaded.items()):
            if n == name and v != active and lv.worker is not None:
                self._unload(n, v)

    def _settings_of(self, name: str, version: int, deploy: dict | None = None) -> DeploySettings:
        folder = self._folder(name, version)
        manifest = pkg.manifest_from_json((folder / pkg.MANIFEST_FILE).read_bytes())
        if deploy is None:
            deploy = self.state["models"].get(name, {}).get("config", {}).get(str(version), {}).get("deploy")
        return self.settings_for(manifest, deploy)

    def install_from_url(self, name: str | None, url: str, sha256: str | None, providers=None,
                         strict=False, activate=True, token: str | None = None, deploy: dict | None = None) -> dict:
        if not isinstance(url, str) or urls.origin(url) is None:
            raise AgentError(400, "url must be an http(s) URL")
        req = urllib.request.Request(url)
        # the hub token goes to the hub's exact origin only (a URL that merely starts with the hub's,
        # such as :40011 for :4001, is another server); redirects are never followed
        tok = token or (self.config.hub_token if urls.same_origin(url, self.config.hub_url) else None)
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        limit = self.config.max_package_bytes
        try:
            with urls.open_url(req, timeout=60) as resp:
                data = resp.read(limit + 1)
        except Exception as exc:
            raise AgentError(424, f"cannot download the package from {url}: {exc}",
                             "download") from None
        if len(data) > limit:
            raise AgentError(413, f"package at {url} is over the limit of {limit} bytes", "package")
        digest = hashlib.sha256(data).hexdigest()
        if sha256 is not None and digest != sha256:
            raise AgentError(422, f"package downloaded from {url} does not match sha256 {sha256}", "package")
        return self.install(name, data, providers, strict, activate, sha256=digest, deploy=deploy)

    # ------------------------------------------------------------------ activate / rollback / delete

    def _model(self, name: str) -> dict:
        m = self.state["models"].get(name)
        if m is None:
            known = ", ".join(sorted(self.state["models"])) or "none"
            raise AgentError(404, f"unknown model {name!r} (installed: {known})", "not_found")
        return m

    def activate(self, name: str, version: int, providers=None, strict=False, reason: str = "activate",
                 deploy: dict | None = None) -> dict:
        deploy = deploy_mod.parse(deploy)
        with self.lock:
            m = self._model(name)
            if isinstance(version, bool) or not isinstance(version, int) or version not in m["versions"]:
                raise AgentError(404, f"model {name} has no version {version!r} "
                                      f"(installed: {', '.join(map(str, m['versions']))})", "not_found")
            if providers is not None:
                try:
                    providers = [prov.to_ort_name(p) for p in providers]
                except prov.ProviderError as exc:
                    raise AgentError(400, str(exc)) from None
            self.check_memory_budget(name, self._settings_of(name, version, deploy))
            # new providers or deploy settings: a new session (folder= skips the loaded one), swapped in
            # only once it loads, so a preference that cannot load leaves the serving session as it was
            renew = providers is not None or deploy is not None
            lv = self._load(name, version, providers, strict if providers is not None else None,
                            folder=self._folder(name, version) if renew else None, deploy=deploy)
            lv.breaker = CircuitBreaker(self.config.breaker_window, self.config.breaker_min_requests,
                                        self.config.breaker_threshold)
            st = self._copy_state()
            mm = st["models"][name]
            previous = mm["active"]
            mm["active"] = version
            if version in mm["suspended"]:
                mm["suspended"].remove(version)
            if providers is not None:
                mm["config"][str(version)] = {**mm["config"].get(str(version), {}), "providers": providers,
                                              "strict": bool(strict)}
            if deploy is not None:
                mm["config"].setdefault(str(version), {})["deploy"] = deploy
            self._write_state(st)
            self._retire_inactive(name)
            self.telemetry.event(reason, model=name, version=version, previous=previous)
            return {"model": name, "active": version, "previous": previous, "providers": lv.providers,
                    "node_providers": lv.node_providers, "deploy": lv.deploy.to_dict()}

    def rollback(self, name: str, reason: str = "rollback") -> dict:
        with self.lock:
            m = self._model(name)
            active = m.get("active")
            candidates = [v for v in m["versions"] if v != active and v not in m["suspended"]]
            if active is not None:
                older = [v for v in candidates if m["versions"].index(v) < m["versions"].index(active)]
                candidates = older or []
            if not candidates:
                raise AgentError(409, f"model {name} has no earlier version to roll back to "
                                      f"(installed: {', '.join(map(str, m['versions']))}, active: {active})")
            return self.activate(name, candidates[-1], reason=reason)

    def delete(self, name: str, version: int | None = None) -> dict:
        with self.lock:
            m = self._model(name)
            st = self._copy_state()
            if version is None:
                del st["models"][name]
                self._write_state(st)
                for v in m["versions"]:
                    self._unload(name, v)
                shutil.rmtree(self.store / "models" / name, ignore_errors=True)
                self.telemetry.event("deleted", model=name)
                return {"model": name, "deleted": m["versions"]}
            if version not in m["versions"]:
                raise AgentError(404, f"model {name} has no version {version}", "not_found")
            if version == m.get("active"):
                raise AgentError(409, f"version {version} of {name} is active; activate another first")
            mm = st["models"][name]
            mm["versions"].remove(version)
            mm["sha256"].pop(str(version), None)
            mm["config"].pop(str(version), None)
            if version in mm["suspended"]:
                mm["suspended"].remove(version)
            self._write_state(st)
            self._unload(name, version)
            shutil.rmtree(self._folder(name, version), ignore_errors=True)
            return {"model": name, "deleted": [version]}

    def suspend(self, name: str, version: int, reason: str) -> None:
        """Circuit breaker: suspend the version and roll back when a previous one exists."""
        with self.lock:
            m = self.state["models"].get(name)
            if m is None or version not in m["versions"] or version in m["suspended"]:
                return
            st = self._copy_state()
            st["models"][name]["suspended"].append(version)
            self._write_state(st)
            ev = {"model": name, "version": version, "reason": reason}
            try:
                res = self.rollback(name, reason="auto_rollback") if m.get("active") == version else None
                ev["rolled_back_to"] = res["active"] if res else None
            except AgentError as exc:
                ev["rolled_back_to"] = None
                ev["note"] = exc.message
            self.telemetry.event("circuit_breaker", **ev)

    # ------------------------------------------------------------------ predict

    # ------------------------------------------------------------------ experiments

    def _index_experiments(self) -> None:
        """The running experiments by model, with this device's arm where the unit is the device
        (computed once: the predict path reads a dict)."""
        out = {}
        for name, m in self.state["models"].items():
            e = m.get("experiment")
            if e:
                shares = [a["share"] for a in e["arms"]]
                mine = e["arms"][arm_index(e["id"], self.config.name, shares)]["version"] \
                    if e["unit"] == "device" else None
                out[name] = (e, mine)
        self.experiments = out

    def set_experiment(self, name: str, raw: Any) -> dict:
        """Start (or replace) the experiment on ``name``: its arms' versions must be installed."""
        try:
            e = check_experiment(raw)
        except ValueError as exc:
            raise AgentError(400, str(exc), "request") from None
        with self.lock:
            m = self._model(name)
            missing = [a["version"] for a in e["arms"] if a["version"] not in m["versions"]]
            if missing:
                raise AgentError(409, f"experiment {e['id']}: model {name} has no version {missing[0]} installed "
                                      f"(installed: {', '.join(map(str, m['versions']))})", "not_found")
            if e["unit"] not in ("device", "request"):  # an input column: every arm must read it
                for a in e["arms"]:
                    names = [c.name for c in self.resolve(name, a["version"]).manifest.inputs]
                    if e["unit"] not in names:
                        raise AgentError(400, f"experiment.unit {e['unit']!r} is not an input column of {name} "
                                              f"version {a['version']} (its inputs: {', '.join(names)})", "request")
            st = self._copy_state()
            st["models"][name]["experiment"] = e
            self._write_state(st)
            self._index_experiments()
        self.telemetry.event("experiment_started", model=name, experiment=e["id"], unit=e["unit"],
                             arms=[a["version"] for a in e["arms"]])
        return {"model": name, "experiment": e, "arm": self.experiments[name][1]}

    def clear_experiment(self, name: str) -> dict:
        with self.lock:
            m = self._model(name)
            had = m.get("experiment")
            if had:
                st = self._copy_state()
                st["models"][name].pop("experiment", None)
                self._write_state(st)
                self._index_experiments()
        if had:
            self.telemetry.event("experiment_stopped", model=name, experiment=had["id"])
        return {"model": name, "stopped": (had or {}).get("id")}

    def experiment_version(self, name: str, rid: bytes | None) -> int | None:
        """The version an unpinned request to ``name`` runs while an experiment runs on it: this
        device's arm (unit 'device'), or the arm of the request's id (unit 'request': the
        X-Request-Ids header's prefix or first id; a request without one gets a fresh random id, as
        its answer does). None when no experiment runs."""
        got = self.experiments.get(name)
        if got is None:
            return None
        e, mine = got
        if mine is not None:
            return mine
        if e["unit"] != "request":
            return None  # by an input column: chosen once the body is read (column_version)
        key = rid.decode("utf-8", "replace").split(",", 1)[0] if rid else os.urandom(16).hex()
        return e["arms"][arm_index(e["id"], key, [a["share"] for a in e["arms"]])]["version"]

    def column_unit(self, name: str) -> dict | None:
        """The running experiment on ``name`` when its unit is an input column."""
        got = self.experiments.get(name)
        return got[0] if got is not None and got[0]["unit"] not in ("device", "request") else None

    def column_version(self, e: dict, feed: dict) -> int:
        """The arm's version of a request whose rows are all in one arm by the experiment's column; a
        batch whose rows fall in different arms is refused (400 naming two rows of two arms)."""
        from device_bridge.experiments import column_arms

        col = feed.get(e["unit"])
        if col is None or len(col) == 0:
            return e["arms"][0]["version"]
        arms = column_arms(e["id"], col, [a["share"] for a in e["arms"]])
        if (arms != arms[0]).any():
            j = int(np.argmax(arms != arms[0]))
            raise AgentError(400, f"experiment {e['id']} assigns by column {e['unit']!r}: rows 0 and {j} of this "
                                  f"request fall in different arms; send each {e['unit']}'s rows in a request of "
                                  "their own", "invalid_input")
        return e["arms"][int(arms[0])]["version"]

    def resolve(self, name: str, version: int | None = None) -> LoadedVersion:
        m = self.state["models"].get(name)
        if m is None:
            known = ", ".join(sorted(self.state["models"])) or "none"
            raise AgentError(404, f"unknown model {name!r} (installed: {known})", "not_found")
        if version is None:
            version = m.get("active")
            if version is None:
                raise AgentError(409, f"model {name} has no active version")
        elif version not in m["versions"]:
            raise AgentError(404, f"model {name} has no version {version}", "not_found")
        if version in m.get("suspended", []):
            raise AgentError(503, f"model {name} version {version} is suspended by the circuit breaker "
                                  "and no earlier version is available", "suspended")
        try:
            return self._load(name, version)
        except AgentError:
            raise
        except Exception as exc:
            raise AgentError(503, f"model {name} version {version} cannot be loaded: {exc}", "load") from None

    def _run(self, lv: LoadedVersion, feed: dict, ro=None):
        if self.hooks and (lv.folder / ".test_broken").exists():
            raise RuntimeError("simulated execution provider failure (test hook)")
        return lv.session.run(None, feed, ro)

    def _session_broken(self, lv: LoadedVersion) -> bool:
        """After a failed run: does the session also fail on a known-good input (the last row that
        ran, or a dummy row before any did)? Only then is the failure the model's, not the request's."""
        try:
            self._run(lv, lv.canary if lv.canary is not None else prov.dummy_feed(lv.session))
            return False
        except Exception:
            return True

    def _too_slow(self, lv: LoadedVersion) -> bool:
        """After a run overran its deadline: does a known-good row overrun it too? Only then does the
        miss count for the circuit breaker (a big batch that overruns is the request's doing, and no
        client may suspend a model for the others)."""
        t0 = time.perf_counter()
        try:
            self._run(lv, lv.canary if lv.canary is not None else prov.dummy_feed(lv.session))
        except Exception:
            return True
        return (time.perf_counter() - t0) * 1000.0 > lv.deploy.timeout_ms

    def _count_failure(self, lv: LoadedVersion, background: bool = False) -> None:
        if lv.breaker.record(True):
            self._trip(lv, background)

    def _trip(self, lv: LoadedVersion, background: bool = False) -> None:
        """The breaker tripped: suspend (and roll back) before the request that tripped it is answered.
        ``background``: from a worker's answer on the event loop, where a rollback to a version in a
        worker process would start that process: a thread of its own does it."""
        args = (lv.manifest.name, lv.manifest.version,
                f"error rate {lv.breaker.rate():.2f} over the last {len(lv.breaker.outcomes)} requests")
        if background:
            threading.Thread(target=self.suspend, args=args, name="suspend", daemon=True).start()
        else:
            self.suspend(*args)

    def run_local(self, lv: LoadedVersion, feed: dict[str, np.ndarray], n_rows: int, ro=None) -> tuple[list, float]:
        """Run the model in this process (isolation = 'thread'); ``ro``: ONNX Runtime RunOptions whose
        ``terminate`` the deadline sets. Returns the outputs and the run's milliseconds.

        A failure counts towards the circuit breaker only when the session fails on a known-good
        input too: a request whose data makes the model fail (an index out of range...) gets a 422
        of kind ``model_input`` and cannot suspend the version for everyone."""
        values, ms, cpu_ms = self.run_only(lv, feed, ro)
        self.after_run(lv, feed, n_rows, ms, cpu_ms)
        return values, ms

    def run_only(self, lv: LoadedVersion, feed: dict[str, np.ndarray], ro=None) -> tuple[list, float, float]:
        """The run and nothing else on success (outputs, ms, CPU ms): a pool thread holds the
        interpreter lock as briefly as it can, and the event loop does the bookkeeping (after_run)."""
        name, version = lv.manifest.name, lv.manifest.version
        c0 = time.thread_time()
        t0 = time.perf_counter()
        try:
            values = self._run(lv, feed, ro)
        except Exception as exc:
            vt = self.telemetry.get(name, version)
            if ro is not None and ro.terminate:
                vt.record_error("deadline")
                lv.lane.stats.deadline_run += 1
                if self._too_slow(lv):
                    self._count_failure(lv)
                raise DeadlineMissed(lv.lane, "run", lv.deploy.timeout_ms) from None
            msg = str(exc).splitlines()[0][:400] if str(exc) else type(exc).__name__
            if not self._session_broken(lv):
                vt.record_error("model_input")
                raise AgentError(422, f"model {name} version {version} failed on this input: {msg}",
                                 "model_input") from None
            vt.record_error("runtime")
            self._count_failure(lv)
            raise AgentError(503, f"model {name} version {version} fails on every input now: {msg}",
                             "runtime") from None
        return values, (time.perf_counter() - t0) * 1000.0, (time.thread_time() - c0) * 1000.0

    def after_run(self, lv: LoadedVersion, feed: dict, n_rows: int, ms: float, cpu_ms: float) -> None:
        """A successful run's bookkeeping: the known-good row, telemetry, the breaker."""
        lv.since_canary += 1
        if lv.canary is None or (n_rows <= 8 and lv.since_canary >= CANARY_EVERY):
            lv.canary = {k: np.array(a[:1]) for k, a in feed.items()}
            lv.since_canary = 0
        self.record_ok(lv, ms, n_rows, feed, cpu_ms)

    def record_ok(self, lv: LoadedVersion, ms: float, n_rows: int, feed: dict | None, cpu_ms: float = 0.0,
                  background: bool = False) -> None:
        """A successful run: telemetry (an append; folded in off the request path), the lane's run
        time (Retry-After, inline runs) and the breaker's window (it can cross the threshold on a
        success too)."""
        self.telemetry.get(lv.manifest.name, lv.manifest.version).record_success(ms, n_rows, feed, cpu_ms)
        if lv.lane is not None:
            lv.lane.ran(ms)
        if lv.breaker.record(False):
            self._trip(lv, background)

    def note_deadline(self, lv: LoadedVersion) -> None:
        """A request answered 504 before its run started (the scheduler counted it in the lane)."""
        self.note_error(lv, "deadline")

    def note_error(self, lv: LoadedVersion, kind: str) -> None:
        self.telemetry.get(lv.manifest.name, lv.manifest.version).record_error(kind)

    def remote_outcome(self, lv: LoadedVersion, header: dict, arrays: dict, n_rows: int, feed: dict | None,
                       background: bool = False):
        """A worker's answer: (outputs, ms, json_outputs) or the AgentError it stands for.
        ``background``: called on the event loop (see _trip)."""
        name, version = lv.manifest.name, lv.manifest.version
        err = header.get("error")
        if err is None:
            ms = float(header.get("ms", 0.0))
            self.record_ok(lv, ms, n_rows, feed, float(header.get("cpu_ms", 0.0)), background)
            if "json" in header:
                return None, ms, header["json"]
            return [arrays[n] for n in lv.output_names], ms, None
        vt = self.telemetry.get(name, version)
        vt.record_error(err if err in ("model_input", "runtime", "deadline", "memory") else "worker")
        msg = header.get("message", "")
        if err == "deadline":
            lv.lane.stats.deadline_run += 1
            if header.get("counts"):
                self._count_failure(lv, background)
            return DeadlineMissed(lv.lane, "run", lv.deploy.timeout_ms)
        if err == "model_input":
            return AgentError(422, f"model {name} version {version} failed on this input: {msg}", "model_input")
        if err == "runtime":
            self._count_failure(lv, background)
            return AgentError(503, f"model {name} version {version} fails on every input now: {msg}", "runtime")
        if err == "memory" and not msg.startswith("model "):
            msg = (f"model {name} version {version} exceeded its memory budget of {lv.deploy.memory_mb} MB "
                   f"(memory_mb) on this request ({msg}); its worker process was stopped and restarts")
        return WorkerDown(msg or f"model {name} version {version}: its worker process failed", err)

    def result(self, lv: LoadedVersion, values, n_rows: int, ms: float, raw: bool, jsoned: dict | None = None) -> dict:
        """The answer's fields. ``raw``: outputs stay numpy arrays (for binary answers)."""
        if jsoned is not None:
            outputs = jsoned
        elif raw:
            outputs = dict(zip(lv.output_names, values))
        else:
            outputs = inp.outputs_to_json(lv.output_names, values)
        return {"model": lv.manifest.name, "version": lv.manifest.version, "rows": n_rows, "outputs": outputs,
                "providers": lv.providers, "latency_ms": round(ms, 4)}

    def predict(self, lv: LoadedVersion, feed: dict[str, np.ndarray], n_rows: int, raw: bool = False) -> dict:
        """Run the model, wherever it runs, from any thread but the event loop's, without the scheduler
        (the HTTP path in predict.py queues requests and sets deadlines)."""
        if lv.worker is None:
            values, ms = self.run_local(lv, feed, n_rows)
            return self.result(lv, values, n_rows, ms, raw)
        done = threading.Event()
        box: list = []

        def reply(header, arrays):
            box.append((header, arrays))
            done.set()

        lv.worker.submit({"op": "run", "rows": n_rows, "timeout_s": lv.deploy.timeout_ms / 1000.0}, feed, reply)
        if not done.wait(lv.deploy.timeout_ms / 1000.0 + 5.0):
            raise DeadlineMissed(lv.lane, "run", lv.deploy.timeout_ms)
        out = self.remote_outcome(lv, *box[0], n_rows, feed)
        if isinstance(out, Exception):
            raise out
        values, ms, jsoned = out
        return self.result(lv, values, n_rows, ms, raw, jsoned)

    def record_invalid(self, lv: LoadedVersion) -> None:
        self.telemetry.get(lv.manifest.name, lv.manifest.version).record_error("invalid_input")

    def metrics(self, columns: bool = True) -> dict:
        snap = self.telemetry.snapshot(columns)
        snap["agent"] = self.config.name
        snap["features"] = self.features.metrics() if self.features is not None else {}
        snap["triggers"] = self.triggers.metrics() if self.triggers is not None else {}
        snap["active"] = {n: m.get("active") for n, m in self.state["models"].items()}
        for entry in snap["models"]:
            m = self.state["models"].get(entry["model"], {})
            entry["active"] = m.get("active") == entry["version"]
            entry["suspended"] = entry["version"] in m.get("suspended", [])
            key = (entry["model"], entry["version"])
            entry.update(self._sharing_metrics(self.loaded.get(key), self.scheduler.lanes.get(key)))
        return snap

    @staticmethod
    def _sharing_metrics(lv: LoadedVersion | None, lane: Lane | None) -> dict:
        """How the version shares the device (docs/DEVICE.md, Sharing one device)."""
        out = {"priority": lv.deploy.priority if lv else None, "isolation": lv.deploy.isolation if lv else None,
               "queue_length": lane.queued if lane else 0, "running": lane.running if lane else 0}
        out.update(lane.stats.snapshot() if lane else {"wait_ms": None, "rejected": 0, "deadline_misses": 0,
                                                           "deadline_misses_queue": 0, "deadline_misses_run": 0})
        w = lv.worker if lv else None
        out["worker_restarts"] = w.restarts if w else 0
        out["worker"] = {k: v for k, v in w.info().items() if k != "rss_mb"} if w else None
        out["memory_mb"] = w.rss_mb() if w else None
        out["memory_budget_mb"] = lv.deploy.memory_mb if lv else None
        return out


_NO_SAMPLES = {"rows": 0, "bytes": 0, "dropped_rows": 0, "pending_upload_rows": 0, "outcomes": 0,
               "unknown_outcomes": 0, "queued_rows": 0}


def _valid_state(st) -> bool:
    if not isinstance(st, dict) or not isinstance(st.get("models"), dict):
        return False
    for m in st["models"].values():
        if not isinstance(m, dict) or not isinstance(m.get("versions"), list) \
                or not all(isinstance(v, int) for v in m["versions"]):
            return False
        if m.get("active") is not None and m["active"] not in m["versions"]:
            return False
        m.setdefault("suspended", [])
        m.setdefault("config", {})
        m.setdefault("sha256", {})
    return True


def _vocab(manifest: pkg.Manifest) -> dict[str, frozenset]:
    """String columns' training values from the signed manifest (``training_stats[col]["values"]``
    or ``["top"]``): the only values telemetry shows as written."""
    stats = manifest.extra.get("training_stats") or manifest.metrics.get("training_stats") or {}
    out = {}
    if isinstance(stats, dict):
        for col, st in stats.items():
            vals = st.get("values", st.get("top")) if isinstance(st, dict) else None
            if isinstance(vals, list):
                vals = [v.get("value") if isinstance(v, dict) else v for v in vals]
                out[str(col)] = frozenset(v for v in vals if isinstance(v, str))
    return out


def _training_moments(manifest: pkg.Manifest) -> dict[str, dict]:
    """The numeric training statistics of the signed manifest (mean, std, null rate per column, and
    for a string column the share of training rows outside its listed values, ``other_share``: the
    baseline of ``unseen_rate``), for drift views such as the notebook's monitor; string columns'
    training values stay out."""
    stats = manifest.extra.get("training_stats") or manifest.metrics.get("training_stats") or {}
    out = {}
    if isinstance(stats, dict):
        for col, st in stats.items():
            if isinstance(st, dict):
                keep = {k: st[k] for k in ("mean", "std", "null_rate", "other_share")
                        if isinstance(st.get(k), int | float) and not isinstance(st.get(k), bool)}
                if keep:
                    out[str(col)] = keep
    return out


def _ort_names(providers) -> list[str]:
    """A manifest's provider preference in ORT's names (as the hub's and the API's are stored)."""
    try:
        return [prov.to_ort_name(p) for p in providers]
    except prov.ProviderError:  # an unknown name: kept as written, plan_providers says what is wrong
        return list(providers)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None

"""Execution provider selection for ONNX Runtime.

A deploy names an ordered preference of short names (``nnapi``, ``cuda``,
``coreml``, ``cpu`` ...). :func:`plan_providers` intersects it with what the
local onnxruntime offers and returns the candidate lists to try, best first;
:func:`create_session` tries them in order and falls back down the list when a
provider fails to create the session. :func:`profile_node_providers` reports
how many graph nodes each provider really took (from ORT's profiling output).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

SHORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "acl": "ACLExecutionProvider",
    "armnn": "ArmNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
CPU = "CPUExecutionProvider"
_LONG_TO_SHORT = {v: k for k, v in SHORT_NAMES.items() if k not in ("trt", "directml")}


class ProviderError(ValueError):
    """The preference cannot be satisfied (strict mode) or names an unknown provider."""


def to_ort_name(name: str) -> str:
    """Map a short name (any case) or a full ORT name to the ORT provider name."""
    if not isinstance(name, str) or not name.strip():
        raise ProviderError(f"provider name {name!r} is not a non-empty string")
    key = name.strip().lower()
    if key in SHORT_NAMES:
        return SHORT_NAMES[key]
    if key.endswith("executionprovider"):
        for long in SHORT_NAMES.values():
            if long.lower() == key:
                return long
        return name.strip()
    known = ", ".join(sorted(k for k in SHORT_NAMES if k not in ("trt", "directml")))
    raise ProviderError(f"unknown provider {name!r} (known: {known}, or a full ORT name like 'CUDAExecutionProvider')")


def to_short_name(ort_name: str) -> str:
    return _LONG_TO_SHORT.get(ort_name, ort_name)


@dataclass
class ProviderPlan:
    preference: list[str]            # ORT names, in the order asked, deduplicated
    available: list[str]             # what this onnxruntime offers
    candidates: list[list[str]]      # provider lists to try, in order
    skipped: dict[str, str] = field(default_factory=dict)  # ORT name -> why not tried
    strict: bool = False


def plan_providers(preference: list[str] | tuple[str, ...] | None, available: list[str],
                   strict: bool = False) -> ProviderPlan:
    """Intersect an ordered preference with the available providers.

    Non-strict: every available preferred provider is tried in order, each
    attempt with the rest of the list after it, and CPU is always the last
    resort (appended when not named). Strict: every named provider must be
    available; one attempt with exactly that list, no fallback.
    """
    prefs: list[str] = []
    for p in preference or ["cpu"]:
        ort_name = to_ort_name(p)
        if ort_name not in prefs:
            prefs.append(ort_name)
    avail = list(available)
    skipped = {p: "not available in this onnxruntime build" for p in prefs if p not in avail}
    usable = [p for p in prefs if p in avail]
    if strict:
        if skipped:
            missing = ", ".join(to_short_name(p) for p in skipped)
            raise ProviderError(
                f"strict_providers: {missing} not available on this device "
                f"(available: {', '.join(to_short_name(a) for a in avail) or 'none'})")
        return ProviderPlan(prefs, avail, [usable], {}, True)
    if CPU not in usable and CPU in avail:
        usable.append(CPU)
    candidates = [usable[i:] for i in range(len(usable))]
    if not candidates:
        raise ProviderError("no usable execution provider (not even CPU)")
    return ProviderPlan(prefs, avail, candidates, skipped, False)


def _session_options(strict: bool, providers: list[str], threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads > 0:
        # a server runs requests side by side, one core each: an intra-op pool per request
        # would only have its threads spin against each other (measured in bench/bench_device.py)
        so.intra_op_num_threads = threads
        if threads == 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if strict and CPU not in providers:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def is_ort_format(path: str) -> bool:
    """The file is in ONNX Runtime's ORT format (a FlatBuffer whose identifier, at byte 4, is ORTM),
    which ORT reads only when told so, whatever the file's name (a package names it model.onnx)."""
    try:
        with open(path, "rb") as f:
            return f.read(8)[4:8] == b"ORTM"
    except OSError:
        return False


@dataclass
class SessionResult:
    session: Any
    requested: list[str]         # the list the session was created with
    providers: list[str]         # session.get_providers(): what really registered
    attempts: list[dict]         # [{"providers": [...], "error": str | None}]
    node_providers: dict[str, int] | None = None  # with profile=True: nodes per provider


def create_session(model_path: str, plan: ProviderPlan, session_factory=None, threads: int = 0,
                   profile: bool = False) -> SessionResult:
    """Create an InferenceSession, falling down the plan's candidates on failure.

    ``threads``: ONNX Runtime's intra-op threads for the session (0: its default, one per core).
    ``profile``: create the session with profiling on, run it once on a dummy row and stop the
    profiler (which then costs nothing), filling ``node_providers``: the placement comes with the
    serving session instead of a second, throwaway one."""
    if session_factory is None:
        import onnxruntime as ort

        def session_factory(path, so, providers):
            if is_ort_format(path):  # optimized offline (EXPORT ... format = 'ort'): loaded as it is
                so.add_session_config_entry("session.load_model_format", "ORT")
            return ort.InferenceSession(path, sess_options=so, providers=providers)

    attempts = []
    last_error = None
    with tempfile.TemporaryDirectory(prefix="mlsql-prof-") if profile else contextlib.nullcontext() as tmp:
        for cand in plan.candidates:
            so = _session_options(plan.strict, cand, threads)
            if tmp:
                so.enable_profiling = True
                so.profile_file_prefix = os.path.join(tmp, f"prof{len(attempts)}")
            try:
                sess = session_factory(model_path, so, cand)
            except Exception as exc:  # ORT raises many kinds: Fail, RuntimeException, EPFail...
                last_error = f"{type(exc).__name__}: {exc}"
                attempts.append({"providers": cand, "error": last_error[:500]})
                continue
            attempts.append({"providers": cand, "error": None})
            res = SessionResult(sess, cand, list(sess.get_providers()), attempts)
            if tmp:
                res.node_providers = _end_profile(sess, None, tmp)
            return res
    names = " -> ".join(",".join(to_short_name(p) for p in c) for c in plan.candidates)
    raise ProviderError(f"could not create a session with any provider list ({names}): {last_error}")


def _end_profile(sess, feed: dict | None, tmp: str) -> dict[str, int] | None:
    """One run (node placement is in the init events even when it fails), then the counts."""
    try:
        try:
            sess.run(None, feed if feed is not None else dummy_feed(sess))
        except Exception:
            pass
        path = sess.end_profiling()
    except Exception:
        return None
    files = [path] if path and os.path.exists(path) else glob.glob(os.path.join(tmp, "prof*.json"))
    if not files:
        return None
    try:
        with open(files[0]) as f:
            return count_node_providers(json.load(f))
    except (OSError, ValueError):
        return None


def dummy_feed(session) -> dict[str, Any]:
    """One row of zeros / empty strings for every input (for profiling)."""
    import numpy as np

    feed = {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (inp.shape or [])]
        t = inp.type  # e.g. 'tensor(float)'
        if "string" in t:
            feed[inp.name] = np.full(shape, "", dtype=object)
        else:
            feed[inp.name] = np.zeros(shape, dtype=_ORT_TYPES.get(t, np.float32))
    return feed


def _ort_types():
    import numpy as np

    return {
        "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
        "tensor(int8)": np.int8, "tensor(int16)": np.int16, "tensor(int32)": np.int32,
        "tensor(int64)": np.int64, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
        "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
    }


class _Lazy(dict):
    def get(self, k, d=None):
        if not self:
            self.update(_ort_types())
        return super().get(k, d)


_ORT_TYPES = _Lazy()


def profile_node_providers(model_path: str, providers: list[str], strict: bool = False,
                           feed: dict | None = None) -> dict[str, int] | None:
    """Count graph nodes per provider: a throwaway session with profiling on, one run.

    Returns ``{"CPUExecutionProvider": 12, ...}`` or None when the model could not
    be run on a dummy input.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mlsql-prof-") as tmp:
        so = _session_options(strict, providers)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "prof")
        try:
            sess = ort.InferenceSession(model_path, sess_options=so, providers=providers)
        except Exception:
            return None
        return _end_profile(sess, feed, tmp)


def count_node_providers(events: list[dict]) -> dict[str, int]:
    """From ORT profile events: distinct node names per provider."""
    nodes: dict[str, set] = {}
    for ev in events if isinstance(events, list) else []:
        if not isinstance(ev, dict) or ev.get("cat") != "Node":
            continue
        args = ev.get("args") or {}
        prov = args.get("provider")
        if not prov:
            continue
        name = str(ev.get("name", ""))
        for suffix in ("_kernel_time", "_fence_before", "_fence_after"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        nodes.setdefault(prov, set()).add(name)
    return {p: len(n) for p, n in sorted(nodes.items())}

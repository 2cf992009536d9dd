"""Test helpers: ONNX models built with onnx.helper, signed packages, real agent/hub processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from device_bridge.keys import load_or_create_keypair, public_key_to_pem
from device_bridge.package import build_package

TOKEN = "test-token-123"


def scorer_model(mult: float = 2.0, fragile: bool = False) -> bytes:
    """y = x * mult + (1 if city == 'paris' else 0); inputs x float [N,1], city string [N,1].

    fragile=True: y also adds table[int(x)] for table of length 3, so x >= 3 makes ORT fail (Gather
    out of bounds): a runtime error driven by input values, for the circuit breaker test.
    """
    nodes = [
        helper.make_node("LabelEncoder", ["city"], ["city_code"], domain="ai.onnx.ml",
                         keys_strings=["paris"], values_floats=[1.0], default_float=0.0),
        helper.make_node("Mul", ["x", "mult"], ["xm"]),
    ]
    inits = [helper.make_tensor("mult", TensorProto.FLOAT, [], [mult])]
    if fragile:
        nodes += [
            helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["xi", "flat"], ["xf"]),
            helper.make_node("Gather", ["table", "xf"], ["g"], axis=0),
            helper.make_node("Reshape", ["g", "col"], ["gc"]),
            helper.make_node("Add", ["xm", "gc"], ["xm2"]),
            helper.make_node("Add", ["xm2", "city_code"], ["y"]),
        ]
        inits += [helper.make_tensor("table", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0]),
                  helper.make_tensor("flat", TensorProto.INT64, [1], [-1]),
                  helper.make_tensor("col", TensorProto.INT64, [2], [-1, 1])]
    else:
        nodes.append(helper.make_node("Add", ["xm", "city_code"], ["y"]))
    graph = helper.make_graph(
        nodes, "scorer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1]),
         helper.make_tensor_value_info("city", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_keys(folder: Path):
    kp = load_or_create_keypair(folder)
    return kp


def package(kp, version: int, mult: float = 2.0, fragile: bool = False, name: str = "scorer",
            training_stats: dict | None = None, **extra) -> bytes:
    fields = {"name": name, "version": version, "providers": ["cpu"],
              "training_stats": training_stats or {"x": {"mean": 0.0, "std": 1.0},
                                                   "city": {"values": ["paris", "rome"]}}}
    fields.update(extra)
    return build_package(scorer_model(mult, fragile), fields, kp.private_key)


def trust(store: Path, kp) -> None:
    (store / "trusted_keys").mkdir(parents=True, exist_ok=True)
    (store / "trusted_keys" / f"{kp.key_id}.pub").write_bytes(public_key_to_pem(kp.public_key))


class Proc:
    def __init__(self, args: list[str], ready: Path, env: dict | None = None, log: Path | None = None):
        self.ready = ready
        self.args = args
        if ready.exists():
            ready.unlink()
        self.log = log or ready.with_suffix(".log")
        e = dict(os.environ)
        e.update(env or {})
        self.p = subprocess.Popen([sys.executable, "-m", "device_bridge", *args, "--ready-file", str(ready)],
                                  stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=e)
        deadline = time.time() + 60
        while not ready.exists():
            if self.p.poll() is not None:
                raise RuntimeError(f"process exited: {self.log.read_text()[-2000:]}")
            if time.time() > deadline:
                self.kill()
                raise RuntimeError(f"process not ready: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())

    @property
    def url(self) -> str:
        return self.info["devices"][0]["url"] if "devices" in self.info else self.info["url"]

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            self.p.wait(10)
        if self.args and self.args[0] == "serve":
            # an agent killed leaves its workers' memory cgroups (memlimit.py): removed once they are gone
            from device_bridge.agent.memlimit import sweep_dead

            sweep_dead(wait_s=5.0)


def start_agent(tmp: Path, name: str = "dev", store: Path | None = None, extra: list[str] | None = None,
                env: dict | None = None) -> Proc:
    store = store or tmp / f"store-{name}"
    return Proc(["serve", "--name", name, "--port", "0", "--store", str(store), "--token", TOKEN,
                 *(extra or [])], tmp / f"ready-{name}.json", env)


def start_hub(tmp: Path, extra: list[str] | None = None, name: str = "hub") -> Proc:
    """A hub whose operator token is TOKEN (agents get their own credentials: ``enroll``)."""
    return Proc(["hub", "--port", "0", "--store", str(tmp / name), "--token", TOKEN, *(extra or [])],
                tmp / f"ready-{name}.json")


def stored(store: Path, db_url: str | None, sql: str) -> list:
    """The rows of ``sql`` read straight from a hub's database (``STORE/hub.db``, or the PostgreSQL of
    ``db_url``), without the hub's code."""
    if db_url is None:
        con = sqlite3.connect(store / "hub.db", timeout=30)
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()
    import psycopg

    with psycopg.connect(db_url, autocommit=True) as con:
        return con.execute(sql).fetchall()


def enroll(hub_url: str, name: str, store: Path) -> str:
    """Enroll agent ``name`` through the operator API and leave its credential where the agent reads
    it (``STORE/hub_token``; for a device of ``--devices K``, STORE is ``DIR/NAME-i``)."""
    from device_bridge.agent.hubsync import write_token_file
    from device_bridge.client import HubClient

    token = HubClient(hub_url, TOKEN).enroll(name)
    store.mkdir(parents=True, exist_ok=True)
    write_token_file(store / "hub_token", token)
    return token


def wait_for(fn, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - polling
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")




def memory_model() -> bytes:
    """y = sum(ones(n)) for n int64 [N, 1] (first row): a model whose memory is whatever the request
    asks for (n float32s), to test memory budgets with a real allocation by ONNX Runtime."""
    nodes = [helper.make_node("Slice", ["n", "zero", "one", "zero"], ["n0"]),
             helper.make_node("Reshape", ["n0", "flat"], ["n1"]),
             helper.make_node("ConstantOfShape", ["n1"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1),
             helper.make_node("Reshape", ["s", "col"], ["y"])]
    graph = helper.make_graph(
        nodes, "memory", [helper.make_tensor_value_info("n", TensorProto.INT64, [None, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1])],
        [helper.make_tensor("zero", TensorProto.INT64, [1], [0]), helper.make_tensor("one", TensorProto.INT64, [1], [1]),
         helper.make_tensor("flat", TensorProto.INT64, [1], [1]), helper.make_tensor("col", TensorProto.INT64, [2], [1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()

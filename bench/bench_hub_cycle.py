"""One hub process serving the timed-poll cycle: this revision against an earlier one, in the same run.

    python bench/bench_hub_cycle.py [--agents 1000] [--clients 2] [--seconds 5] [--rounds 2]
                                    [--baseline REV] [--db sqlite|postgresql|both]

A cycle is what bench_fleet.py's simulated agent does in its timed poll, and what an agent on the
timed poll does each interval: ``GET /v1/agents/NAME/desired`` (with ``If-None-Match`` of the state
it has, after the first) and ``POST /v1/agents/NAME/report``, each agent with its own credential, on
a keep-alive connection. ``--agents`` agents in ``--clients`` processes run it back to back for
``--seconds``; the figures are the cycles the hub completed per second and the hub process's CPU
seconds per 1,000 cycles (user + system, from psutil), and from the latter the cycles one hub
process completes per second of its own CPU (1,000 / that): what it serves with a core to itself.

"before" is the hub of ``--baseline`` (default: the merge base of HEAD and main), extracted with
``git archive`` into a temporary folder and started from there; "after" is this checkout's. Rounds
alternate before/after so that both meet the same load; the load average is saved with each.
Results: bench/results/hub_cycle.json (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
TOKEN = "bench-operator-token"


async def client_main(spec: dict) -> dict:
    from bench_fleet import Conn, req

    agents = spec["agents"]
    host, port = "127.0.0.1", spec["port"]
    hub = f"{host}:{port}"
    counts = {"cycles": 0.0, "errors": 0, "not_modified": 0}
    report = json.dumps(
        {
            "url": "http://sim.invalid",
            "status": {"scorer": {"active": 1, "versions": [1]}},
            "errors": {},
            "telemetry": [],
        }
    ).encode()
    sem = asyncio.Semaphore(200)
    conns = {}

    async def register(a):
        name, token = a
        async with sem:
            conns[name] = Conn(host, port)
            code, _, _ = await conns[name].call(
                req(
                    "POST",
                    hub,
                    f"/v1/agents/{name}/register",
                    token,
                    json.dumps({"url": "http://sim.invalid", "group": "fleet"}).encode(),
                )
            )
        if code != 200:
            counts["errors"] += 1

    await asyncio.gather(*(register(a) for a in agents))
    print(json.dumps({"registered": len(agents)}), flush=True)
    loop = asyncio.get_running_loop()
    sched = json.loads(await loop.run_in_executor(None, sys.stdin.readline))

    async def agent(a, i):
        name, token = a
        c = conns[name]
        get = req("GET", hub, f"/v1/agents/{name}/desired", token)
        rep = req("POST", hub, f"/v1/agents/{name}/report", token, report)
        await asyncio.sleep((i % 100) / 100 * 0.3)
        while time.time() < sched["until"]:
            for raw in (get, rep):
                code, headers, _ = await c.call(raw)
                if code == 200 and raw is get:  # the state it has: asked with its ETag from now on
                    get = req(
                        "GET",
                        hub,
                        f"/v1/agents/{name}/desired",
                        token,
                        extra=f"If-None-Match: {headers.get('etag', '')}\r\n",
                    )
                if code == 304:
                    counts["not_modified"] += 1
                elif code != 200:
                    counts["errors"] += 1
                    continue
                if sched["from"] <= time.time() < sched["until"]:
                    counts["cycles"] += 0.5
        c.close()

    await asyncio.gather(*(agent(a, i) for i, a in enumerate(agents)))
    return counts


def imported_from(src: Path) -> str:
    """Where a hub started from ``src`` imports device_bridge from (checked, not assumed)."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [sys.executable, "-c", "import device_bridge; print(device_bridge.__file__)"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def start_hub(src: Path, store: Path, db_url: str | None, log: Path):
    ready = store.parent / f"{store.name}.ready"
    ready.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src)}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_bridge",
            "hub",
            "--port",
            "0",
            "--store",
            str(store),
            "--token",
            TOKEN,
            *(["--db", db_url] if db_url else []),
            "--ready-file",
            str(ready),
        ],
        cwd=src,
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 60
    while not ready.exists():
        if p.poll() is not None or time.time() > deadline:
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.05)
    time.sleep(0.05)
    return p, json.loads(ready.read_text())["port"]


def one(
    work: Path, label: str, src: Path, n: int, clients: int, seconds: float, kp, db_url: str | None
) -> dict:
    import urllib.request

    import psutil
    from bench_fleet import make_package

    from device_bridge.hub.credentials import _digest
    from device_bridge.hub.db import Database

    store = work / f"store-{label}-{secrets.token_hex(3)}"
    db = Database(store, db_url)
    names = [f"sim{i:06d}" for i in range(n)]
    tokens = ["mlsqlhub_" + secrets.token_urlsafe(32) for _ in names]
    with db.tx(lock=True) as t:  # what `hub enroll` does once per agent
        for name, tok in zip(names, tokens):
            t.run(
                "INSERT INTO credentials (name, sha256, enrolled_at, revoked_at) VALUES (?, ?, ?, NULL)",
                (name, _digest(tok.encode()), time.time()),
            )
    db.close()
    hub, port = start_hub(src, store, db_url, work / f"hub-{label}.log")
    cps = []
    try:
        url = f"http://127.0.0.1:{port}"

        def operator(method, path, body, ctype="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = urllib.request.Request(
                url + path,
                data=data,
                method=method,
                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype},
            )
            with urllib.request.urlopen(r, timeout=120) as resp:
                return json.loads(resp.read())

        sha = operator("POST", "/v1/blobs", make_package(kp, 1, 0), "application/octet-stream")["sha256"]
        operator("POST", "/v1/groups/fleet", {"devices": names})
        operator("POST", "/v1/desired", {"model": "scorer", "sha256": sha, "group": "fleet"})
        for c in range(clients):
            spec = work / f"client-{label}-{c}.json"
            spec.write_text(
                json.dumps(
                    {"agents": [[a, t] for a, t in zip(names[c::clients], tokens[c::clients])], "port": port}
                )
            )
            cps.append(
                subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--client", str(spec)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for cp in cps:
            if not cp.stdout.readline():
                raise RuntimeError("a client process died while registering")
        now = time.time()
        sched = {"from": now + 1.0, "until": now + 1.0 + seconds}
        for cp in cps:
            cp.stdin.write(json.dumps(sched) + "\n")
            cp.stdin.flush()
        hp = psutil.Process(hub.pid)
        time.sleep(max(0.0, sched["from"] - time.time()))
        c0, la = sum(hp.cpu_times()[:2]), os.getloadavg()
        time.sleep(max(0.0, sched["until"] - time.time()))
        c1 = sum(hp.cpu_times()[:2])
        results = []
        for cp in cps:
            out, _ = cp.communicate(timeout=120)
            results.append(json.loads(out.strip().splitlines()[-1]))
        cycles = sum(r["cycles"] for r in results)
        cpu = c1 - c0
        return {
            "hub": label,
            "db": "postgresql" if db_url else "sqlite",
            "agents": n,
            "seconds": seconds,
            "cycles": round(cycles),
            "cycles_per_s": round(cycles / seconds),
            "hub_cpu_s": round(cpu, 2),
            "hub_cpu_percent": round(cpu / seconds * 100, 1),
            "hub_cpu_s_per_1000_cycles": round(cpu / max(cycles, 1) * 1000, 4),
            "cycles_per_hub_cpu_s": round(cycles / cpu) if cpu else None,
            "not_modified": sum(r["not_modified"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "loadavg_at_start": [round(x, 2) for x in la],
        }
    finally:
        for cp in cps:
            if cp.poll() is None:
                cp.kill()
        hub.kill()
        hub.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", help="git revision of the 'before' hub (default: merge-base HEAD main)")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="sqlite")
    ap.add_argument("--client")
    ap.add_argument("--out", default=str(HERE / "results" / "hub_cycle.json"))
    args = ap.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client_main(json.loads(Path(args.client).read_text())))), flush=True)
        return 0
    from device_bridge.keys import load_or_create_keypair

    rev = (
        args.baseline
        or subprocess.run(
            ["git", "merge-base", "HEAD", "main"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    rev = subprocess.run(
        ["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "device_bridge"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )
    work = Path(tempfile.mkdtemp(prefix="bench-hub-cycle-"))
    before = work / "before"
    before.mkdir()
    archive = subprocess.run(
        ["git", "archive", rev, "device_bridge"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
    kp = load_or_create_keypair(work / "keys")
    sources = {"before": imported_from(before), "after": imported_from(ROOT)}
    assert sources["before"].startswith(str(before)) and sources["after"].startswith(str(ROOT)), sources
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    load0, t0 = os.getloadavg(), time.time()
    runs, srv, pg_dir = [], None, None
    try:
        for kind in dbs:
            for r in range(args.rounds):
                for label, src in (
                    (("before", before), ("after", ROOT))
                    if r % 2 == 0
                    else (("after", ROOT), ("before", before))
                ):
                    db_url = None
                    if kind == "postgresql":
                        import psycopg

                        if srv is None:
                            import pgserver

                            pg_dir = Path(tempfile.mkdtemp(prefix="bench-hub-cycle-pg-"))
                            srv = pgserver.get_server(pg_dir, cleanup_mode="stop")
                        name = f"cycle_{label}_{r}"
                        with psycopg.connect(srv.get_uri(), autocommit=True) as con:
                            con.execute(f"DROP DATABASE IF EXISTS {name}")
                            con.execute(f"CREATE DATABASE {name}")
                        db_url = srv.get_uri().replace("/postgres?", f"/{name}?")
                    res = one(work, label, src, args.agents, args.clients, args.seconds, kp, db_url)
                    res["round"] = r
                    runs.append(res)
                    print(json.dumps(res), flush=True)
    finally:
        if srv is not None:
            srv.cleanup()
            shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for kind in dbs:
        for label in ("before", "after"):
            rs = [x for x in runs if x["db"] == kind and x["hub"] == label]
            summary[f"{kind}_{label}"] = {
                "cycles_per_s": round(sum(x["cycles_per_s"] for x in rs) / len(rs)),
                "hub_cpu_s_per_1000_cycles": round(
                    sum(x["hub_cpu_s_per_1000_cycles"] for x in rs) / len(rs), 4
                ),
                "cycles_per_hub_cpu_s": round(sum(x["cycles_per_hub_cpu_s"] or 0 for x in rs) / len(rs)),
            }
        b, a = summary[f"{kind}_before"], summary[f"{kind}_after"]
        summary[f"{kind}_after_over_before"] = {
            "cycles_per_s": round(a["cycles_per_s"] / max(b["cycles_per_s"], 1), 2),
            "hub_cpu_per_cycle": round(a["hub_cpu_s_per_1000_cycles"] / b["hub_cpu_s_per_1000_cycles"], 3),
        }
    out = {
        "bench": "hub_cycle",
        "device_bridge_imported_from": sources,
        "machine_cores": os.cpu_count(),
        "baseline": rev,
        "head": head,
        "working_tree_changed": dirty,
        "agents": args.agents,
        "clients": args.clients,
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.time() - t0, 1),
        "note": "the hub, the client processes and other engineers' work share this machine's cores: "
        "cycles/s is what the hub completed with its share; cycles per hub CPU-second is what one "
        "hub process serves per second of a core of its own",
        "summary": summary,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A simulated fleet against real hub processes: poll cycles per second per hub process (timed poll and
long-poll), what held long-polls cost, and the time from a desired-state change to every simulated
device reporting the new version, for 1 and 2 hub processes on SQLite and on PostgreSQL (pgserver).

    python bench/bench_fleet.py [--agents 10000] [--clients 3] [--quick]

The simulated agents speak the real protocol, each with its own enrolled credential (written to the
hub's database in one transaction before the hubs start, as ``hub enroll`` would one by one): register,
then ``GET /v1/agents/NAME/desired`` and ``POST .../report``. They are lean asyncio clients
(pre-encoded HTTP/1.1 on keep-alive connections, like bench/loadgen.py) in ``--clients`` processes;
agent i talks to hub i mod H (what a balancer in front of H replicas does). Phases, per setup:

1. timed poll: every agent does desired GET + report back to back for ``--poll-warm-s`` and then
   ``--poll-s``, counted: the cycles the
   hub processes complete per second at saturation (a cycle = one GET, with ``If-None-Match`` of the
   state it has after the first, as the agent sends it, + one report);
2. long-poll idle: every agent holds ``GET desired?wait=30`` with its ETag; requests per second and
   the hub's CPU while the whole fleet is connected and nothing changes, and its RSS;
3. deploy: the operator's ``POST /v1/desired`` for the group (what DEPLOY calls) moves every agent to
   a 5 MB package served by a static origin (aiohttp's file server, with Range): each agent is woken
   by its long-poll, fetches the first 64 KiB of the package from the origin (1 % of the agents fetch
   all 5 MB and check its sha256: 10,000 full downloads would be 50 GB of loopback copying, which
   measures this machine's memory bandwidth, not the hub), and reports the new version. Figures: from
   the POST to the last report answered, and the wake itself: from the POST to the last held
   long-poll answered with the new state, and the answers per second during it, per hub process.

Everything runs on this machine's 2 cores, the hubs, the clients and the origin together, while other
engineers' tests run: the load average is saved with the figures (bench/results/fleet.json).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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
sys.path.insert(0, str(HERE.parent))
TOKEN = "bench-operator-token"
RANGE = 64 * 1024


# -- one simulated agent's connection ----------------------------------------------------------

class Conn:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.r = self.w = None

    async def call(self, raw: bytes) -> tuple[int, dict, bytes]:
        for attempt in range(3):  # the hub closes idle keep-alive connections: open again
            try:
                if self.w is None:
                    self.r, self.w = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
                self.w.write(raw)
                head = await self.r.readuntil(b"\r\n\r\n")
                code = int(head[9:12])
                headers = {}
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k:
                        headers[k.strip().lower().decode()] = v.strip().decode()
                body = await self.r.readexactly(int(headers.get("content-length", 0)))
                return code, headers, body
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                self.close()
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def close(self):
        if self.w is not None:
            self.w.close()
        self.r = self.w = None


def req(method: str, host: str, path: str, token: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n{extra}"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def client_main(spec: dict) -> dict:
    agents = spec["agents"]  # [[name, token, "host:port"], ...]
    origin_host, origin_port = spec["origin"]
    counts = {"poll_cycles": 0, "idle_requests": 0, "errors": 0}
    done_at: list[float] = []
    woken: dict[str, list[float]] = {}  # hub -> when each of its agents had the new state
    hashed = []
    sem = asyncio.Semaphore(200)  # connects at once: the hubs' listen backlogs

    def report_body(version: int) -> bytes:
        return json.dumps({"url": "http://sim.invalid", "status": {"scorer": {"active": version,
                                                                              "versions": [version]}},
                           "errors": {}, "telemetry": []}).encode()

    conns = {}

    async def register(a):
        name, token, hub = a
        host, port = hub.split(":")
        async with sem:
            conns[name] = Conn(host, int(port))
            code, _, body = await conns[name].call(
                req("POST", hub, f"/v1/agents/{name}/register", token, json.dumps({"url": "http://sim.invalid",
                                                                                   "group": "fleet"}).encode()))
        if code != 200:
            counts["errors"] += 1

    await asyncio.gather(*(register(a) for a in agents))
    print(json.dumps({"registered": len(agents), "errors": counts["errors"]}), flush=True)
    loop = asyncio.get_running_loop()
    sched = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    holding = {"n": 0, "idle": False}

    async def idle_window():  # from every agent holding its long-poll to the controller's next line
        holding["idle"] = True
        print(json.dumps({"holding": len(agents)}), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        holding["idle"] = False

    async def agent(a, i):
        name, token, hub = a
        c = conns[name]
        get = req("GET", hub, f"/v1/agents/{name}/desired", token)
        rep1 = req("POST", hub, f"/v1/agents/{name}/report", token, report_body(1))
        await asyncio.sleep((i % 1000) / 1000 * 0.5)
        ask = get
        while time.time() < sched["poll_until"]:  # 1. timed poll, back to back
            for raw in (ask, rep1):  # each answer counted when it lands in the window: half a cycle
                code, headers, _ = await c.call(raw)
                if code == 200 and raw is ask:  # the agent asks with the ETag of the state it has
                    ask = req("GET", hub, f"/v1/agents/{name}/desired", token,
                              extra=f"If-None-Match: {headers.get('etag', '')}\r\n")
                if code not in (200, 304):
                    counts["errors"] += 1
                elif sched["poll_from"] <= time.time() < sched["poll_until"]:
                    counts["poll_cycles"] += 0.5
        code, headers, body = await c.call(get)  # 2. long-poll from the state it has
        etag = headers.get("etag", "")
        first = True
        while True:
            if time.time() > sched["deadline"]:
                return
            call = asyncio.ensure_future(c.call(req("GET", hub, f"/v1/agents/{name}/desired?wait=30", token,
                                                    extra=f"If-None-Match: {etag}\r\n")))
            if first:
                first = False
                await asyncio.sleep(0.2)  # sent and held (an unchanged state is answered in microseconds)
                holding["n"] += 1
                if holding["n"] == len(agents):
                    asyncio.ensure_future(idle_window())
            code, headers, body = await call
            if holding["idle"]:
                counts["idle_requests"] += 1
            if code == 304:
                continue
            if code != 200:
                counts["errors"] += 1
                await asyncio.sleep(1)
                continue
            etag = headers.get("etag", "")
            entry = json.loads(body)["models"].get("scorer") or {}
            if entry.get("version") != 2:
                continue
            woken.setdefault(hub, []).append(time.time())
            break
        full = i % 100 == 0  # 3. the package from the origin: 1 % whole (hash checked), the rest its head
        oc = Conn(origin_host, origin_port)
        path = "/" + entry["urls"][0].split("/", 3)[3]
        async with sem:
            code, _, data = await oc.call(req("GET", f"{origin_host}:{origin_port}", path, "x",
                                              extra="" if full else f"Range: bytes=0-{RANGE - 1}\r\n"))
        oc.close()
        if full:
            hashed.append(hashlib.sha256(data).hexdigest() == entry["sha256"])
        elif code != 206 or len(data) != RANGE:
            counts["errors"] += 1
        code, _, _ = await c.call(req("POST", hub, f"/v1/agents/{name}/report", token, report_body(2)))
        if code == 200:
            done_at.append(time.time())
        else:
            counts["errors"] += 1

    await asyncio.gather(*(agent(a, i) for i, a in enumerate(agents)))
    for c in conns.values():
        c.close()
    return {**counts, "done": len(done_at), "last_done": max(done_at) if done_at else None,
            "full_downloads": len(hashed), "full_hash_ok": sum(hashed),
            "woken": {h: [len(ts), min(ts), max(ts)] for h, ts in woken.items()}}


def run_origin(folder: str, ready: str) -> None:
    from aiohttp import web

    app = web.Application()
    app.router.add_static("/", folder)

    async def main():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        Path(ready).write_text(str(port))
        await asyncio.Event().wait()

    asyncio.run(main())


# -- the controller ------------------------------------------------------------------------------

def start(args: list[str], ready: Path, log: Path) -> tuple[subprocess.Popen, dict]:
    p = subprocess.Popen([sys.executable, *args, "--ready-file", str(ready)], stdout=open(log, "w"),
                         stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while not ready.exists():
        if p.poll() is not None or time.time() > deadline:
            raise RuntimeError(log.read_text()[-2000:])
        time.sleep(0.05)
    time.sleep(0.05)
    return p, json.loads(ready.read_text())


def operator(url: str, method: str, path: str, body: dict | None = None, timeout: float = 120):
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    r = urllib.request.Request(url + path, data=data, method=method,
                               headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=timeout) as resp:
        return json.loads(resp.read())


def make_package(kp, version: int, size: int) -> bytes:
    from device_bridge.package import build_package

    col = [{"name": "x", "type": "float32", "shape": [None, 1]}]
    return build_package(b"not-an-onnx-graph: the hub and this bench never load it",
                         {"name": "scorer", "version": version, "inputs": col, "outputs": col},
                         kp.private_key, extra_files={"weights.bin": os.urandom(size)} if size else None)


def one_setup(work: Path, kind: str, hubs_n: int, n: int, clients: int, db_url: str | None, kp,
              poll_s: float, idle_s: float, warm_s: float = 5.0) -> dict:
    import psutil

    from device_bridge.hub.credentials import _digest
    from device_bridge.hub.db import Database

    store = work / f"{kind}-{hubs_n}"
    shutil.rmtree(store, ignore_errors=True)
    db = Database(store, db_url)
    names = [f"sim{i:06d}" for i in range(n)]
    tokens = ["mlsqlhub_" + secrets.token_urlsafe(32) for _ in names]
    with db.tx(lock=True) as t:  # what `hub enroll` does once per agent, in one transaction
        for name, tok in zip(names, tokens):
            t.run("INSERT INTO credentials (name, sha256, enrolled_at, revoked_at) VALUES (?, ?, ?, NULL)",
                  (name, _digest(tok.encode()), time.time()))
    db.close()
    blobs_out = work / "origin"
    blobs_out.mkdir(exist_ok=True)
    (work / "origin.ready").unlink(missing_ok=True)
    origin, oport = start([str(Path(__file__).resolve()), "--origin-server", str(blobs_out)],
                          work / "origin.ready", work / "origin.log")
    procs = [origin]
    try:
        hubs = []
        for h in range(hubs_n):
            (work / f"hub{h}.ready").unlink(missing_ok=True)
            p, info = start(["-m", "device_bridge", "hub", "--port", "0", "--store", str(store), "--token", TOKEN,
                             *(["--db", db_url] if db_url else []), "--origin", f"http://127.0.0.1:{oport}",
                             "--hub-blobs", "last", "--max-held", str(n + 100), "--request-timeout", "60"],
                            work / f"hub{h}.ready", work / f"hub{h}-{kind}.log")
            procs.append(p)
            hubs.append((p, info["port"]))
        url0 = f"http://127.0.0.1:{hubs[0][1]}"
        rss0 = [psutil.Process(p.pid).memory_info().rss for p, _ in hubs]  # started, no agent yet
        import urllib.request

        def upload(data: bytes) -> str:
            r = urllib.request.Request(url0 + "/v1/blobs", data=data, method="POST",
                                       headers={"Authorization": f"Bearer {TOKEN}",
                                                "Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(r, timeout=120) as resp:
                sha = json.loads(resp.read())["sha256"]
            (blobs_out / sha).write_bytes(data)  # what `hub publish DIR` writes for a static origin
            return sha

        v1 = upload(make_package(kp, 1, 0))
        pkg2 = make_package(kp, 2, 5 * 1024 * 1024)
        v2 = upload(pkg2)
        operator(url0, "POST", "/v1/groups/fleet", {"devices": names})
        operator(url0, "POST", "/v1/desired", {"model": "scorer", "sha256": v1, "group": "fleet"})
        per = [[] for _ in range(clients)]
        for i, (name, tok) in enumerate(zip(names, tokens)):
            per[i % clients].append([name, tok, f"127.0.0.1:{hubs[i % hubs_n][1]}"])
        cps = []
        for c in range(clients):
            spec = work / f"client{c}.json"
            spec.write_text(json.dumps({"agents": per[c], "origin": ["127.0.0.1", oport]}))
            cps.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--client", str(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        t_reg = time.time()
        for cp in cps:
            line = cp.stdout.readline()
            if not line:
                raise RuntimeError("a client process died while registering")
        reg_s = time.time() - t_reg
        hp = [psutil.Process(p.pid) for p, _ in hubs]
        now = time.time()
        # the agents poll from now + 1.5 s; cycles and hub CPU are counted after warm_s more, once every
        # agent's first GET has had its answer built (the hub keeps it: hub/cache.py), as in a fleet
        # that polls on
        sched = {"poll_from": now + 1.5 + warm_s, "poll_until": now + 1.5 + warm_s + poll_s}
        sched["deadline"] = sched["poll_until"] + 150
        for cp in cps:
            cp.stdin.write(json.dumps(sched) + "\n")
            cp.stdin.flush()

        def cpu() -> list[float]:
            return [sum(p.cpu_times()[:2]) for p in hp]

        time.sleep(max(0.0, sched["poll_from"] - time.time()))
        c0 = cpu()
        time.sleep(max(0.0, sched["poll_until"] - time.time()))
        c1 = cpu()
        t_held = time.time()
        for cp in cps:  # each client: every one of its agents holds its long-poll
            if not cp.stdout.readline():
                raise RuntimeError("a client process died before holding its long-polls")
        to_held_s = time.time() - t_held
        quiet_by = time.time() + 40  # the last requests sent reach the hub and are held: its CPU settles
        while time.time() < quiet_by:
            a = cpu()
            time.sleep(1)
            if max(y - x for x, y in zip(a, cpu())) < 0.1:
                break
        c2 = cpu()
        time.sleep(idle_s)
        c3 = cpu()
        for cp in cps:
            cp.stdin.write("deploy\n")
            cp.stdin.flush()
        rss = [p.memory_info().rss for p in hp]
        conns_held = [len([c for c in p.net_connections("tcp") if c.status == "ESTABLISHED"]) for p in hp]
        t_deploy = time.time()
        operator(url0, "POST", "/v1/desired", {"model": "scorer", "sha256": v2, "group": "fleet"})
        set_s = time.time() - t_deploy
        results = []
        for cp in cps:
            out, _ = cp.communicate(timeout=200)
            results.append(json.loads(out.strip().splitlines()[-1]))
        c4 = cpu()
        done = sum(r["done"] for r in results)
        last = max((r["last_done"] for r in results if r["last_done"]), default=None)
        poll_cycles = round(sum(r["poll_cycles"] for r in results))
        wake = {}  # per hub: agents answered with the new state, and the last of them
        for r in results:
            for h, (k, _first, last_w) in r["woken"].items():
                k0, l0 = wake.get(h, (0, 0.0))
                wake[h] = (k0 + k, max(l0, last_w))
        wake_per_hub = [wake.get(f"127.0.0.1:{port}", (0, t_deploy)) for _, port in hubs]
        idle = sum(r["idle_requests"] for r in results)
        return {
            "db": kind, "hubs": hubs_n, "agents": n, "client_processes": clients,
            "register_s": round(reg_s, 2),
            "timed_poll": {"seconds": poll_s, "after_warm_up_s": warm_s, "cycles": poll_cycles,
                           "cycles_per_s": round(poll_cycles / poll_s), "cycles_per_s_per_hub": round(
                               poll_cycles / poll_s / hubs_n),
                           "hub_cpu_s_per_1000_cycles": round(sum(b - a for a, b in zip(c0, c1)) / max(1, poll_cycles)
                                                              * 1000, 3)},
            "long_poll_idle": {"seconds": idle_s, "from_poll_end_to_all_held_s": round(to_held_s, 1), "held_connections_per_hub": conns_held,
                               "requests": idle, "requests_per_s": round(idle / idle_s, 1),
                               "hub_cpu_percent_per_hub": [round((b - a) / idle_s * 100, 1) for a, b in zip(c2, c3)],
                               "hub_rss_mb_per_hub": [round(r / 2**20, 1) for r in rss],
                               "hub_rss_mb_at_start_per_hub": [round(r / 2**20, 1) for r in rss0],
                               # what the connected agents added (their connections, held requests,
                               # caches): (RSS now - RSS at start), all hubs together, per 10,000 agents
                               "hub_rss_mb_added_per_10000_agents": round((sum(rss) - sum(rss0)) / 2**20 / n
                                                                          * 10000, 1)},
            "deploy": {"package_bytes": len(pkg2), "set_desired_s": round(set_s, 3), "reported": done,
                       "to_100_percent_s": round(last - t_deploy, 2) if last and done == n else None,
                       "full_downloads": sum(r["full_downloads"] for r in results),
                       "full_hash_ok": sum(r["full_hash_ok"] for r in results),
                       "range_bytes_per_agent": RANGE,
                       "hub_cpu_s": round(sum(b - a for a, b in zip(c3, c4)), 2)},
            # the wake: every agent holds its long-poll; from the POST to the last held request answered
            # with the new state (each then reads the origin and reports: the deploy figure above)
            "long_poll_wake": {"answered": sum(k for k, _ in wake_per_hub),
                               "to_all_answered_s": round(max(last_w for _, last_w in wake_per_hub) - t_deploy, 2),
                               "answered_per_hub": [k for k, _ in wake_per_hub],
                               "to_all_answered_s_per_hub": [round(last_w - t_deploy, 2) for _, last_w in wake_per_hub],
                               "answers_per_s_per_hub": [round(k / max(last_w - t_deploy, 1e-3))
                                                         for k, last_w in wake_per_hub]},
            "errors": sum(r["errors"] for r in results),
        }
    finally:
        for p in procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=None, help="default 10,000 (--quick: 1,000)")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--poll-s", type=float, default=8.0)
    ap.add_argument("--idle-s", type=float, default=6.0)
    ap.add_argument("--poll-warm-s", type=float, default=5.0,
                    help="seconds of timed poll before the counted --poll-s (each agent's first answer built)")
    ap.add_argument("--quick", action="store_true",
                    help="1,000 agents (or --agents), SQLite with one hub only; nothing saved")
    ap.add_argument("--only", choices=["sqlite", "postgresql"],
                    help="run that database's setups only, replacing them in the saved results")
    ap.add_argument("--client")
    ap.add_argument("--origin-server")
    ap.add_argument("--ready-file")
    ap.add_argument("--out", default=str(HERE / "results" / "fleet.json"))
    args = ap.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(client_main(json.loads(Path(args.client).read_text())))), flush=True)
        return 0
    if args.origin_server:
        run_origin(args.origin_server, args.ready_file)
        return 0
    from device_bridge.keys import load_or_create_keypair

    t_start = time.time()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    kp = load_or_create_keypair(work / "keys")
    setups = [("sqlite", 1)] if args.quick else [("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2)]
    if args.only:
        setups = [s for s in setups if s[0] == args.only]
    n = args.agents or (1000 if args.quick else 10_000)
    srv = None
    runs = []
    try:
        for kind, hubs_n in setups:
            db_url = None
            if kind == "postgresql":
                import psycopg

                if srv is None:
                    import pgserver

                    pg_dir = Path(tempfile.mkdtemp(prefix="bench-fleet-pg-"))
                    srv = pgserver.get_server(pg_dir, cleanup_mode="stop")
                uri = srv.get_uri()
                name = f"fleet{hubs_n}"
                with psycopg.connect(uri, autocommit=True) as con:
                    con.execute(f"DROP DATABASE IF EXISTS {name}")
                    con.execute(f"CREATE DATABASE {name}")
                db_url = uri.replace("/postgres?", f"/{name}?")
            la = os.getloadavg()
            r = one_setup(work, kind, hubs_n, n, args.clients, db_url, kp, args.poll_s, args.idle_s, args.poll_warm_s)
            r["loadavg_before"] = [round(x, 2) for x in la]
            runs.append(r)
            print(json.dumps(r), flush=True)
    finally:
        if srv is not None:
            srv.cleanup()
            shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    out = {"bench": "fleet", "machine_cores": os.cpu_count(), "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(), "seconds": round(time.time() - t_start, 1),
           "note": "hubs, simulated clients and the static origin share this machine's cores with other "
                   "engineers' test runs; timed-poll cycles/s are what the hub(s) completed while the client "
                   "processes took their share of the same cores",
           "runs": runs}
    if args.only and Path(args.out).exists():  # the other database's runs stay, with their own load averages
        old = json.loads(Path(args.out).read_text())
        out["runs"] = [r for r in old["runs"] if r["db"] != args.only] + runs
        out["earlier_runs_loadavg"] = {"loadavg_before": old["loadavg_before"], "loadavg_after": old["loadavg_after"]}
    if not args.quick:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

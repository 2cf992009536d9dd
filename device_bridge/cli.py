"""`mlsql-device` / `python -m device_bridge`: serve an agent (or several simulated devices), or a hub."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

SWITCH_INTERVAL_S = 0.0005


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlsql-device", description="MLSQL device agent and hub")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the on-device agent")
    s.add_argument("--name", required=True, help="device name (with --devices K: prefix, names NAME-0..)")
    s.add_argument("--port", type=int, default=7070, help="port (0: any free port; see --ready-file)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--store", required=True, help="folder holding models and state")
    s.add_argument("--token", default=os.environ.get("MLSQL_DEVICE_TOKEN"),
                   help="device token for mutating calls (or env MLSQL_DEVICE_TOKEN)")
    s.add_argument("--trust", action="append", default=[], help="public key file to trust (repeatable)")
    s.add_argument("--tls-cert")
    s.add_argument("--tls-key")
    s.add_argument("--hub", help="hub URL to poll for desired state")
    s.add_argument("--hub-token", default=os.environ.get("MLSQL_AGENT_HUB_TOKEN"),
                   help="this agent's own hub credential, from `mlsql-device hub enroll NAME` (or env "
                        "MLSQL_AGENT_HUB_TOKEN); never the device token, never the hub's operator token")
    s.add_argument("--hub-token-file",
                   help="file holding this agent's hub credential (default STORE/hub_token; with --devices K, "
                        "each device reads STORE/NAME-i/hub_token). Without one the agent asks the hub to "
                        "enroll it, which a hub started with --enroll-open does, and keeps it there")
    s.add_argument("--hub-interval", type=float, default=1.0,
                   help="seconds between reports to the hub (and desired-state polls, without long-poll)")
    s.add_argument("--hub-wait", type=float, default=30.0,
                   help="long-poll: hold GET desired up to this many seconds (capped by the hub's maximum), so a "
                        "new desired state arrives at once and an idle agent makes no desired-state polls; "
                        "0: poll every --hub-interval")
    s.add_argument("--group", help="group to register with at the hub")
    s.add_argument("--keep-versions", type=int, default=3)
    s.add_argument("--max-package-mb", type=float, default=256)
    s.add_argument("--max-body-mb", type=float, default=64)
    s.add_argument("--breaker-window", type=int, default=100)
    s.add_argument("--breaker-min-requests", type=int, default=20)
    s.add_argument("--breaker-threshold", type=float, default=0.5)
    s.add_argument("--ort-threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads per model session (default 1: concurrent requests run "
                        "side by side, a core each; 0: ORT's default, one per core, better for one client "
                        "sending large batches)")
    s.add_argument("--cores", type=int, default=0,
                   help="the budget of cores the scheduler shares out: run slots, and batch sessions' intra-op "
                        "threads (default 0: every core of the machine)")
    s.add_argument("--priorities", choices=["on", "off"], default="on",
                   help="on (default): realtime first, normal and batch by weighted shares, batch at a lower CPU "
                        "priority; off: one first-come-first-served queue for every model (for comparison)")
    s.add_argument("--batch-cpu", choices=["idle", "nice", "normal"], default="idle",
                   help="CPU priority of batch worker processes: idle (default; Linux SCHED_IDLE: any other task "
                        "preempts them at once), nice (--batch-nice), normal (the agent's own)")
    s.add_argument("--batch-nice", type=int, default=10,
                   help="nice value of batch worker processes with --batch-cpu nice, or where SCHED_IDLE is missing")
    s.add_argument("--realtime-reserve", type=int, default=None,
                   help="cores kept free of batch work while realtime requests arrive (batch worker processes "
                        "are confined to the others, and get every core back after 1 s without one); default: "
                        "1 on devices of 4 or more cores, 0 below, or $MLSQL_DEVICE_REALTIME_RESERVE")
    s.add_argument("--memory-budget-mb", type=int, default=None,
                   help="the device's total for the active versions' memory_mb: an install or activation past it "
                        "is refused (409 memory_budget); default: no total")
    s.add_argument("--memory-limit", choices=["auto", "cgroup", "rlimit"], default=os.environ.get(
                       "MLSQL_DEVICE_MEMORY_LIMIT", "auto"),
                   help="how a worker process's memory_mb is enforced: auto (default; its own memory cgroup where "
                        "the agent may create one, else RLIMIT_AS), cgroup (refuse to start without one), rlimit "
                        "(RLIMIT_AS); or $MLSQL_DEVICE_MEMORY_LIMIT")
    s.add_argument("--open-reads", action="store_true",
                   help="serve info, metrics, events and predict without the token (default: token required; "
                        "health is always open)")
    s.add_argument("--auth-reads", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    s.add_argument("--max-json-mb", type=float, default=16, help="limit for a JSON predict body")
    s.add_argument("--request-timeout", type=float, default=15.0,
                   help="seconds a connection may sit without completing a request's headers")
    s.add_argument("--body-timeout", type=float, default=60.0, help="seconds to receive a request's whole body")
    s.add_argument("--devices", type=int, default=1,
                   help="simulate K devices in this process (each its own port, store and hub sync)")
    s.add_argument("--ready-file", help="write {devices: [{name, port, url}]} here once listening")
    s.add_argument("--fake-providers", help=argparse.SUPPRESS)  # tests: comma list of 'available' providers

    h = sub.add_parser("hub", help="run the fleet hub (or: hub enroll NAME / hub revoke NAME / hub publish DIR "
                                   "--store DIR)",
                       usage="mlsql-device hub [serve] --store DIR --token T [options]\n"
                             "       mlsql-device hub enroll NAME --store DIR [--db URL] [--out FILE]\n"
                             "       mlsql-device hub revoke NAME --store DIR [--db URL]\n"
                             "       mlsql-device hub publish DIR --store DIR [--db URL]")
    h.add_argument("action", nargs="?", choices=["serve", "enroll", "revoke", "publish"], default="serve",
                   help="serve (default): run the hub; enroll NAME: print (or --out) a fresh credential for "
                        "agent NAME, replacing its earlier one; revoke NAME: refuse NAME's credential; "
                        "publish DIR: copy every package blob into DIR as DIR/SHA256, for a static origin "
                        "(any HTTP server, CDN or S3-compatible bucket serving DIR; see --origin), and "
                        "the deltas between versions (--delta-bases; --deltas off: none). "
                        "enroll, revoke and publish work on the hub's store, also while the hub runs")
    h.add_argument("name", nargs="?", help="agent name (enroll, revoke); the folder (publish)")
    h.add_argument("--origin", action="append", default=None,
                   help="base URL of a static origin holding the blobs as BASE/SHA256 (hub publish writes "
                        "them); repeatable, tried in this order (or env MLSQL_HUB_ORIGINS, comma-separated). "
                        "Agents verify each package's sha256 and signature whatever its origin")
    h.add_argument("--hub-blobs", choices=["first", "last", "off"], default="first",
                   help="where the hub's own blob URL (/v1/blobs/SHA256) goes in each package's URL list: "
                        "first (default), last (the origins first, the hub as the fallback) or off")
    h.add_argument("--deltas", choices=["on", "off"], default="on",
                   help="on (default): an agent with an older version of a model installed may download "
                        "/v1/blobs/SHA256/delta?from=OLD, a zstd delta made once per pair and kept under "
                        "STORE/deltas; off: full packages only")
    h.add_argument("--delta-max-ratio", type=float, default=0.5,
                   help="a delta over this fraction of the full package is not sent (the full package is)")
    h.add_argument("--delta-bases", type=int, default=2,
                   help="publish: for each package, deltas from this many of its model's newest older "
                        "versions (0: none), written beside the blobs as DIR/SHA256 of the delta and listed "
                        "in desired state on the origins (--origin)")
    h.add_argument("--lease-s", type=float, default=10.0,
                   help="scheduled rollouts (POST /v1/rollouts): the lease one hub process holds to advance "
                        "their waves; another takes over this long after it dies")
    h.add_argument("--drive-rollouts", choices=["on", "off"], default="on",
                   help="off: this process never takes the scheduled rollouts' lease (leave it to a few "
                        "processes of a large hub tier); it still creates, shows and stops them")
    h.add_argument("--replica", help="this hub process's name in the lease (default host:pid:random)")
    h.add_argument("--max-held", type=int, default=20000,
                   help="long-polls of the desired state held at once by this process; past it, answered at once")
    h.add_argument("--max-wait-s", type=float, default=60.0,
                   help="the longest an agent's long-poll is held (1 to 3600): an idle agent asks again once "
                        "per wait, so a longer one costs the hub less, as far as the network's idle timeouts "
                        "(NAT, proxies) allow")
    h.add_argument("--recheck-s", type=float, default=1.0,
                   help="how often this process reads the database's change markers: a change made through "
                        "another hub process (or hub enroll/revoke/publish) reaches the answers it keeps in "
                        "memory, and its held long-polls, at most this late")
    h.add_argument("--cache-agents", type=int, default=200_000,
                   help="agents whose desired-state answer and credential this process keeps in memory "
                        "(the poll cycle without a database read); the oldest go first")
    h.add_argument("--out", help="enroll: write the credential to this file (0600) instead of printing it")
    h.add_argument("--port", type=int, default=7000)
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--store", required=True, help="folder holding packages (blobs/), device data and, by "
                                                  "default, the state's database (hub.db)")
    h.add_argument("--db", default=os.environ.get("MLSQL_HUB_DB"),
                   help="the state's database (or env MLSQL_HUB_DB): sqlite:///PATH (default STORE/hub.db) or "
                        "postgresql://user:pw@host/db for several hub processes on one state")
    h.add_argument("--token", "--operator-token", dest="token", default=os.environ.get("MLSQL_HUB_TOKEN"),
                   help="the operator credential (or env MLSQL_HUB_TOKEN): desired state, rollouts, fleet "
                        "reads, enrollment. Agents get their own (enroll)")
    h.add_argument("--enroll-open", action="store_true",
                   help="tests and development: an agent without a credential may enroll itself under a "
                        "name that never had one (first come, first served)")
    h.add_argument("--tls-cert")
    h.add_argument("--tls-key")
    h.add_argument("--max-package-mb", type=float, default=256)
    h.add_argument("--data-max-mb", type=int, default=1024,
                   help="device data (samples, outcomes) kept per group, in MB; the oldest files go first")
    h.add_argument("--request-timeout", type=float, default=15.0)
    h.add_argument("--body-timeout", type=float, default=120.0)
    h.add_argument("--report-flush-ms", type=float, default=float(os.environ.get("MLSQL_HUB_REPORT_FLUSH_MS", 200)),
                   help="agents' reports and events reach the database this often, all in one transaction "
                        "(or env MLSQL_HUB_REPORT_FLUSH_MS; default 200; 0: each report at once): other "
                        "replicas see a report at most this late, and a crash loses at most this much "
                        "telemetry (the next poll sends a fresh report)")
    h.add_argument("--ready-file")
    return p


def _bind(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server(app, args):
    import uvicorn

    from device_bridge.web import server_config

    return uvicorn.Server(server_config(app, tls_cert=args.tls_cert, tls_key=args.tls_key,
                                       request_timeout=args.request_timeout))


def _write_ready(path: str | None, payload: dict) -> None:
    if not path:
        return
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


async def _serve_all(servers_socks) -> None:
    await asyncio.gather(*(srv.serve(sockets=[sock]) for srv, sock in servers_socks))


def serve(args) -> int:
    from device_bridge.agent.app import create_app
    from device_bridge.agent.core import AgentConfig, AgentCore, StoreError
    from device_bridge.agent.hubsync import HubSync
    from device_bridge.agent.memlimit import Unavailable as MemoryLimitUnavailable
    from device_bridge.agent.storelock import StoreInUse, claim

    if not args.token:
        print("mlsql-device: --token (or MLSQL_DEVICE_TOKEN) is required", file=sys.stderr)
        return 2
    if args.ort_threads < 0:
        print("mlsql-device: --ort-threads must be 0 (ONNX Runtime's default) or more", file=sys.stderr)
        return 2
    if args.cores < 0 or not 0 <= args.batch_nice <= 19 or (args.memory_budget_mb is not None
                                                             and args.memory_budget_mb < 16) \
            or (args.realtime_reserve is not None and args.realtime_reserve < 0):
        print("mlsql-device: --cores must be 0 (all) or more, --batch-nice 0 to 19, --memory-budget-mb at least 16, "
              "--realtime-reserve 0 or more",
              file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("mlsql-device: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.hub_token and args.hub_token == args.token:
        print("mlsql-device: the hub credential must not be the device token (enroll the agent: "
              "mlsql-device hub enroll NAME)", file=sys.stderr)
        return 2
    if args.hub_token and args.devices > 1:
        print("mlsql-device: --hub-token is one agent's credential; with --devices K each device reads its own "
              "from STORE/NAME-i/hub_token (or enrolls itself at a hub started with --enroll-open)",
              file=sys.stderr)
        return 2
    if args.hub_token_file and args.devices > 1:
        print("mlsql-device: --hub-token-file is one agent's credential; with --devices K each device reads "
              "STORE/NAME-i/hub_token", file=sys.stderr)
        return 2
    # the interpreter lock changes hands at most every 0.5 ms instead of 5 ms: a thread folding telemetry
    # or parsing a batch makes the event loop, and so a realtime request, wait that long at worst
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    scheme = "https" if args.tls_cert else "http"
    fake = [p.strip() for p in args.fake_providers.split(",")] if args.fake_providers else None
    items = []
    devices = []
    claims = []
    for i in range(max(1, args.devices)):
        name = args.name if args.devices <= 1 else f"{args.name}-{i}"
        store = Path(args.store) if args.devices <= 1 else Path(args.store) / name
        cfg = AgentConfig(
            name=name, store=store, keep_versions=args.keep_versions,
            max_package_bytes=int(args.max_package_mb * 1024 * 1024),
            max_body_bytes=int(args.max_body_mb * 1024 * 1024), trust_files=list(args.trust),
            max_json_bytes=int(args.max_json_mb * 1024 * 1024),
            breaker_window=args.breaker_window, breaker_min_requests=args.breaker_min_requests,
            breaker_threshold=args.breaker_threshold, hub_url=args.hub,
            hub_token=args.hub_token, available_providers=fake, ort_threads=args.ort_threads,
            cores=args.cores, priorities=args.priorities == "on", batch_nice=args.batch_nice,
            batch_cpu=args.batch_cpu, realtime_reserve=args.realtime_reserve,
            memory_budget_mb=args.memory_budget_mb, memory_limit=args.memory_limit)
        port = args.port if args.devices <= 1 or args.port == 0 else args.port + i
        try:
            claims.append(claim(store, name, port or None))  # held until this process ends
            core = AgentCore(cfg)
        except (StoreError, StoreInUse, MemoryLimitUnavailable) as exc:
            print(f"mlsql-device: {exc}", file=sys.stderr)
            return 2
        sock = _bind(args.host, port)
        real_port = sock.getsockname()[1]
        url = f"{scheme}://{args.host}:{real_port}"
        app = create_app(core, args.token, open_reads=args.open_reads, request_timeout=args.request_timeout,
                         body_timeout=args.body_timeout)
        items.append((_server(app, args), sock))
        devices.append({"name": name, "port": real_port, "url": url})
        if args.hub:
            sync = HubSync(core, args.hub, cfg.hub_token, url, args.hub_interval, group=args.group,
                           token_file=args.hub_token_file, wait=max(0.0, args.hub_wait))
            if sync.token and sync.token == args.token:
                print(f"mlsql-device: {sync.token_file} holds the device token; the hub credential must "
                      "be the agent's own (mlsql-device hub enroll NAME)", file=sys.stderr)
                return 2
            sync.start()
    _write_ready(args.ready_file, {"pid": os.getpid(), "devices": devices})
    print(json.dumps({"listening": devices}), flush=True)
    asyncio.run(_serve_all(items))
    return 0


def hub_credential(args) -> int:
    """``hub enroll NAME`` / ``hub revoke NAME``: on the hub's store, which a running hub reads again."""
    from device_bridge.agent.hubsync import write_token_file
    from device_bridge.errors import ApiError
    from device_bridge.hub import Credentials
    from device_bridge.hub.db import Database

    if not args.name:
        print(f"mlsql-device hub {args.action}: name the agent (mlsql-device hub {args.action} NAME --store DIR)",
              file=sys.stderr)
        return 2
    try:
        creds = Credentials(args.store, Database(args.store, args.db))
        if args.action == "revoke":
            had = creds.revoke(args.name)
            print(json.dumps({"agent": args.name, "revoked": had}))
            return 0
        token = creds.enroll(args.name)
    except ApiError as exc:
        print(f"mlsql-device hub {args.action}: {exc.message}", file=sys.stderr)
        return 2
    if args.out:
        write_token_file(args.out, token)
        print(json.dumps({"agent": args.name, "token_file": str(args.out)}))
    else:
        print(token)
    return 0


def hub_publish(args) -> int:
    """``hub publish DIR``: every blob of the hub's database into DIR as DIR/SHA256 (written to a
    temporary name, then renamed: a static server never serves half a file); blobs already there with
    the right bytes are left alone."""
    import hashlib
    import shutil

    from device_bridge.errors import ApiError
    from device_bridge.hub.db import Database
    from device_bridge.hub.state import HubState

    if not args.name:
        print("mlsql-device hub publish: name the folder (mlsql-device hub publish DIR --store STORE)",
              file=sys.stderr)
        return 2
    out = Path(args.name)
    try:
        out.mkdir(parents=True, exist_ok=True)
        state = HubState(args.store, 0, Database(args.store, args.db), flush_s=0)
        metas = state.blobs()
    except ApiError as exc:
        print(f"mlsql-device hub publish: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mlsql-device hub publish: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.delta_max_ratio <= 1 or args.delta_bases < 0:
        print("mlsql-device hub publish: --delta-max-ratio must be in (0, 1], --delta-bases 0 or more",
              file=sys.stderr)
        return 2
    written, kept, missing = [], [], []
    for meta in metas:
        sha = meta["sha256"]
        src, dst = Path(args.store) / "blobs" / sha, out / sha
        if not src.exists():
            missing.append(sha)
            continue
        if dst.exists() and dst.stat().st_size == src.stat().st_size \
                and hashlib.sha256(dst.read_bytes()).hexdigest() == sha:
            kept.append(sha)
            continue
        tmp = out / f".{sha}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        written.append(sha)
    counts = {}
    if args.deltas == "on" and args.delta_bases > 0:
        from device_bridge.hub.deltas import publish

        try:
            counts = publish(state, out, args.delta_bases, args.delta_max_ratio)
        except ApiError as exc:
            print(f"mlsql-device hub publish: {exc.message}", file=sys.stderr)
            return 2
    print(json.dumps({"folder": str(out), "written": len(written), "already_there": len(kept),
                      "missing_from_store": missing, **counts}))
    return 1 if missing else 0


def hub(args) -> int:
    from device_bridge.hub import create_hub_app

    if args.action == "publish":
        return hub_publish(args)
    if args.action != "serve":
        return hub_credential(args)
    if not args.token:
        print("mlsql-device hub: --token (or MLSQL_HUB_TOKEN) is required: the operator credential",
              file=sys.stderr)
        return 2
    if args.data_max_mb < 1:
        print("mlsql-device hub: --data-max-mb must be 1 or more", file=sys.stderr)
        return 2
    from device_bridge.errors import ApiError

    if not (0.2 <= args.lease_s <= 3600 and args.max_held >= 0 and 0.05 <= args.recheck_s <= 60
            and args.cache_agents >= 0):
        print("mlsql-device hub: --lease-s must be 0.2 to 3600, --max-held 0 or more, --recheck-s 0.05 to 60, "
              "--cache-agents 0 or more", file=sys.stderr)
        return 2
    if not 0 < args.delta_max_ratio <= 1:
        print("mlsql-device hub: --delta-max-ratio must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        app = create_hub_app(args.store, args.token, int(args.max_package_mb * 1024 * 1024),
                             body_timeout=args.body_timeout, enroll_open=args.enroll_open,
                             data_max_mb=args.data_max_mb, db=args.db,
                             report_flush_s=max(0.0, args.report_flush_ms) / 1000,
                             origins=args.origin if args.origin is not None else  # the flags, else the env's list
                             [o for o in os.environ.get("MLSQL_HUB_ORIGINS", "").split(",") if o.strip()],
                             hub_blobs=args.hub_blobs, deltas=args.deltas == "on",
                             delta_max_ratio=args.delta_max_ratio, lease_s=args.lease_s,
                             max_held=args.max_held, recheck_s=args.recheck_s, replica=args.replica,
                             max_wait_s=args.max_wait_s, drive_rollouts=args.drive_rollouts == "on",
                             cache_agents=args.cache_agents)
    except ApiError as exc:  # the database: unreachable, damaged, newer than this hub
        print(f"mlsql-device hub: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:  # --origin, --hub-blobs
        print(f"mlsql-device hub: {exc}", file=sys.stderr)
        return 2
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    scheme = "https" if args.tls_cert else "http"
    _write_ready(args.ready_file, {"pid": os.getpid(), "port": port, "url": f"{scheme}://{args.host}:{port}"})
    print(json.dumps({"listening": f"{scheme}://{args.host}:{port}"}), flush=True)
    # SIGTERM (uvicorn catches it, stops serving, then raises it again): exit through the finally
    # below, which writes the reports still pending, instead of dying at once
    signal.signal(signal.SIGTERM, _exit_on_term)
    try:
        asyncio.run(_serve_all([(_server(app, args), sock)]))
    finally:
        app.state.hub.close()
    return 0


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "serve":
        return serve(args)
    return hub(args)


if __name__ == "__main__":
    raise SystemExit(main())

"""`mlsql-device` / `python -m device_bridge`: serve an agent (or several simulated devices), or a hub."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path


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
    s.add_argument("--hub-token", default=os.environ.get("MLSQL_HUB_TOKEN"),
                   help="token for the hub (default: the device token)")
    s.add_argument("--hub-interval", type=float, default=1.0, help="seconds between hub polls")
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

    h = sub.add_parser("hub", help="run the fleet hub")
    h.add_argument("--port", type=int, default=7000)
    h.add_argument("--host", default="127.0.0.1")
    h.add_argument("--store", required=True)
    h.add_argument("--token", default=os.environ.get("MLSQL_HUB_TOKEN"))
    h.add_argument("--tls-cert")
    h.add_argument("--tls-key")
    h.add_argument("--max-package-mb", type=float, default=256)
    h.add_argument("--request-timeout", type=float, default=15.0)
    h.add_argument("--body-timeout", type=float, default=120.0)
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

    if not args.token:
        print("mlsql-device: --token (or MLSQL_DEVICE_TOKEN) is required", file=sys.stderr)
        return 2
    if args.ort_threads < 0:
        print("mlsql-device: --ort-threads must be 0 (ONNX Runtime's default) or more", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("mlsql-device: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    scheme = "https" if args.tls_cert else "http"
    fake = [p.strip() for p in args.fake_providers.split(",")] if args.fake_providers else None
    items = []
    devices = []
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
            hub_token=args.hub_token or args.token, available_providers=fake, ort_threads=args.ort_threads)
        try:
            core = AgentCore(cfg)
        except StoreError as exc:
            print(f"mlsql-device: {exc}", file=sys.stderr)
            return 2
        port = args.port if args.devices <= 1 or args.port == 0 else args.port + i
        sock = _bind(args.host, port)
        real_port = sock.getsockname()[1]
        url = f"{scheme}://{args.host}:{real_port}"
        app = create_app(core, args.token, open_reads=args.open_reads, request_timeout=args.request_timeout,
                         body_timeout=args.body_timeout)
        items.append((_server(app, args), sock))
        devices.append({"name": name, "port": real_port, "url": url})
        if args.hub:
            HubSync(core, args.hub, cfg.hub_token, url, args.hub_interval, group=args.group).start()
    _write_ready(args.ready_file, {"pid": os.getpid(), "devices": devices})
    print(json.dumps({"listening": devices}), flush=True)
    asyncio.run(_serve_all(items))
    return 0


def hub(args) -> int:
    from device_bridge.hub import create_hub_app

    if not args.token:
        print("mlsql-device hub: --token (or MLSQL_HUB_TOKEN) is required", file=sys.stderr)
        return 2
    app = create_hub_app(args.store, args.token, int(args.max_package_mb * 1024 * 1024),
                         body_timeout=args.body_timeout)
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    scheme = "https" if args.tls_cert else "http"
    _write_ready(args.ready_file, {"pid": os.getpid(), "port": port, "url": f"{scheme}://{args.host}:{port}"})
    print(json.dumps({"listening": f"{scheme}://{args.host}:{port}"}), flush=True)
    asyncio.run(_serve_all([(_server(app, args), sock)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "serve":
        return serve(args)
    return hub(args)


if __name__ == "__main__":
    raise SystemExit(main())

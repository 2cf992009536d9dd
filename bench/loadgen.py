"""A lean HTTP/1.1 load generator for the agent, in the spirit of wrk.

Each of ``clients`` keep-alive connections sends the same pre-encoded request over and over
and reads the answer (status line, headers, Content-Length body) — one request in flight per
connection, as a client waiting for its prediction would. The request is encoded once, so the
generator spends its time on the socket, not on building bodies; it runs in its own process
(one asyncio loop), so it shares no interpreter lock with whatever started it.

    python bench/loadgen.py URL PATH CONTENT_TYPE BODY_FILE [--clients 16] [--seconds 8]
                           [--token T] [--accept TYPE] [--method POST|GET] [--rate R]

(``--method GET`` sends no body: pass ``-`` for CONTENT_TYPE and BODY_FILE.) ``--rate R``: each
connection sends R requests a second on a fixed schedule (a light, steady load whose latency is
measured) instead of the next one as soon as an answer is in; a late answer delays the next send,
it never causes a burst.

prints one JSON object: requests, seconds, requests_per_s, p50_ms, p99_ms, errors, and the
first answer's status and Content-Type (so a run that only got errors cannot pass as fast).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def _client(host, port, request: bytes, stop_at: float, lat: list, status: dict, rate: float | None = None,
                  offset: float = 0.0):
    reader, writer = await asyncio.open_connection(host, port)
    next_at = time.perf_counter() + offset
    try:
        while True:
            if rate:
                wait = next_at - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                next_at = max(next_at + 1.0 / rate, time.perf_counter())
            t = time.perf_counter()
            if t >= stop_at:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            code = int(head[9:12])
            length = 0
            ctype = ""
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                k = k.strip().lower()
                if k == b"content-length":
                    length = int(v)
                elif k == b"content-type":
                    ctype = v.strip().decode()
            body = await reader.readexactly(length)
            lat.append(time.perf_counter() - t)
            status["statuses"][code] = status["statuses"].get(code, 0) + 1
            if code != 200:
                status["errors"] += 1
                if status["error_example"] is None:
                    status["error_example"] = f"{code}: {body[:300].decode('utf-8', 'replace')}"
            if status["first"] is None:
                status["first"] = {"status": code, "content_type": ctype, "bytes": length}
    finally:
        writer.close()


async def run(url: str, path: str, ctype: str, body: bytes, clients: int, seconds: float,
              token: str | None, accept: str | None, method: str = "POST", rate: float | None = None) -> dict:
    u = urlsplit(url)
    host, port = u.hostname, u.port or 80
    headers = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    if method == "POST":
        headers += [f"Content-Type: {ctype}", f"Content-Length: {len(body)}"]
    else:
        body = b""
    if accept:
        headers.append(f"Accept: {accept}")
    if token:
        headers.append(f"Authorization: Bearer {token}")
    request = ("\r\n".join(headers) + "\r\n\r\n").encode() + body
    lat: list[float] = []
    status = {"errors": 0, "first": None, "error_example": None, "statuses": {}}
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(_client(host, port, request, stop_at, lat, status, rate,
                                   (k / clients / rate) if rate else 0.0) for k in range(clients)))
    dt = time.perf_counter() - t0
    lat.sort()

    def pct(q):
        return lat[min(len(lat) - 1, int(q / 100 * len(lat)))] * 1000 if lat else None

    return {"requests": len(lat), "seconds": dt, "requests_per_s": len(lat) / dt, "p50_ms": pct(50),
            "p90_ms": pct(90), "p99_ms": pct(99), "errors": status["errors"], "error_example": status["error_example"],
            "statuses": status["statuses"], "first": status["first"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("path")
    ap.add_argument("content_type")
    ap.add_argument("body_file")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--token")
    ap.add_argument("--accept")
    ap.add_argument("--method", choices=["POST", "GET"], default="POST")
    ap.add_argument("--rate", type=float, help="requests a second per connection, on a fixed schedule")
    a = ap.parse_args(argv)
    body = b""
    if a.method == "POST":
        with open(a.body_file, "rb") as f:
            body = f.read()
    res = asyncio.run(run(a.url, a.path, a.content_type, body, a.clients, a.seconds, a.token, a.accept,
                          a.method, a.rate))
    json.dump(res, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A static origin for the origin tests: a plain HTTP file server over one folder (what `python -m
http.server` does, plus single ``Range: bytes=N-`` requests, as every CDN and S3-compatible store
answers them), which logs every request and can be told to cut or stall an answer: the faults a
CDN's clients meet."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"^bytes=(\d+)-$")


class StaticOrigin:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.log: list[
            dict
        ] = []  # per request: path, range and authorization (headers or None), status, sent
        self.cut_after: dict[str, int] = {}  # name -> bytes sent before the connection is closed (once)
        self.stall_after: dict[str, int] = {}  # name -> bytes sent before the answer stalls (once)
        self.release = threading.Event()
        self.ignore_range = False  # answer 200 with the whole file, as a server without Range support does
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                entry = {
                    "path": self.path,
                    "range": self.headers.get("Range"),
                    "authorization": self.headers.get("Authorization"),
                    "status": None,
                    "sent": 0,
                }
                origin.log.append(entry)
                path = origin.folder / name
                if "/" in name or not name or not path.is_file():
                    entry["status"] = 404
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start, status = 0, 200
                rng = None if origin.ignore_range else self.headers.get("Range")
                if rng:
                    m = _RANGE.match(rng)
                    if not m or int(m.group(1)) >= len(data):
                        entry["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    start, status = int(m.group(1)), 206
                body = data[start:]
                entry["status"] = status
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = origin.cut_after.pop(name, None)
                stall = origin.stall_after.pop(name, None)
                limit = cut if cut is not None else stall
                if limit is not None:
                    self.wfile.write(body[:limit])
                    self.wfile.flush()
                    entry["sent"] = min(limit, len(body))
                    if stall is not None:
                        origin.release.wait(30)
                    self.close_connection = True
                    return
                self.wfile.write(body)
                entry["sent"] = len(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def requests_for(self, name: str) -> list[dict]:
        return [e for e in self.log if e["path"] == f"/{name}"]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        time.sleep(0)


def dead_url() -> str:
    """An origin that is down: a loopback port nothing listens on."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"

"""The floor under the agent's cost: an HTTP server that does nothing but the prediction.

    python bench/floor_server.py MODEL.onnx MODE READY_FILE      (MODE: inline | thread)

asyncio and httptools (what the agent's uvicorn runs on), one ONNX Runtime session with the agent's
session options (one intra-op thread, no spinning), and per request: read the body, decode it (JSON
columns at batch 1, application/x-mlsql-columns above, as DeviceClient sends them), run the model,
encode the answer the same way and write it. No token, no checks, no scheduler, no deadline, no
telemetry, no request ids. ``inline``: the run happens on the event loop; ``thread``: it goes to one
of two threads and the answer comes back with ``call_soon_threadsafe`` (the agent's hop to its
pool, at its barest).

bench_device.py's cost section puts the same load on it as on the agent, in the same run: the
share of its CPU spent in the model is what any server on this interpreter and machine can reach
with each design, and the agent's gap to it is its own request path.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
import threading
from pathlib import Path

import httptools
import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from device_bridge import columns as colfmt  # noqa: E402
from device_bridge.providers import _session_options  # noqa: E402


class Floor(asyncio.Protocol):
    def __init__(self, server: FloorServer):
        self.s = server
        self.parser = httptools.HttpRequestParser(self)
        self.chunks: list[bytes] = []
        self.binary = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.binary = value == colfmt.CONTENT_TYPE.encode()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.chunks)
        self.chunks = []
        if self.binary:
            x = colfmt.decode(body)[0]["input"]
        else:
            x = np.asarray(json.loads(body)["columns"]["input"], dtype=np.float32)
        if self.s.mode == "inline":
            self.answer(self.s.sess.run(None, {"input": x}), self.binary)
        else:
            self.s.work.put((self, x, self.binary))

    def answer(self, out: list, binary: bool) -> None:
        meta = {"model": "floor", "version": 1, "rows": len(out[0])}
        if binary:
            data = colfmt.encode({"label": out[0], "probabilities": out[1]}, meta)
            ctype = colfmt.CONTENT_TYPE.encode()
        else:
            data = json.dumps({**meta, "outputs": {"label": out[0].tolist(),
                                                   "probabilities": out[1].tolist()}}).encode()
            ctype = b"application/json"
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                             % (ctype, len(data), data))


class FloorServer:
    def __init__(self, model: str, mode: str):
        self.mode = mode
        so = _session_options(False, ["CPUExecutionProvider"], 1)
        self.sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.work: queue.SimpleQueue = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None

    def _worker(self) -> None:
        while True:
            proto, x, binary = self.work.get()
            out = self.sess.run(None, {"input": x})
            self.loop.call_soon_threadsafe(proto.answer, out, binary)

    async def serve(self, ready: Path) -> None:
        self.loop = asyncio.get_running_loop()
        if self.mode == "thread":
            for _ in range(2):
                threading.Thread(target=self._worker, daemon=True).start()
        srv = await self.loop.create_server(lambda: Floor(self), "127.0.0.1", 0)
        tmp = ready.with_suffix(".tmp")  # renamed into place: the bench never reads half a file
        tmp.write_text(json.dumps({"url": f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"}))
        tmp.replace(ready)
        await srv.serve_forever()


def main(argv: list[str]) -> int:
    model, mode, ready = argv
    if mode not in ("inline", "thread"):
        raise SystemExit("MODE is inline or thread")
    asyncio.run(FloorServer(model, mode).serve(Path(ready)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Messages between the agent and its model worker processes, over a Unix socket pair.

    uint32 LE header length | uint32 LE data length | JSON header | column buffers (8-byte aligned)

The header holds the message's fields and ``cols``: ``[name, dtype, shape, offset, nbytes]`` per
array (fixed-size numpy dtypes; strings as ``<U``). A message goes out in one ``sendmsg`` of the
arrays' own buffers (no copy into a joined body) and is read into one buffer that the arrays then
view (``np.frombuffer``): one copy through the kernel each way, numpy only (no pyarrow on a device).

Headers from the agent to a worker are ``marshal``-encoded (five times cheaper than JSON each way;
the worker trusts the agent that started it, with the same interpreter); headers from a worker
are JSON, which the agent parses safely whatever a crashing native kernel may have written. The
size is capped either way.
"""

from __future__ import annotations

import json
import marshal
import socket
import struct
import threading
from collections import deque
from typing import Any

import numpy as np

PREFIX = struct.Struct("<II")
MAX_MESSAGE = 1 << 31
_PAD = b"\0" * 8


class Closed(EOFError):
    """The other end closed the socket (or died)."""


def _json(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


TO_WORKER, FROM_WORKER = (marshal.dumps, marshal.loads), (_json, json.loads)


def pack(header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None, dumps=_json) -> list:
    parts: list = []
    cols = []
    offset = 0
    for name, a in (arrays or {}).items():
        if a.dtype.kind == "O":
            a = a.astype(str)
        a = np.ascontiguousarray(a)
        n = a.nbytes
        cols.append([name, a.dtype.str, list(a.shape), offset, n])
        if n:
            parts.append(a.reshape(-1).view(np.uint8).data)
        pad = (-n) % 8
        if pad:
            parts.append(_PAD[:pad])
        offset += n + pad
    if cols:
        header = {**header, "cols": cols}
    h = dumps(header)
    return [PREFIX.pack(len(h), offset), h, *parts]


def send(sock: socket.socket, parts: list) -> None:
    """One message; the caller holds the socket's write lock."""
    total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    sent = sock.sendmsg(parts)
    if sent < total:  # a large message on a full socket buffer: the rest, in order
        rest = b"".join(bytes(p) for p in parts)[sent:]
        sock.sendall(rest)


class Sender:
    """The agent's writes to one worker, in order, never blocking the caller (the event loop) for
    long: a message goes out at once if the socket's buffer takes it (``MSG_DONTWAIT``); what does
    not fit, and every message after it, goes from a thread until the backlog is empty (a hung
    worker that reads nothing costs a thread, not the agent)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.backlog: deque = deque()
        self.flushing = False
        self.error: OSError | None = None

    def send(self, parts: list) -> None:
        total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        with self.lock:
            if self.error is not None:
                raise self.error
            if self.flushing:
                self.backlog.append(b"".join(parts))
                return
            try:
                sent = self.sock.sendmsg(parts, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent >= total:
                return
            self.backlog.append(b"".join(parts)[sent:])
            self.flushing = True
        threading.Thread(target=self._flush, name="ipc-send", daemon=True).start()

    def _flush(self) -> None:
        while True:
            with self.lock:
                if not self.backlog:
                    self.flushing = False
                    return
                data = self.backlog.popleft()
            try:
                self.sock.sendall(data)
            except OSError as exc:
                with self.lock:
                    self.error = exc
                    self.backlog.clear()
                    self.flushing = False
                return


def _read_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise Closed("socket closed")
        got += k


def recv(sock: socket.socket, loads=json.loads) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One message: its header and its arrays (views of one buffer)."""
    prefix = bytearray(PREFIX.size)
    _read_exact(sock, memoryview(prefix))
    hlen, dlen = PREFIX.unpack(prefix)
    if hlen + dlen > MAX_MESSAGE:
        raise Closed(f"message of {hlen + dlen} bytes: the stream is out of step")
    buf = bytearray(hlen + dlen)
    _read_exact(sock, memoryview(buf))
    return _decode(buf, hlen, loads)


class Frames:
    """Messages out of a byte stream read in pieces (the event loop reads what a socket has)."""

    def __init__(self, loads=json.loads) -> None:
        self.buf = bytearray()
        self.loads = loads

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
        out = []
        buf = self.buf
        if not buf:
            # nothing left over (the usual case): the whole messages at the start of ``data`` are each
            # copied once, into their own buffer, not appended to ``buf`` and copied out again (three
            # copies of a batch: 50 us for a 4,096-row one, on the event loop for a worker's answer)
            data = memoryview(data)
            n = len(data)
            pos = 0
            while n - pos >= PREFIX.size:
                hlen, dlen = PREFIX.unpack_from(data, pos)
                if hlen + dlen > MAX_MESSAGE:
                    raise Closed(f"message of {hlen + dlen} bytes: the stream is out of step")
                end = pos + PREFIX.size + hlen + dlen
                if end > n:
                    break
                out.append(_decode(bytearray(data[pos + PREFIX.size:end]), hlen, self.loads))
                pos = end
            if pos < n:
                buf += data[pos:]
            return out
        buf += data
        while len(buf) >= PREFIX.size:
            hlen, dlen = PREFIX.unpack_from(buf, 0)
            if hlen + dlen > MAX_MESSAGE:
                raise Closed(f"message of {hlen + dlen} bytes: the stream is out of step")
            end = PREFIX.size + hlen + dlen
            if len(buf) < end:
                break
            msg = buf[PREFIX.size:end]  # a bytearray of its own (one copy): the arrays view it
            del buf[:end]
            out.append(_decode(msg, hlen, self.loads))
        return out


def _decode(buf: bytearray, hlen: int, loads=json.loads) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    header = loads(bytes(buf[:hlen]))
    arrays = {}
    for name, dtype, shape, offset, nbytes in header.pop("cols", ()):
        dt = np.dtype(dtype)
        arrays[name] = np.frombuffer(buf, dtype=dt, count=nbytes // dt.itemsize if dt.itemsize else 0,
                                     offset=hlen + offset).reshape(shape)
    return header, arrays

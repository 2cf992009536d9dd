"""The device client's retry after a lost connection, against a real TCP server that misbehaves on
purpose: a POST that may have been applied is never sent twice; a prediction (the same twice is the
same) is retried once; a keep-alive connection the server closed while idle is not used again."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from device_bridge.client import DeviceClient
from device_bridge.errors import DeviceUnreachableError


class Server:
    """Reads whole HTTP requests and counts them. ``mode``: 'drop' closes each connection after
    reading its request, without an answer (a server that applied it and died, or a connection cut
    after the request went out); 'idle_close' answers 200 with keep-alive, then closes the
    connection when it has been idle ``idle_s`` (a server's keep-alive timeout), throwing away
    what comes after."""

    def __init__(self, mode: str, idle_s: float = 0.1):
        self.mode, self.idle_s = mode, idle_s
        self.requests: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket, buf: bytes) -> tuple[str | None, bytes]:
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None, buf
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        length = next((int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")), 0)
        while len(rest) < length:
            data = conn.recv(65536)
            if not data:
                return None, rest
            rest += data
        return lines[0], rest[length:]

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                if self.mode == "idle_close":
                    conn.settimeout(self.idle_s)
                try:
                    line, buf = self._read_request(conn, buf)
                except TimeoutError:
                    # idle too long: closed, as a server's keep-alive timeout does. Its FIN goes now;
                    # what the client sends after it is read and thrown away (over a real network the
                    # client's whole request is out before the closed socket's reset comes back)
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(1.0)
                    try:
                        while conn.recv(65536):
                            pass
                    except OSError:
                        pass
                    return
                if line is None:
                    return
                self.requests.append(line)
                if self.mode == "drop":
                    return
                body = b'{"recorded": 1, "unknown": 0}'
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(request):
    s = Server(request.param)
    yield s
    s.close()


@pytest.mark.parametrize("server", ["drop"], indirect=True)
def test_a_post_that_may_have_been_applied_is_not_sent_twice(server):
    c = DeviceClient(server.url, "t", timeout=5)
    with pytest.raises(DeviceUnreachableError, match="may or may not have been applied: check before sending it"):
        c.outcomes("m", [{"request_id": "r1", "label": 1}])
    assert server.requests == ["POST /v1/models/m/outcomes HTTP/1.1"]  # once: outcomes are appended


@pytest.mark.parametrize("server", ["drop"], indirect=True)
def test_a_prediction_is_retried_once(server):
    c = DeviceClient(server.url, "t", timeout=5)
    with pytest.raises(DeviceUnreachableError, match="connection lost"):
        c.predict("m", rows=[{"x": 1.0}])
    assert server.requests == ["POST /v1/models/m/predict HTTP/1.1"] * 2


@pytest.mark.parametrize("server", ["idle_close"], indirect=True)
def test_a_connection_the_server_closed_while_idle_is_not_reused(server):
    c = DeviceClient(server.url, "t", timeout=5)
    assert c.outcomes("m", [{"request_id": "r1", "label": 1}]) == {"recorded": 1, "unknown": 0}
    time.sleep(0.5)  # the server closes the kept-alive connection after 0.1 s idle
    assert c.outcomes("m", [{"request_id": "r2", "label": 0}]) == {"recorded": 1, "unknown": 0}
    assert len(server.requests) == 2

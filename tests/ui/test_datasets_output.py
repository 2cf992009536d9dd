"""What a notebook shows for ``mlsql.datasets.load(...)`` as a cell's last line, in a real kernel:
the tables it created, and when they were already in the workspace, which ones (not ``[]``)."""

from __future__ import annotations

import os


def _result(kc, code: str) -> str:
    shown = []

    def hook(msg):
        if msg["msg_type"] == "execute_result":
            shown.append(msg["content"]["data"]["text/plain"])
        elif msg["msg_type"] == "error":
            shown.append("ERROR " + msg["content"]["evalue"])

    reply = kc.execute_interactive(code, timeout=120, output_hook=hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "\n".join(shown)


def test_load_says_what_it_created_and_what_was_already_there(tmp_path):
    from jupyter_client.manager import start_new_kernel

    ws = tmp_path / "ws"
    km, kc = start_new_kernel(kernel_name="python3", env=dict(os.environ, MLSQL_HOME=str(ws)))
    try:
        first = _result(kc, "import mlsql.datasets\nmlsql.datasets.load('penguins')")
        assert first == "Created table penguins from data set penguins.", first
        again = _result(kc, "mlsql.datasets.load('penguins')")
        assert again == (f"Table penguins was already in the workspace {ws}: nothing loaded "
                         "(replace=True loads it again)."), again
        # still the list of the tables it created, for code that used it as one
        assert _result(kc, "r = mlsql.datasets.load('penguins'); (r == [], r.existing)") == "(True, ['penguins'])"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

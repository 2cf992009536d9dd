"""One workspace, many processes: kernels, the CLI and scripts write and read it at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mlsql.errors import MLSQLError, WorkspaceError


def _kernel(ws):
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "MLSQL_HOME": str(ws)}
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    return km, kc


def _run(kc, code: str, timeout: float = 120) -> tuple[str, list[str]]:
    """Execute in a kernel; its stdout and the names of any errors."""
    out, errors = [], []

    def hook(msg):
        t, c = msg["msg_type"], msg["content"]
        if t == "stream":
            out.append(c["text"])
        elif t == "error":
            errors.append(f"{c['ename']}: {c['evalue']}")
        elif t in ("execute_result", "display_data", "update_display_data") and "text/plain" in c.get("data", {}):
            out.append(c["data"]["text/plain"])

    kc.execute_interactive(code, output_hook=hook, timeout=timeout)
    return "".join(out), errors


def test_two_kernels_and_the_cli_share_one_workspace(tmp_path):
    ws = tmp_path / "ws"
    kernels = [_kernel(ws) for _ in range(2)]
    try:
        for i, (_, kc) in enumerate(kernels):
            out, err = _run(kc, "import mlsql\ns = mlsql.connect()\n"
                                f"s.sql('CREATE TABLE IF NOT EXISTS k{i} (i INTEGER)'); print('ready')")
            assert err == [] and "ready" in out, err
        # both kernels write in a loop while the CLI writes too, all at once
        loop = "import threading\nfor j in range(150):\n    s.sql(f'INSERT INTO k{i} VALUES ({{j}})')\nprint('wrote')"
        msg_ids = [kc.execute(loop.format(i=i)) for i, (_, kc) in enumerate(kernels)]
        script = tmp_path / "cli.sql"
        script.write_text("CREATE TABLE cli AS SELECT range AS i FROM range(100);\n"
                          + "".join(f"INSERT INTO cli VALUES ({1000 + j});\n" for j in range(100))
                          + "SELECT count(*) AS n FROM cli;\n")
        cli = subprocess.run([sys.executable, "-m", "mlsql.cli", "run", str(script), "--workspace", str(ws)],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr
        for (_, kc), mid in zip(kernels, msg_ids):
            while True:
                reply = kc.get_shell_msg(timeout=300)
                if reply["parent_header"].get("msg_id") == mid:
                    assert reply["content"]["status"] == "ok", reply["content"]
                    break
        # each process sees everything every other one wrote
        out, err = _run(kernels[0][1], "print(s.sql('SELECT (SELECT count(*) FROM k0), (SELECT count(*) FROM k1), "
                                       "(SELECT count(*) FROM cli)').fetchall())")
        assert err == [] and "[(150, 150, 200)]" in out, (out, err)
        out, err = _run(kernels[1][1], "print(s.sql('SELECT count(DISTINCT i) FROM k0').scalar())")
        assert err == [] and "150" in out
    finally:
        for km, kc in kernels:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


HOLDER = """
import mlsql, sys
s = mlsql.connect(sys.argv[1])
s.sql("CREATE TABLE IF NOT EXISTS kept AS SELECT range AS i FROM range(1000)")
print("holding", flush=True)
# a long write: a hundred million rows, cross-joined, in one statement
s.sql("CREATE TABLE half AS SELECT a.range * b.range AS x FROM range(20000) a, range(20000) b")
"""


def _start_holder(tmp_path, ws):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(ws)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "MLSQL_PROCESS": "the holder test script"})
    assert p.stdout.readline().strip() == "holding"
    time.sleep(1.0)  # inside the long statement now
    return p


def test_a_process_killed_while_holding_the_catalog_leaves_it_consistent(tmp_path):
    import mlsql

    ws = tmp_path / "ws"
    p = _start_holder(tmp_path, ws)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    s = mlsql.connect(ws)
    try:
        assert s.sql("SELECT count(*) FROM kept").scalar() == 1000  # what was committed before is there
        assert not s.engine.has_relation("half")  # the killed statement left nothing half-written
        s.sql("CREATE TABLE after_kill AS SELECT 1 AS x")
        assert s.sql("SELECT x FROM after_kill").scalar() == 1
    finally:
        s.close()


def test_a_wait_that_runs_out_names_the_holder(tmp_path):
    import mlsql

    ws = tmp_path / "ws"
    p = _start_holder(tmp_path, ws)
    try:
        waits = []
        s = mlsql.connect(ws)
        s.engine.lock_timeout = 1.5
        s.engine.on_wait = lambda msg, waited: waits.append((msg, waited))
        t0 = time.monotonic()
        with pytest.raises(WorkspaceError) as info:
            s.sql("SELECT 42")
        assert 1.4 < time.monotonic() - t0 < 5
        msg = str(info.value)
        assert "the holder test script" in msg and f"pid {p.pid}" in msg and msg.startswith("Waited "), msg
        assert waits and "Waiting for the workspace catalog: the holder test script" in waits[0][0]
        assert isinstance(info.value, MLSQLError)
    finally:
        p.kill()
        p.wait()
    # the holder is gone: the same session goes on
    assert s.sql("SELECT count(*) FROM kept").scalar() == 1000
    s.close()


def test_an_idle_session_lets_go_of_the_catalog(tmp_path):
    """A kernel that is not running a statement never keeps others waiting for long."""
    import mlsql

    a = mlsql.connect(tmp_path / "ws")
    a.sql("CREATE TABLE t AS SELECT 1 AS x")
    assert a.engine.attached  # kept for the next statement
    time.sleep(0.6)
    assert not a.engine.attached  # and let go once idle
    out = subprocess.run([sys.executable, "-m", "mlsql.cli", "run", "-e", "SELECT x + 1 AS y FROM t",
                          "--workspace", str(tmp_path / "ws")], capture_output=True, text=True, timeout=120)
    # the value on a line of its own (the footer's timing, "102.7 ms", holds a 2 whatever the answer)
    assert out.returncode == 0 and "2" in out.stdout.splitlines(), (out.stdout, out.stderr)
    assert a.sql("SELECT count(*) FROM t").scalar() == 1
    a.close()


def test_engines_are_found_by_name(tmp_path):
    import mlsql

    with pytest.raises(MLSQLError, match="Did you mean 'duckdb'") as info:
        mlsql.connect(tmp_path / "ws", engine="duckbd")
    assert "Available engines: duckdb" in str(info.value)
    assert not (tmp_path / "ws").exists()  # nothing made for a session that could not start


def test_a_notebook_cell_shows_whom_it_waits_for(tmp_path):
    ws = tmp_path / "ws"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import mlsql, sys, time
            s = mlsql.connect(sys.argv[1])
            with s.engine.holding():
                print("holding", flush=True)
                time.sleep(4)
        """), str(ws)], stdout=subprocess.PIPE, text=True, env={**os.environ, "MLSQL_PROCESS": "the nightly import"})
    km, kc = _kernel(ws)
    try:
        _run(kc, "%load_ext mlsql")
        assert holder.stdout.readline().strip() == "holding"
        out, err = _run(kc, "%mlsql SELECT 42 AS answer")
        assert err == [] and "42" in out, (out, err)
        assert "Waiting for the workspace catalog: the nightly import" in out, out
        assert re.search(r"Waited \d+ s for the workspace catalog: the nightly import", out), out
    finally:
        holder.kill()
        kc.stop_channels()
        km.shutdown_kernel(now=True)

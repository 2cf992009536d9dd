"""Alerts: CREATE ALERT's query checked through a real session process, notifications sent by
apprise to a real local HTTP server (the JSON webhook), retries and failures recorded, the
history, SHOW ALERTS, the CLI, and the scheduler process firing an alert on its schedule."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import duckdb
import pytest
from jobhelpers import mlsql_cli, wait_for

from mlsql.errors import AlertError, OptionError, ParseError, UnknownAlertError

SCORES = [("m1", 0.95), ("m2", 0.61), ("m3", 0.42), ("m4", 0.88), ("m5", 0.69)]
BOUND = 0.7


class Hook:
    """A JSON webhook on loopback: records every POST; answers with the next of ``codes`` (then 200)."""

    def __init__(self, codes=(), port: int = 0):
        self.posts: list[dict] = []
        self.codes = list(codes)
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hook.posts.append({"path": self.path, "type": self.headers.get("Content-Type"),
                                   "json": json.loads(body), "at": time.monotonic()})
                self.send_response(hook.codes.pop(0) if hook.codes else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"json://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


@pytest.fixture
def session(ws):
    import mlsql

    s = mlsql.connect(ws.root)
    s.sql("CREATE TABLE scores (model VARCHAR, accuracy DOUBLE)")
    s.sql("INSERT INTO scores VALUES " + ", ".join(f"('{m}', {a})" for m, a in SCORES))
    yield s
    s.close()


def _low_by_hand() -> list[dict]:
    """The rows the alert's query should return, worked out by raw DuckDB without MLSQL."""
    con = duckdb.connect()
    con.execute("CREATE TABLE scores (model VARCHAR, accuracy DOUBLE)")
    con.executemany("INSERT INTO scores VALUES (?, ?)", SCORES)
    rows = con.execute(f"SELECT model, accuracy FROM scores WHERE accuracy < {BOUND} ORDER BY accuracy").fetchall()
    return [{"model": m, "accuracy": a} for m, a in rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history(s, name):
    return s.sql(f"SELECT * FROM ML.ALERT_HISTORY('{name}')").to_arrow().to_pylist()


def test_a_fired_alert_reaches_a_json_webhook_with_its_rows(session, hook):
    s = session
    low = _low_by_hand()
    assert len(low) == 3
    r = s.sql(f"""CREATE ALERT low_acc OPTIONS (every = '5 minutes', notify = ['{hook.url}'], max_rows = 2,
                  cooldown = '1h')
                  AS (SELECT model, accuracy FROM scores WHERE accuracy < {BOUND} ORDER BY accuracy)""")
    assert "Created alert low_acc (every 5m)" in r.message and "CHECK ALERT low_acc" in r.message
    checked = s.sql("CHECK ALERT low_acc")
    assert checked.message == "Alert low_acc fired (3 rows); notified in 1 attempt."
    (post,) = hook.posts
    assert post["path"] == "/hook" and post["type"] == "application/json"
    body = post["json"]
    assert body["title"] == "MLSQL alert low_acc: 3 rows"
    assert "Alert low_acc fired: its query returned 3 rows" in body["message"]
    lines = body["message"].split("\n\n", 1)[1].splitlines()
    assert [json.loads(x) for x in lines[:2]] == low[:2] and lines[2] == "... 1 more"  # max_rows = 2
    (h,) = _history(s, "low_acc")
    assert (h["status"], h["rows"], h["fired"], h["notified"], h["attempts"], h["error"], h["trigger"]) == \
        ("fired", 3, True, True, 1, None, "manual")
    assert json.loads(h["preview"]) == low[:2]
    # within the cooldown: recorded as fired, not sent again
    assert "within its cooldown" in s.sql("CHECK ALERT low_acc").message
    assert len(hook.posts) == 1
    assert [(x["status"], x["fired"], x["notified"]) for x in _history(s, "low_acc")] == \
        [("cooldown", True, False), ("fired", True, True)]
    shown = s.sql("SHOW ALERTS").to_arrow().to_pylist()
    assert [(a["alert"], a["every"], a["notify"], a["fired_count"], a["last_status"]) for a in shown] == \
        [("low_acc", "5m", [hook.url], 2, "cooldown")]
    assert shown[0]["last_fired"] == _history(s, "low_acc")[0]["checked_at"]
    # a query without rows: checked, recorded, nothing sent
    s.sql(f"CREATE ALERT quiet OPTIONS (every = '1h', notify = '{hook.url}') AS (SELECT * FROM scores WHERE "
          "accuracy > 1)")
    assert s.sql("CHECK ALERT quiet").message == "Alert quiet: its query returned no rows; nothing sent."
    assert len(hook.posts) == 1
    assert [(x["status"], x["rows"], x["fired"], x["notified"]) for x in _history(s, "quiet")] == [("ok", 0, False, False)]
    assert {x["alert"] for x in s.sql("SELECT alert FROM ML.ALERT_HISTORY()").to_arrow().to_pylist()} == \
        {"low_acc", "quiet"}
    s.sql("DROP ALERT quiet")
    assert [a["alert"] for a in s.sql("SHOW ALERTS").to_arrow().to_pylist()] == ["low_acc"]


def test_a_500_is_retried_with_backoff_and_the_attempts_recorded(session):
    hook = Hook(codes=[500, 500])
    try:
        session.sql(f"CREATE ALERT a OPTIONS (every = '1h', notify = ['{hook.url}'], retries = 2, "
                    "retry_backoff = '0.3s') AS (SELECT * FROM scores WHERE accuracy < 0.5)")
        r = session.sql("CHECK ALERT a")
        assert r.message == "Alert a fired (1 row); notified in 3 attempts."  # the last retry allowed
        assert len(hook.posts) == 3 and hook.posts[0]["json"] == hook.posts[2]["json"]
        (h,) = _history(session, "a")
        assert (h["notified"], h["attempts"], h["error"]) == (True, 3, None)
        at = [p["at"] for p in hook.posts]
        assert at[1] - at[0] >= 0.3 and at[2] - at[1] >= 0.6  # the waits before the retries: 0.3 s, doubled
    finally:
        hook.close()


def test_a_webhook_that_is_down_is_recorded_and_the_next_check_tries_again(session):
    port = _free_port()
    url = f"json://127.0.0.1:{port}/hook"
    session.sql(f"CREATE ALERT a OPTIONS (every = '1h', notify = ['{url}'], retries = 1, retry_backoff = '0.1s') "
                f"AS (SELECT * FROM scores WHERE accuracy < {BOUND})")
    r = session.sql("CHECK ALERT a")
    assert r.message.startswith("Alert a fired (3 rows); NOT notified.\nNotification failed after 2 attempts: "
                                f"{url}: ")
    (h,) = _history(session, "a")
    assert (h["status"], h["fired"], h["notified"], h["attempts"]) == ("fired", True, False, 2)
    assert "Connection error" in h["error"]
    (shown,) = session.sql("SHOW ALERTS").to_arrow().to_pylist()
    assert shown["last_error"] == h["error"]
    hook = Hook(port=port)  # the webhook is back: the next check sends
    try:
        assert session.sql("CHECK ALERT a").message == "Alert a fired (3 rows); notified in 1 attempt."
        assert len(hook.posts) == 1 and hook.posts[0]["json"]["title"] == "MLSQL alert a: 3 rows"
    finally:
        hook.close()


def test_a_query_that_fails_is_recorded_and_notified(session, hook):
    session.sql(f"CREATE ALERT gone OPTIONS (every = '1h', notify = ['{hook.url}']) AS (SELECT * FROM temp_scores)")
    session.sql("CREATE TABLE temp_scores AS SELECT 1 AS x")
    assert "fired (1 row)" in session.sql("CHECK ALERT gone").message
    session.sql("DROP TABLE temp_scores")
    r = session.sql("CHECK ALERT gone")
    assert r.message.startswith("Alert gone could not be checked: its query failed; notified in 1 attempt.")
    h = _history(session, "gone")[0]
    assert (h["status"], h["rows"], h["fired"], h["notified"]) == ("query_failed", None, False, True)
    assert "temp_scores" in h["error"]
    assert hook.posts[-1]["json"]["title"] == "MLSQL alert gone: its check failed"
    assert "temp_scores" in hook.posts[-1]["json"]["message"]


def test_alert_statement_errors_and_masked_secrets(session, hook):
    s = session
    with pytest.raises(OptionError, match="notify"):
        s.sql("CREATE ALERT a OPTIONS (every = '1h') AS (SELECT 1)")
    with pytest.raises(OptionError, match="not a URL apprise can send to"):
        s.sql("CREATE ALERT a OPTIONS (every = '1h', notify = ['nosuchservice://x']) AS (SELECT 1)")
    with pytest.raises(OptionError, match="not a notification URL"):
        s.sql("CREATE ALERT a OPTIONS (every = '1h', notify = ['somewhere']) AS (SELECT 1)")
    with pytest.raises(OptionError, match="every"):
        s.sql(f"CREATE ALERT a OPTIONS (every = 'often', notify = ['{hook.url}']) AS (SELECT 1)")
    with pytest.raises(ParseError, match="SELEC"):
        s.sql(f"CREATE ALERT a OPTIONS (every = '1h', notify = ['{hook.url}']) AS (SELEC 1)")
    with pytest.raises(AlertError, match="one query, got 2 statements"):
        s.sql(f"CREATE ALERT a OPTIONS (every = '1h', notify = ['{hook.url}']) AS (SELECT 1; SELECT 2)")
    with pytest.raises(AlertError, match="must be a query"):
        s.sql(f"CREATE ALERT a OPTIONS (every = '1h', notify = ['{hook.url}']) AS (DELETE FROM scores)")
    assert s.sql("SHOW ALERTS").to_arrow().num_rows == 0  # nothing half-made
    secret_urls = ["mailto://bob:hunter2@example.com", "json://alice:s3cret@127.0.0.1:9/hook",
                   "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ"]
    s.sql(f"CREATE ALERT noisy OPTIONS (every = '1h', notify = {secret_urls!r}) AS (SELECT 1)")
    shown = json.dumps(s.sql("SHOW ALERTS").to_arrow().to_pylist(), default=str)
    described = json.dumps(s.sql("DESCRIBE ALERT noisy").fetchall())
    for text in (shown, described):
        for secret in ("hunter2", "s3cret", "TIiajkdnlazkcOXrIdevi7FQ"):
            assert secret not in text
        assert "mailto://bob:****@example.com" in text and "json://alice:****@127.0.0.1:9/hook" in text
    with pytest.raises(AlertError, match="CREATE OR REPLACE ALERT"):
        s.sql(f"CREATE ALERT noisy OPTIONS (every = '1h', notify = ['{hook.url}']) AS (SELECT 1)")
    s.sql(f"CREATE OR REPLACE ALERT noisy OPTIONS (every = '2h', notify = ['{hook.url}']) AS (SELECT 1)")
    assert s.sql("SHOW ALERTS").to_arrow().column("every").to_pylist() == ["2h"]
    with pytest.raises(UnknownAlertError, match="Did you mean 'noisy'"):
        s.sql("CHECK ALERT nosy")
    assert "nothing dropped" in s.sql("DROP ALERT IF EXISTS nosy").message


def test_the_cli_checks_now_and_lists(ws, session, hook):
    session.sql(f"CREATE ALERT low OPTIONS (every = '1h', notify = ['{hook.url}']) "
                f"AS (SELECT * FROM scores WHERE accuracy < {BOUND})")
    out = mlsql_cli("alerts", "check", "low", "--workspace", ws.root)
    assert out.returncode == 0, out.stderr
    assert "fired" in out.stdout and len(hook.posts) == 1
    listed = mlsql_cli("alerts", "list", "--workspace", ws.root)
    assert listed.returncode == 0 and "low" in listed.stdout and "No scheduler is running" in listed.stdout
    session.sql(f"CREATE OR REPLACE ALERT low OPTIONS (every = '1h', notify = ['json://127.0.0.1:{_free_port()}/x'],"
                " retries = 0) AS (SELECT * FROM scores)")
    down = mlsql_cli("alerts", "check", "low", "--workspace", ws.root)
    assert down.returncode == 1 and "Notification failed after 1 attempt" in down.stderr
    history = mlsql_cli("alerts", "history", "low", "--workspace", ws.root).stdout
    assert history.count("manual") == 2 and "Connection" in history  # history outlives a REPLACE


def test_the_scheduler_process_fires_an_alert_on_its_schedule(tmp_path, ws, session, hook):
    session.sql(f"CREATE ALERT tick OPTIONS (every = '2s', notify = ['{hook.url}']) "
                f"AS (SELECT model FROM scores WHERE accuracy < {BOUND})")
    env = {k: v for k, v in os.environ.items() if k != "MLSQL_HOME"}
    log = tmp_path / "scheduler.log"
    proc = subprocess.Popen([sys.executable, "-m", "mlsql.cli", "scheduler", "--workspace", str(ws.root)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    try:
        wait_for(lambda: len(hook.posts) >= 2, 60, "two scheduled notifications")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    from mlsql.jobs.alerts import AlertStore
    from mlsql.jobs.store import _parse

    checks = _history(session, "tick")
    assert {c["trigger"] for c in checks} == {"schedule"}
    # a check that came round while the previous one still ran (a slow machine) is recorded as skipped
    fired = [c for c in checks if c["status"] != "skipped"]
    assert len(fired) >= 2 and all(c["status"] == "fired" and c["rows"] == 3 and c["notified"] for c in fired)
    # on the alert's schedule: every 2 s from its creation (APScheduler starts a job within a few ms)
    start = _parse(AlertStore(ws).get("tick").updated_at)
    for c in checks:
        offset = (c["checked_at"] - start).total_seconds()
        assert offset >= 1.9 and abs(offset - 2 * round(offset / 2)) < 0.3, offset
    text = log.read_text()
    assert "alert tick scheduled (every 2s)" in text and "alert tick check" in text and "Traceback" not in text


def test_apprise_loads_only_to_send(ws):
    """%load_ext mlsql, the scheduler's module and a statement about alerts leave apprise unimported."""
    code = ("import sys, mlsql, mlsql.notebook.magic, mlsql.jobs.scheduler\n"
            f"s = mlsql.connect({str(ws.root)!r}); s.sql('SHOW ALERTS'); s.sql('SELECT * FROM ML.ALERT_HISTORY()')\n"
            "print('apprise' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]

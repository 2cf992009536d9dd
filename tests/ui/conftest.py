"""Fixtures for tests that drive a real JupyterLab in a real browser.

``lab_server``  a ``jupyter lab`` process (this venv's, with the ``mlsql.notebook.server`` extension and
                whatever labextensions are installed), on a free port with a token, serving a temp
                root dir, with ``MLSQL_HOME`` set to a temp workspace: (url, token, root_dir).
                One per test session; ``lab_workspace`` is its workspace folder.
``local_agent`` a real device agent process (``mlsql device serve``) trusting that workspace's
                key, registered in the workspace as device ``local``: (name, url, token).
``browser_page`` a Playwright page in Debian's chromium (never a downloaded browser), logged in
                to ``lab_server``; one browser per session, a fresh context per test.

Without chromium or Playwright the browser tests are skipped with the reason; with
``MLSQL_REQUIRE_BROWSER=1`` (CI) that is a failure instead.
Screenshots go to ``tests/ui/artifacts/`` (``ARTIFACTS``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = os.environ.get("MLSQL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
AGENT_TOKEN = "ui-test-device-token"


def _missing(reason: str):
    if os.environ.get("MLSQL_REQUIRE_BROWSER") == "1":
        pytest.fail(f"MLSQL_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def require_browser() -> None:
    """Skip (or fail under MLSQL_REQUIRE_BROWSER=1) when no browser test can run here."""
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _missing(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright for Python is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def lab_home(tmp_path_factory) -> Path:
    """The temp folder holding the lab's root dir, workspace, settings and logs."""
    return tmp_path_factory.mktemp("lab")


@pytest.fixture(scope="session")
def lab_workspace(lab_home) -> Path:
    """MLSQL_HOME of the lab's kernels and server extension."""
    ws = lab_home / "ws"
    ws.mkdir(exist_ok=True)
    return ws


@contextlib.contextmanager
def running_lab(home: Path, workspace: Path, root: Path | None = None):
    """A real ``jupyter lab`` with the mlsql server extension, its settings and logs in ``home``,
    ``MLSQL_HOME`` = ``workspace``, serving ``root`` (default ``home/root``): (url, token, root)."""
    root = root or home / "root"
    root.mkdir(parents=True, exist_ok=True)
    settings = home / "settings"
    # no "would you like news?" toast over the screenshots
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True, exist_ok=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = free_port(), "mlsql-ui-test-token"
    env = dict(os.environ, MLSQL_HOME=str(workspace), JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
               PYTHONUNBUFFERED="1")
    env.pop("JUPYTER_TOKEN", None)
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}",
            "--ServerApp.jpserver_extensions={'mlsql.notebook.server': True}",
            "--LabApp.news_url=None", "--ServerApp.disable_check_xsrf=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")
    log = home / "lab.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/api/status?token={token}", proc, log)
        yield url, token, root
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def lab_server(lab_home, lab_workspace):
    """A real ``jupyter lab`` with the mlsql server extension: yields (url, token, root_dir)."""
    with running_lab(lab_home, lab_workspace) as lab:
        yield lab


@pytest.fixture(scope="session")
def local_agent(lab_home, lab_workspace):
    """A real device agent trusting the lab workspace's key, registered there as 'local'."""
    import mlsql

    ready = lab_home / "agent.ready.json"
    log = lab_home / "agent.log"
    env = dict(os.environ, MLSQL_HOME=str(lab_workspace))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlsql.cli", "device", "serve", "--name", "local",
                                 "--port", "0", "--token", AGENT_TOKEN, "--ready-file", str(ready)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 60
        info = None
        while info is None:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited:\n{log.read_text()}")
            if time.time() > deadline:
                raise RuntimeError(f"agent did not start:\n{log.read_text()}")
            try:
                data = json.loads(ready.read_text())
                info = (data.get("listening") or data.get("devices") or [data])[0]
            except (OSError, json.JSONDecodeError):
                time.sleep(0.1)
        s = mlsql.connect(lab_workspace)
        try:
            s.sql(f"CREATE OR REPLACE DEVICE 'local' OPTIONS (url = '{info['url']}', token = '{AGENT_TOKEN}')")
        finally:
            s.close()
        yield "local", info["url"], AGENT_TOKEN
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def _browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(_browser, lab_server, request):
    """A fresh Playwright page (1400x900) logged in to ``lab_server`` (the token cookie is set by
    visiting ``/lab?token=``). A failing test leaves ``artifacts/<test>-failed.png``."""
    url, token, _ = lab_server
    ARTIFACTS.mkdir(exist_ok=True)
    context = _browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{url}/lab?token={token}")
    yield page
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        try:
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-failed.png"))
        except Exception:  # the page may be gone with the failure
            pass
    context.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep

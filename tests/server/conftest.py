"""pytest-jupyter's fixtures and hooks for the tests in this folder only. As a plugin
(``pytest_plugins``) they would apply to the whole run: its autouse fixtures give every test an
event loop and a ServerApp singleton to clean up, which breaks the browser tests (Playwright keeps
its own loop running)."""

from pytest_jupyter.jupyter_server import *  # noqa: F401,F403

"""The Jupyter server extension ``mlsql.notebook.server``: runs the workspace's job scheduler while
JupyterLab is up, and serves the REST API of the JupyterLab extension under ``/mlsql/api/``
(:mod:`mlsql.notebook.server.api`, docs/EXTENSION.md).

    jupyter lab --ServerApp.jpserver_extensions="{'mlsql.notebook.server': True}"

The workspace is MLSQL_HOME, else ``.mlsql`` under the server's root_dir. When another
process (``mlsql scheduler``, another server) already schedules it, the server logs who and
goes on without one: jobs still run, there.
"""

from __future__ import annotations

import atexit
import os
import threading
from pathlib import Path

_SCHEDULER_KEY = "mlsql_scheduler"


def _jupyter_server_extension_points():
    return [{"module": "mlsql.notebook.server"}]


def workspace_path(serverapp) -> Path:
    home = os.environ.get("MLSQL_HOME")
    if home:
        return Path(home).expanduser()
    return Path(getattr(serverapp, "root_dir", None) or os.getcwd()).expanduser() / ".mlsql"


def _load_jupyter_server_extension(serverapp) -> None:
    from mlsql.errors import MLSQLError
    from mlsql.jobs.scheduler import Scheduler
    from mlsql.workspace import Workspace

    log = serverapp.log
    try:
        ws = Workspace.open(workspace_path(serverapp))
    except Exception:
        log.exception("MLSQL: the workspace cannot be opened; no MLSQL API or scheduler in this server")
        return
    from mlsql.notebook.server.api import add_handlers

    add_handlers(serverapp, ws)
    try:
        scheduler = Scheduler(ws, who=f"the Jupyter server at {serverapp.root_dir}")
        scheduler.start()
    except MLSQLError as exc:
        log.info("MLSQL: not scheduling jobs in this server: %s", exc.message)
        return
    except Exception:  # the server must come up whatever the scheduler's trouble
        log.exception("MLSQL: the job scheduler could not start")
        return
    serverapp.web_app.settings[_SCHEDULER_KEY] = scheduler
    # a plain extension module gets no stop hook from jupyter_server (only ExtensionApps do):
    # stop with the process, which the server leaves through a normal exit on SIGTERM/Ctrl-C.
    # Before the thread pools shut down (threading's exit hooks run before atexit's, and in
    # reverse order): else APScheduler's next poll meets a closed pool and logs a traceback.
    register = getattr(threading, "_register_atexit", None) or atexit.register
    register(_stop, scheduler, log)
    log.info("MLSQL: scheduling the jobs of workspace %s", ws.root)


def _stop(scheduler, log) -> None:
    if scheduler.running:
        scheduler.shutdown()
        log.info("MLSQL: job scheduler stopped")


def _unload_jupyter_server_extension(serverapp) -> None:
    api = serverapp.web_app.settings.pop("mlsql_api", None)
    if api is not None:
        api.close()
    scheduler = serverapp.web_app.settings.pop(_SCHEDULER_KEY, None)
    if scheduler is not None:
        _stop(scheduler, serverapp.log)


# jupyter_server < 2 looked for these names
load_jupyter_server_extension = _load_jupyter_server_extension
_jupyter_server_extension_paths = _jupyter_server_extension_points

"""``mlsql``: run MLSQL scripts from a shell."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from mlsql import __version__

    parser = argparse.ArgumentParser(prog="mlsql", description="Machine learning in SQL.")
    parser.add_argument("--version", action="version", version=f"mlsql {__version__}")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a script of MLSQL statements and print each result")
    run.add_argument("script", nargs="?", help="a .sql file ('-' for standard input)")
    run.add_argument("-e", "--execute", metavar="SQL", help="run this text instead of a file")
    run.add_argument("--workspace", help="workspace folder (default: MLSQL_HOME or ./.mlsql)")
    run.add_argument("--engine", default="duckdb", help="engine (default: duckdb)")
    run.add_argument("--max-rows", type=int, default=20, help="rows to print per result (default: 20)")
    hub = sub.add_parser("hub", help="the fleet hub devices poll (see docs/DEVICE.md)")
    hub.add_argument("action", choices=["serve", "enroll", "revoke", "publish"],
                     help="serve: run the hub; enroll NAME / revoke NAME: an agent's own hub credential; "
                          "publish DIR: the package blobs as DIR/SHA256, for a static origin")
    hub.add_argument("hub_args", nargs=argparse.REMAINDER,
                     help="serve: --port P --store DIR --token T [--origin URL]; enroll/revoke: NAME --store DIR; "
                          "publish: DIR --store DIR (mlsql-device hub)")
    dev = sub.add_parser("device", help="the local device agent and the workspace's signing key")
    dsub = dev.add_subparsers(dest="action", metavar="{key,serve}")
    key = dsub.add_parser("key", help="print the path of the workspace's public signing key (made on first use)")
    key.add_argument("--workspace", help="workspace folder (default: MLSQL_HOME or ./.mlsql)")
    # serve's own options are mlsql-device serve's: `mlsql device serve --help` lists them
    serve = dsub.add_parser("serve", add_help=False, help="run an agent that trusts this workspace's key")
    serve.add_argument("--workspace", help="workspace folder (default: MLSQL_HOME or ./.mlsql)")
    _add_job_commands(sub)
    args, extra = parser.parse_known_args(argv)
    if extra and not (args.command == "device" and args.action == "serve"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":
        return _run(args)
    if args.command == "hub":
        from device_bridge.cli import main as device_main

        return device_main(["hub", args.action, *args.hub_args]) or 0
    if args.command == "device":
        if args.action is None:
            dev.print_help()
            return 2
        return _device(args, extra)
    if args.command == "alerts":
        if args.action is None:
            print("usage: mlsql alerts {list,check,history,drop} ... (mlsql alerts --help)", file=sys.stderr)
            return 2
        from mlsql.jobs.cli import alerts_main

        return alerts_main(args)
    if args.command in ("scheduler", "jobs"):
        from mlsql.jobs.cli import main as jobs_main

        return jobs_main(args)
    parser.print_help()
    return 2


def _add_job_commands(sub) -> None:
    ws_help = "workspace folder (default: MLSQL_HOME or ./.mlsql)"
    sched = sub.add_parser("scheduler", help="run the workspace's scheduled jobs until stopped (see docs/JOBS.md)",
                           description="Run the jobs of a workspace on their schedules until SIGTERM or "
                                       "Ctrl-C. One scheduler per workspace: a second one exits with status 1 "
                                       "and names the first.")
    sched.add_argument("--workspace", help=ws_help)
    jobs = sub.add_parser("jobs", help="list, inspect, run, pause, resume, drop or export scheduled jobs")
    jsub = jobs.add_subparsers(dest="action", metavar="{list,show,runs,run,pause,resume,drop,export}")
    lst = jsub.add_parser("list", help="every job with its schedule, state, next and last run")
    lst.add_argument("--workspace", help=ws_help)
    for name, text in (("show", "a job's definition and its next run"),
                       ("runs", "a job's run history, newest first"),
                       ("run", "run a job now, here, and wait for it (exit status 1 when it does not succeed)"),
                       ("pause", "stop scheduling a job (its definition and history stay)"),
                       ("resume", "schedule a paused job again"),
                       ("drop", "remove a job and its history (executed notebooks stay on disk)")):
        p = jsub.add_parser(name, help=text)
        p.add_argument("name", help="the job")
        p.add_argument("--workspace", help=ws_help)
        if name == "runs":
            p.add_argument("--limit", type=int, default=20, help="runs to show (default: 20)")
        if name == "drop":
            p.add_argument("--if-exists", action="store_true", help="no error when there is no such job")
    alerts = sub.add_parser("alerts", help="list, check now, show the history of, or drop alerts")
    asub = alerts.add_subparsers(dest="action", metavar="{list,check,history,drop}")
    lst = asub.add_parser("list", help="every alert: interval, where it notifies, last check, last fired, last error")
    lst.add_argument("--workspace", help=ws_help)
    for name, text in (("check", "check an alert now, here, and wait (exit status 1 when its query failed or its "
                                 "notification could not be sent)"),
                       ("history", "an alert's checks, newest first"),
                       ("drop", "remove an alert and its history")):
        p = asub.add_parser(name, help=text)
        p.add_argument("name", help="the alert")
        p.add_argument("--workspace", help=ws_help)
        if name == "history":
            p.add_argument("--limit", type=int, default=20, help="checks to show (default: 20)")
        if name == "drop":
            p.add_argument("--if-exists", action="store_true", help="no error when there is no such alert")
    exp = jsub.add_parser("export", help="print an Airflow DAG or a papermill command that runs the job elsewhere")
    exp.add_argument("name", help="the job")
    exp.add_argument("--format", choices=["airflow", "papermill"], default="papermill",
                     help="airflow: a DAG file; papermill: a command line (default)")
    exp.add_argument("--workspace", help=ws_help)


def _device(args, extra: list[str]) -> int:
    from device_bridge.cli import main as device_main

    if args.action == "serve" and {"-h", "--help"} & set(extra):  # help only: no workspace, no key
        return device_main(["serve", "--help"]) or 0
    from device_bridge.keys import PUBLIC_KEY_FILE, load_or_create_keypair
    from mlsql.workspace import Workspace

    workspace = args.workspace
    ws = Workspace.open(workspace)
    load_or_create_keypair(ws.keys_dir)
    pub = ws.keys_dir / PUBLIC_KEY_FILE
    if args.action == "key":
        print(pub)
        return 0
    name = _flag(extra, "--name")
    if name is None:
        name = "local"
        extra += ["--name", name]
    if _flag(extra, "--store") is None:
        extra += ["--store", str(device_store(ws.root, name))]
    return device_main(["serve", "--trust", str(pub), *extra]) or 0


def _flag(args: list[str], flag: str) -> str | None:
    """The value of ``--flag V`` or ``--flag=V`` among arguments passed through, else None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def device_store(root, name: str):
    """The default store of ``mlsql device serve --name NAME``: one folder per device name, so that
    two devices on one machine never report each other's models. Before, every device used
    ``<workspace>/device``; the ``local`` agent of `make lab` moves its models from there once."""
    from pathlib import Path

    root = Path(root)
    store = root / "devices" / name
    legacy = root / "device"
    if name == "local" and legacy.is_dir() and not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        legacy.rename(store)
        print(f"mlsql device serve: moved the agent store {legacy} to {store}", file=sys.stderr)
    return store


def _run(args) -> int:
    from mlsql.errors import MLSQLError

    if args.execute is not None:
        text = args.execute
    elif args.script in (None, "-"):
        text = sys.stdin.read()
    else:
        try:
            with open(args.script, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            print(f"mlsql: cannot read {args.script}: {exc.strerror}", file=sys.stderr)
            return 2
    try:
        import mlsql

        with mlsql.connect(args.workspace, args.engine) as session:
            session.display_limit = args.max_rows
            session.progress = _TextProgress
            for result in session.iter_execute(text):
                print(result)
                print(flush=True)
    except MLSQLError as exc:
        print(f"mlsql: error: {exc}", file=sys.stderr)
        return 1
    return 0


class _TextProgress:
    def __init__(self, title: str, total: int):
        self.title = title
        self.last = -1

    def update(self, iteration: int, total: int, metrics: dict | None = None) -> None:
        if not sys.stderr.isatty():
            return
        shown = " ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items() if isinstance(v, (int, float)))
        print(f"\r{self.title}: {iteration}/{total} {shown}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if sys.stderr.isatty():
            print(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

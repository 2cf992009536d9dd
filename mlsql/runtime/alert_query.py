"""One alert check's query, in a process of its own: ``python -m mlsql.runtime.alert_query ARGS.json``.

The parent (:func:`mlsql.jobs.alerts.check_alert`) keeps the clock and kills this process on a
timeout. Here a real MLSQL session opens the workspace and runs the query, as a kernel would;
the outcome goes to the result file as JSON: {"rows": n, "columns": [...], "preview": [the
first max_rows rows as objects]} or {"error": "..."}.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _watch_parent(parent: int) -> None:
    """If the process that started us dies (a killed scheduler), stop rather than run on alone."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def check(workspace: str, query: str, max_rows: int) -> dict:
    from mlsql.errors import MLSQLError
    from mlsql.runtime.session import Session

    try:
        s = Session(workspace)
    except MLSQLError as exc:
        return {"error": f"The workspace could not be opened: {exc}"}
    try:
        table = s.sql(query).to_arrow()
    except MLSQLError as exc:
        return {"error": str(exc)}
    except Exception as exc:  # an engine's own error class: say which
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        s.close()
    preview = table.slice(0, max_rows).to_pylist() if max_rows else []
    return {"rows": table.num_rows, "columns": table.column_names, "preview": preview}


def _plain(v):
    """A value of a preview row as JSON has it: decimals as numbers, times in ISO form, bytes in hex."""
    import datetime
    import decimal

    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, datetime.date | datetime.time):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


def main(argv: list[str]) -> int:
    args = json.loads(open(argv[0]).read())
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    outcome = check(args["workspace"], args["query"], int(args.get("max_rows", 5)))
    tmp = args["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(outcome, f, default=_plain)
    os.replace(tmp, args["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One attempt of a job, in a process of its own: ``python -m mlsql.jobs._child ARGS.json``.

The parent (``run_job``) keeps the clock: on a timeout it kills this process and every process
under it, the kernel included. Here papermill runs the notebook, and the outcome goes to the
result file as JSON: {"status": "succeeded" | "failed", "error": str | None}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def clean(text: str) -> str:
    return _ANSI.sub("", text).strip()


def _register_sql_translator() -> None:
    """Parameters for the MLSQL kernel (language 'sql'): a Python cell, which that kernel runs
    when the cell starts with %%python."""
    from papermill.translators import PythonTranslator, papermill_translators

    class MLSQLKernelTranslator(PythonTranslator):
        @classmethod
        def codify(cls, parameters, comment="Parameters"):
            return "%%python\n" + super().codify(parameters, comment)

    papermill_translators.register("sql", MLSQLKernelTranslator)


def _watch_parent(parent: int) -> None:
    """If the process that started us dies (a killed scheduler), stop the run and its kernel
    instead of leaving them behind."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            try:
                import psutil

                for p in psutil.Process().children(recursive=True):
                    p.kill()
            finally:
                os._exit(3)


def failure_in(nb) -> str | None:
    """The error of a notebook papermill executed, or None when every cell ran.

    A failing ``%%mlsql`` raises IPython's UsageError, which the kernel prints to stderr
    instead of an error output: papermill then marks the cell but raises nothing, so the
    marks are what tells a failed run from a good one."""
    meta = nb.get("metadata", {}).get("papermill", {})
    failed = [i for i, c in enumerate(nb.cells) if c.get("metadata", {}).get("papermill", {}).get("exception")]
    if not failed and not meta.get("exception"):
        return None
    for i in failed:
        cell = nb.cells[i]
        where = f"Cell [{cell.get('execution_count')}]" if cell.get("execution_count") else "A cell"
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            e = errors[-1]
            return clean(f"{where}: {e.get('ename')}: {e.get('evalue')}")
        stderr = "".join(o.get("text", "") for o in cell.get("outputs", [])
                         if o.get("output_type") == "stream" and o.get("name") == "stderr")
        if stderr.strip():
            return f"{where}: {clean(stderr)}"
        return f"{where} failed without an error message"
    return "The notebook stopped with an error"


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as f:
        args = json.load(f)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    result: dict = {"status": "failed", "error": None}
    # jsonschema (under nbformat) builds an IRI grammar for 3 s at import when rfc3987_syntax is
    # installed; notebooks never use that format, and every run would pay it
    sys.modules.setdefault("rfc3987_syntax", None)
    try:
        import nbformat
        import papermill
        from papermill.exceptions import PapermillExecutionError

        _register_sql_translator()
        try:
            papermill.execute_notebook(
                args["input"], args["output"], parameters=args["parameters"], kernel_name=args["kernel"],
                cwd=args["cwd"], progress_bar=False, log_output=False, request_save_on_cell_execute=True,
                autosave_cell_every=5)
            raised = None
        except PapermillExecutionError as exc:
            raised = clean(f"Cell [{exc.exec_count}]: {exc.ename}: {exc.evalue}")
        try:
            error = failure_in(nbformat.read(args["output"], as_version=4))
        except (OSError, ValueError):
            error = None
        error = error or raised
        result = {"status": "failed" if error else "succeeded", "error": error}
    except Exception as exc:  # the kernel is missing, died, the notebook is unreadable...
        msg = clean(str(exc)) or type(exc).__name__
        result["error"] = f"{type(exc).__name__}: {msg}"
    tmp = args["result"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, args["result"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

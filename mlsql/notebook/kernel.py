"""The MLSQL Jupyter kernel: every cell is MLSQL, IPython underneath.

- A cell is MLSQL, run as ``%%mlsql``.
- ``%%python`` as a cell's first line: the rest of the cell is Python, run in the kernel's
  own namespace (variables, DataFrames and widgets work as in the Python kernel).
- ``%python <code>`` (or ``%py <code>``) as a line inside an MLSQL cell: that line is
  Python, run in order between the cell's statements: ``%python m = 12`` then
  ``SELECT {m}``.
- Any other cell that starts with ``%``, ``!`` or ``?`` runs as IPython (``%pip``,
  ``%config MLSQLMagic.displaylimit = 50``).

Errors name the line of the cell, as the cell reads.

    python -m mlsql.notebook.kernel install [--user | --sys-prefix | --prefix DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ipykernel.ipkernel import IPythonKernel

SPEC_DIR = Path(__file__).resolve().parents[2] / "kernels" / "mlsql"


class MLSQLKernel(IPythonKernel):
    implementation = "mlsql"
    implementation_version = "0.1.0"
    language_info = {
        "name": "sql",
        "mimetype": "text/x-sql",
        "file_extension": ".sql",
        "codemirror_mode": "sql",
        "pygments_lexer": "sql",
    }
    banner = "MLSQL: machine learning in SQL (cells are %%mlsql; %-prefixed cells are IPython)"

    mlsql_native = True  # the magic's hooks for the Python kernel stay out: do_complete/do_inspect are ours

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shell.run_line_magic("load_ext", "mlsql")
        self.magic = self.shell.magics_manager.registry["MLSQLMagic"]

    def do_complete(self, code, cursor_pos):
        from mlsql.notebook.completion import complete

        view = sql_view(code, cursor_pos)
        if view is None:
            line = python_line_at(code, cursor_pos)
            if line is None:
                return super().do_complete(code, cursor_pos)
            start, end = line  # a %python line: complete its Python, then count from the cell again
            reply = super().do_complete(code[start:end], (cursor_pos if cursor_pos is not None else len(code)) - start)
            reply["cursor_start"] += start
            reply["cursor_end"] += start
            for t in reply.get("metadata", {}).get("_jupyter_types_experimental", []):
                t["start"] += start
                t["end"] += start
            return reply
        sql, session = view[0], self._session(view[1])
        return {"status": "ok", **complete(sql, cursor_pos, session)}

    def do_inspect(self, code, cursor_pos, detail_level=0, omit_sections=()):
        from mlsql.notebook.completion import inspect

        view = sql_view(code, cursor_pos)
        if view is None:
            return super().do_inspect(code, cursor_pos, detail_level, omit_sections)
        return {"status": "ok", **inspect(view[0], cursor_pos, self._session(view[1]), detail_level)}

    def _session(self, options: str):
        from mlsql.notebook.completion import _magic_session

        return _magic_session(self.magic, options)

    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, **kwargs):
        # where an error's line is in the cell: a cell is all SQL (line 1 is the SQL's line 1)
        # unless it starts with its own %%mlsql line
        stripped = code.lstrip()
        self.magic.cell_line_offset = (code.count("\n", 0, len(code) - len(stripped)) + 1
                                       if stripped.startswith("%%mlsql") else 0)
        return await super().do_execute(as_python(code), silent, store_history, user_expressions, allow_stdin,
                                        **kwargs)


_PY_LINE = ("%python ", "%py ")


def as_python(cell: str) -> str:
    """The IPython code that runs an MLSQL kernel cell (see the module docstring)."""
    stripped = cell.lstrip()
    first = stripped.split("\n", 1)[0].strip()
    if first == "%%python":
        return stripped.split("\n", 1)[1] if "\n" in stripped else ""
    if not stripped:
        return cell
    lines = cell.split("\n")
    if not any(ln.lstrip().startswith(_PY_LINE) for ln in lines):
        if stripped[0] in "%!?":
            return cell
        return "%%mlsql\n" + cell
    # a mixed cell: Python lines and SQL runs, in order; each SQL run keeps its lines' numbers
    # (blank lines in front), so an error names the line of the cell
    out: list[str] = []
    sql: list[str] = []
    first_sql = 0

    def flush(last: bool) -> None:
        if any(s.strip() for s in sql):
            text = "\n" * first_sql + "\n".join(sql)
            call = f"get_ipython().run_cell_magic('mlsql', '', {text!r})"
            out.append(call if last else f"{call};")  # only the cell's last result is shown
        sql.clear()

    for i, ln in enumerate(lines):
        head = ln.lstrip()
        if head.startswith(_PY_LINE):
            flush(last=False)
            out.append(head.split(" ", 1)[1])
        else:
            if not sql:
                first_sql = i
            sql.append(ln)
    flush(last=True)
    return "\n".join(out)


def sql_view(cell: str, cursor_pos: int | None) -> tuple[str, str] | None:
    """A cell as completion sees it: the SQL with Python lines (and a ``%%mlsql`` line) blanked
    to spaces, so offsets stay the cell's, and that line's options; None where the cursor is in
    Python or IPython (a ``%%python`` cell, a ``%python`` line, a ``%``/``!``/``?`` cell)."""
    cursor = len(cell) if cursor_pos is None else cursor_pos
    stripped = cell.lstrip()
    options = ""
    lines = cell.split("\n")
    if stripped.startswith("%%mlsql"):
        first = next(i for i, ln in enumerate(lines) if ln.strip())
        options = lines[first].strip()[len("%%mlsql"):]
        lines[first] = " " * len(lines[first])
    elif stripped.startswith(("%%python", "%", "!", "?")) and not stripped.startswith(_PY_LINE):
        return None
    at = cell.count("\n", 0, cursor)
    out = []
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith(_PY_LINE):
            if i == at:
                return None
            ln = " " * len(ln)
        out.append(ln)
    return "\n".join(out), options


def python_line_at(cell: str, cursor_pos: int | None) -> tuple[int, int] | None:
    """Where the Python of the ``%python`` line under the cursor starts and ends, or None."""
    cursor = len(cell) if cursor_pos is None else cursor_pos
    a = cell.rfind("\n", 0, cursor) + 1
    b = cell.find("\n", cursor)
    b = len(cell) if b < 0 else b
    head = cell[a:b].lstrip()
    if not head.startswith(_PY_LINE):
        return None
    start = b - len(head) + len(head.split(" ", 1)[0]) + 1
    return (start, b) if cursor >= start else None


def spec() -> dict:
    return {
        "argv": [sys.executable, "-m", "mlsql.notebook.kernel", "-f", "{connection_file}"],
        "display_name": "MLSQL",
        "language": "sql",
        "metadata": {"debugger": False},
    }


def install(argv: list[str]) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    kw: dict = {"user": "--user" in argv}
    if "--sys-prefix" in argv:
        kw["prefix"] = sys.prefix
    if "--prefix" in argv:
        kw["prefix"] = argv[argv.index("--prefix") + 1]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(spec(), indent=1))
        dest = KernelSpecManager().install_kernel_spec(tmp, "mlsql", replace=True, **kw)
    print(f"Installed the MLSQL kernel spec in {dest}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "install":
        install(sys.argv[2:])
    else:
        from ipykernel.kernelapp import IPKernelApp

        IPKernelApp.launch_instance(kernel_class=MLSQLKernel)

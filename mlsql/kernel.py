"""The MLSQL Jupyter kernel: every cell is MLSQL, IPython underneath.

A cell that starts with ``%``, ``!`` or ``?`` runs as IPython (so ``%pip``,
``%config MLSQLMagic.displaylimit = 50`` and ``%%python`` work); every other
cell runs as ``%%mlsql``.

    python -m mlsql.kernel install [--user | --sys-prefix | --prefix DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ipykernel.ipkernel import IPythonKernel

SPEC_DIR = Path(__file__).resolve().parent.parent / "kernels" / "mlsql"


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

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shell.run_line_magic("load_ext", "mlsql")

    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, **kwargs):
        stripped = code.lstrip()
        if stripped and stripped[0] not in "%!?":
            code = "%%mlsql\n" + code
        return await super().do_execute(code, silent, store_history, user_expressions, allow_stdin, **kwargs)


def spec() -> dict:
    return {
        "argv": [sys.executable, "-m", "mlsql.kernel", "-f", "{connection_file}"],
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

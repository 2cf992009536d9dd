"""The architecture holds: import-linter's contracts (.importlinter) are kept by the code, and each
one breaks when its rule is broken (a copy of the packages with a back-import, a cycle, an engine
library in mlsql.ml, a notebook library in the planner, mlsql in device_bridge)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_are_kept():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 5 kept, 0 broken." in done.stdout


BREAKS = {  # file in the copy -> the line added, and the contract it breaks
    "mlsql/errors.py": ("from mlsql import workspace  # noqa", "Each stage imports only the stages below it"),
    "mlsql/ml/options.py": ("from mlsql.ml import model  # noqa", "No import cycles among the modules of any package"),
    "mlsql/ml/metrics.py": ("import duckdb  # noqa", "mlsql.ml trains and scores on Arrow and numpy"),
    "mlsql/plan/planner.py": ("import mlflow  # noqa", "The language and the planner are pure"),
    "device_bridge/package.py": ("import mlsql.errors  # noqa", "device_bridge never imports mlsql"),
}


@pytest.mark.parametrize("file", list(BREAKS))
def test_each_contract_breaks_when_its_rule_is_broken(tmp_path, file):
    for part in ("mlsql", "device_bridge"):
        shutil.copytree(ROOT / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("__pycache__", "labextension", "*.egg-info"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    line, contract = BREAKS[file]
    with open(tmp_path / file, "a") as f:
        f.write(f"\n{line}\n")
    done = lint(tmp_path)
    out = " ".join(done.stdout.split())  # contract names wrap in the report
    assert done.returncode != 0 and "Contracts: 4 kept, 1 broken." in out, out[-3000:]
    broken = out.split("Broken contracts", 1)[1]
    assert contract in broken, broken[:2000]


def test_every_word_of_the_language_has_its_handler():
    """One statement, one ML function: each the language parses has exactly one entry in the
    planner's table or the runtime's, so adding one is an expression, an entry, a handler."""
    import inspect

    from mlsql.language import expressions, functions
    from mlsql.plan.planner import STATEMENTS
    from mlsql.runtime.steps.ml_functions import ML_FUNCTIONS

    assert set(ML_FUNCTIONS) == set(functions.ML_FUNCTIONS)
    parts = {"MLNode", "ModelRef", "MLFunction", "_Named"}  # nodes inside statements, not statements
    statements = {name for name, cls in inspect.getmembers(expressions, inspect.isclass)
                  if issubclass(cls, expressions.MLNode) and name not in parts}
    assert set(STATEMENTS) == statements
    # the parser's heads are those by which a script is known to hold MLSQL (read without sqlglot)
    from mlsql.language.dialect import STATEMENTS as HEADS
    from mlsql.language.scripts import STATEMENT_HEADS

    assert sorted(h for h, _ in HEADS) == sorted(STATEMENT_HEADS)

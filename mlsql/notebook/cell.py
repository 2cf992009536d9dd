"""The ``%%mlsql`` / ``%mlsql`` line: its options, read the same way by the magic that runs a cell
and by the completion that answers Tab and Shift-Tab in it."""

from __future__ import annotations

from IPython.core.error import UsageError

USAGE = """%%mlsql [-o NAME] [--engine ENGINE] [--workspace DIR] [--limit N] [--no-progress] [--plot | --no-plot]
<statements separated by ;>
%mlsql [options] <statement>

  -o, --out NAME     store the last result as a pandas DataFrame in NAME
  --engine ENGINE    run on this engine (default: MLSQLMagic.engine, 'duckdb')
  --workspace DIR    use this workspace folder (default: MLSQLMagic.workspace,
                     MLSQL_HOME or ./.mlsql)
  --limit N          fetch at most N rows of the last result (default: MLSQLMagic.autolimit)
  --no-progress      no progress bar while training
  --plot, --no-plot  draw (or not) the charts of this cell's result: ROC curve and confusion
                     matrix of ML.EVALUATE, bars of ML.FEATURE_IMPORTANCE / ML.EXPLAIN_PREDICT,
                     the loss curve of CREATE MODEL / ML.TRAINING_INFO, a live loss curve while
                     training (default: MLSQLMagic.plots, on in a notebook's kernel)

{name} in the SQL is bound as a query parameter from the notebook's variable
`name` (an unknown {name} is an error); ${name} is a script variable (SET VARIABLE).
Results longer than displaylimit page and sort in the kernel (a table widget).
Configuration: %config MLSQLMagic.displaylimit = 50 (also autolimit, engine,
workspace, progress, plots, pager). The language: docs/LANGUAGE.md."""


def parse_magic_options(line: str) -> tuple[dict, str]:
    """Leading options of a magic line; the rest of the line is SQL, untouched."""
    opts: dict = {}
    rest = line.lstrip()
    flags = {"-o": "out", "--out": "out", "--engine": "engine", "--workspace": "workspace", "--limit": "limit"}
    while rest.startswith("-") and not rest.startswith("-- ") and rest.strip() != "--":
        head, _, tail = rest.partition(" ")
        if head == "--no-progress":
            opts["no_progress"] = True
            rest = tail.lstrip()
            continue
        if head in ("--plot", "--no-plot"):
            opts["plot"] = head == "--plot"
            rest = tail.lstrip()
            continue
        key = head.split("=", 1)[0]
        if key not in flags:
            raise UsageError(f"Unknown option {head!r}\n\n{USAGE}")
        if "=" in head:
            opts[flags[key]] = head.split("=", 1)[1]
            rest = tail.lstrip()
            continue
        value, _, rest = tail.lstrip().partition(" ")
        if not value:
            raise UsageError(f"Option {head} needs a value\n\n{USAGE}")
        opts[flags[key]] = value.strip("'\"")
        rest = rest.lstrip()
    if "limit" in opts:
        if not str(opts["limit"]).isdigit() or int(opts["limit"]) < 1:
            raise UsageError(f"--limit takes a positive whole number of rows, got {opts['limit']!r}")
        opts["limit"] = int(opts["limit"])
    return opts, rest

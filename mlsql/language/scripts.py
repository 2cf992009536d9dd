"""Script text, before any parser: statements, variables, and whether a text holds ML syntax.

Nothing here imports sqlglot, so ``mlsql.connect()`` and a plain statement stay light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mlsql.errors import UnknownVariableError


@dataclass
class Statement:
    """One statement of a script: its original text and, when parsed, its tree."""

    sql: str
    expression: Any
    start: int = 0
    line: int = 1
    is_ml: bool = False


# MLSQL's statements by their head words: the parser's table (mlsql.language.dialect.STATEMENTS)
# maps each to its parsing, and tests/test_architecture.py keeps the two the same. Here, without
# sqlglot, they make the prefilter below.
STATEMENT_HEADS = (
    ("CREATE", "MODEL"), ("CREATE", "DEVICE", "GROUP"), ("CREATE", "DEVICE"), ("CREATE", "JOB"),
    ("SHOW", "MODELS"), ("SHOW", "DEVICES"), ("SHOW", "DEPLOYMENTS"), ("SHOW", "JOBS"),
    ("DESCRIBE", "MODEL"), ("DESCRIBE", "JOB"), ("DROP", "MODEL"), ("DROP", "DEVICE", "GROUP"),
    ("DROP", "DEVICE"), ("DROP", "JOB"), ("RUN", "JOB"), ("ALTER", "JOB"), ("EXPORT", "MODEL"),
    ("DEPLOY", "MODEL"), ("ROLLBACK", "MODEL"), ("EXPLAIN",), ("SET",), ("RESET",),
    ("CREATE", "ALERT"), ("SHOW", "ALERTS"), ("DESCRIBE", "ALERT"), ("DROP", "ALERT"), ("CHECK", "ALERT"),
    ("CREATE", "EXPERIMENT"), ("STOP", "EXPERIMENT"), ("SHOW", "EXPERIMENTS"),
    ("CREATE", "FEATURE", "VIEW"), ("SHOW", "FEATURE", "VIEWS"), ("DESCRIBE", "FEATURE", "VIEW"),
    ("DROP", "FEATURE", "VIEW"),
)

# Anything that may be MLSQL's own syntax; text without it is plain DuckDB SQL, split and run
# without a sqlglot parse. A false alarm (a column named "model") only costs the full parse.
_OBJECT_WORDS = sorted({h[1] for h in STATEMENT_HEADS if len(h) > 1})
ML_SYNTAX = re.compile(r"\bML\s*\.|\b(" + "|".join(_OBJECT_WORDS) + r")\b|\bEXPLAIN\s+MLSQL\b|\b(SET|RESET)\s+mlsql_",
                       re.IGNORECASE)


def plain_statements(text: str) -> list[Statement]:
    """Split plain SQL at top-level ``;`` (not inside strings, quoted names, dollar quotes,
    comments or parentheses); comment-only pieces are dropped."""
    out: list[Statement] = []
    i, depth, n = 0, 0, len(text)
    code_at = -1  # first character of the piece that is not blank or comment

    def emit(end: int) -> None:
        if code_at >= 0:
            sql = text[code_at:end].rstrip()
            out.append(Statement(sql=sql, expression=None, start=code_at, line=text.count("\n", 0, code_at) + 1))

    while i < n:
        c = text[i]
        j = _quoted_end(text, i)
        if j > i:
            if code_at < 0 and not text.startswith(("--", "/*"), i):
                code_at = i
            i = j
            continue
        if c == ";" and depth == 0:
            emit(i)
            code_at = -1
        else:
            if c == "(":
                depth += 1
            elif c == ")":
                depth = max(0, depth - 1)
            if code_at < 0 and not c.isspace():
                code_at = i
        i += 1
    emit(n)
    return out


def _literal_sql(v: Any) -> str:
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if v is None:
        return "NULL"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_literal_sql(x) for x in v) + "]"
    if isinstance(v, dict):
        return "STRUCT(" + ", ".join(f"{_literal_sql(x)} AS {k}" for k, x in v.items()) + ")"
    return "'" + str(v).replace("'", "''") + "'"


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


_VAR = re.compile(r"\$\{\s*([A-Za-z_]\w*)\s*\}")


def substitute_variables(text: str, variables: dict[str, Any]) -> str:
    """Replace ``${name}`` with the variable's value as a SQL literal. String literals, dollar-quoted
    strings, quoted identifiers and comments are left exactly as written."""
    if "${" not in text:
        return text
    lowered = {k.lower(): v for k, v in variables.items()}
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        skip = _quoted_end(text, i)
        if skip > i:
            out.append(text[i:skip])
            i = skip
            continue
        if text.startswith("${", i):
            m = _VAR.match(text, i)
            if m:
                name = m.group(1)
                if name.lower() not in lowered:
                    line, col = _line_col(text, i)
                    raise UnknownVariableError(
                        name, list(variables),
                        message=f"Unknown variable '${{{name}}}' at line {line}, column {col}; "
                                f"set it first with SET VARIABLE {name} = <value>",
                    )
                out.append(_literal_sql(lowered[name.lower()]))
                i = m.end()
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


_DOLLAR_TAG = re.compile(r"\$([A-Za-z_]\w*)?\$")


def _quoted_end(text: str, i: int) -> int:
    """If a string, quoted identifier, dollar-quoted string or comment starts at ``i``, where it
    ends (exclusive); else ``i``."""
    c = text[i]
    if c == "'":
        escapes = i > 0 and text[i - 1] in "eE" and (i == 1 or not (text[i - 2].isalnum() or text[i - 2] == "_"))
        j = i + 1
        while j < len(text):
            if escapes and text[j] == "\\":
                j += 2
                continue
            if text[j] == "'":
                if text.startswith("''", j):
                    j += 2
                    continue
                return j + 1
            j += 1
        return len(text)
    if c == '"':
        j = text.find('"', i + 1)
        while j >= 0 and text.startswith('""', j):
            j = text.find('"', j + 2)
        return len(text) if j < 0 else j + 1
    if c == "-" and text.startswith("--", i):
        j = text.find("\n", i)
        return len(text) if j < 0 else j
    if c == "/" and text.startswith("/*", i):
        j = text.find("*/", i + 2)
        return len(text) if j < 0 else j + 2
    if c == "$" and not text.startswith("${", i):
        m = _DOLLAR_TAG.match(text, i)
        if m and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            j = text.find(m.group(0), m.end())
            return len(text) if j < 0 else j + len(m.group(0))
    return i

"""Tab completion and Shift-Tab inspection of MLSQL, one implementation for every front end.

The MLSQL kernel (``do_complete`` / ``do_inspect``) and the ``%%mlsql`` magic in the Python
kernel (an IPython completer matcher) both call :func:`complete` and :func:`inspect`.

Both read the text around the cursor with a small scanner (strings and comments masked,
the statement under the cursor cut at semicolons), never a full parse: broken SQL still
completes, and nothing here raises. Names come from the session: the DuckDB catalog (one
``information_schema`` query per call), the MLflow store (read directly from its SQLite file
when it is one, without importing MLflow), the device registry.
"""

from __future__ import annotations

import re
import sys
import threading
from functools import cached_property
from typing import Any

from mlsql.language import functions

# MLSQL's statements and words on top of DuckDB's keywords
MLSQL_KEYWORDS = (
    "MODEL", "MODELS", "OPTIONS", "TRANSFORM", "EXPORT", "DEPLOY", "ROLLBACK", "DEVICE", "DEVICES", "GROUP",
    "JOB", "JOBS", "SCHEDULE", "MLSQL", "ML", "TO", "ON", "DESCRIBE", "SHOW", "RUN", "ALTER", "STRUCT",
    "FEATURE", "VIEWS",
)
STATEMENTS = (
    "CREATE MODEL", "CREATE OR REPLACE MODEL", "CREATE MODEL IF NOT EXISTS", "DESCRIBE MODEL", "SHOW MODELS",
    "DROP MODEL", "EXPORT MODEL", "DEPLOY MODEL", "ROLLBACK MODEL", "CREATE DEVICE", "CREATE DEVICE GROUP",
    "SHOW DEVICES", "DROP DEVICE", "DROP DEVICE GROUP", "CREATE JOB", "SHOW JOBS", "DESCRIBE JOB", "DROP JOB",
    "RUN JOB", "ALTER JOB", "EXPLAIN MLSQL", "CREATE FEATURE VIEW", "SHOW FEATURE VIEWS", "DESCRIBE FEATURE VIEW",
    "DROP FEATURE VIEW",
)

# ML.* functions: signature and what they return (docs/LANGUAGE.md has the full table)
# every ML function with how it is written and what it gives: the language's own table
ML_FUNCTIONS = {**functions.ML_FUNCTIONS, **functions.TRANSFORM_FUNCTIONS}

_TABLE_WORDS = {"FROM", "JOIN", "TABLE", "INTO", "UPDATE", "SUMMARIZE", "DESCRIBE"}
_NOT_ALIAS = {
    "WHERE", "JOIN", "ON", "USING", "GROUP", "ORDER", "LIMIT", "LEFT", "RIGHT", "INNER", "OUTER", "FULL", "CROSS",
    "NATURAL", "HAVING", "QUALIFY", "WINDOW", "UNION", "EXCEPT", "INTERSECT", "OFFSET", "SAMPLE", "AS",
    "POSITIONAL", "ASOF", "ANTI", "SEMI", "LATERAL", "PIVOT", "UNPIVOT", "SELECT", "SET", "VALUES", "RETURNING",
}
_CATALOG_NAMES = {"workspace", "memory", "temp", "main", "system"}
_WORD = re.compile(r"[A-Za-z_][\w$]*")
_NAME = r'(?:[A-Za-z_][\w$]*|"[^"]*")'
_REF = re.compile(r"\b(?:FROM|JOIN|TABLE|UPDATE|INTO)\s+(" + _NAME + r"(?:\s*\.\s*" + _NAME + r")*)"
                  r"(?:\s+(?:AS\s+)?([A-Za-z_][\w$]*))?", re.IGNORECASE)
_MODEL_TYPE = re.compile(r"\bmodel_type\s*=\s*'(\w+)'", re.IGNORECASE)

_functions_cache: dict[str, tuple[str, str]] | None = None  # DuckDB's built-in functions: name -> (type, doc)
_keywords_cache: list[str] | None = None


# -- the public functions -------------------------------------------------------------------
def complete(code: str, cursor_pos: int, session) -> dict:
    """Jupyter's ``complete_reply`` content (without status) for ``code`` with the cursor at
    ``cursor_pos`` (a character offset). ``session``: an :class:`mlsql.runtime.session.Session` or None."""
    try:
        return _complete(code, cursor_pos, session)
    except Exception:  # completion must never fail a request
        pos = max(0, min(cursor_pos if cursor_pos is not None else len(code), len(code)))
        return _reply([], pos, pos)


def inspect(code: str, cursor_pos: int, session, detail_level: int = 0) -> dict:
    """Jupyter's ``inspect_reply`` content (without status): ``found`` and a MIME bundle
    describing the name under the cursor (a table's schema, a model's description and metrics,
    an ML function's signature)."""
    try:
        text = _inspect(code, cursor_pos, session, detail_level)
    except Exception:
        text = None
    if not text:
        return {"found": False, "data": {}, "metadata": {}}
    plain, markdown = text
    return {"found": True, "data": {"text/plain": plain, "text/markdown": markdown}, "metadata": {}}


# -- reading the text around the cursor ------------------------------------------------------
def mask(text: str) -> tuple[str, list[tuple[int, int, str]]]:
    """``text`` with string contents and comments blanked (same length), and the spans of the
    strings and comments: (start, end, kind) with kind ``'`` or ``-``."""
    out = list(text)
    spans = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            j = i + 1
            while j < n:
                if text[j] == "'":
                    if j + 1 < n and text[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            for k in range(i + 1, min(j, n)):
                if out[k] != "\n":
                    out[k] = " "
            spans.append((i, min(j + 1, n), "'"))
            i = j + 1
        elif c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out[i:j] = " " * (j - i)
            spans.append((i, j, "-"))
            i = j
        elif c == "/" and text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            spans.append((i, j, "-"))
            i = j
        elif c == '"':
            j = text.find('"', i + 1)
            i = n if j < 0 else j + 1
        else:
            i += 1
    return "".join(out), spans


class _Context:
    """The cursor's surroundings: the statement it is in, the word being typed and what precedes it."""

    def __init__(self, code: str, cursor: int):
        self.code = code
        self.cursor = cursor
        self.masked, spans = mask(code)
        self.in_string = next((s for s in spans if s[0] < cursor < s[1]
                               or (s[0] < cursor == s[1] and not _closed(code, s))), None)
        a = self.masked.rfind(";", 0, cursor) + 1
        b = self.masked.find(";", cursor)
        self.stmt_start, self.stmt_end = a, (len(code) if b < 0 else b)
        self.statement = self.masked[a:self.stmt_end]
        before = code[:cursor]
        m = re.search(r"[A-Za-z_][\w$]*$", before)
        self.prefix = m.group(0) if m else ""
        self.start = cursor - len(self.prefix)
        self.qualifier: list[str] | None = None
        self.at_model: str | None = None
        head = code[:self.start]
        q = re.search(r"(" + _NAME + r"(?:\." + _NAME + r")*)\.$", head)
        if q:
            self.qualifier = [p.strip('"') for p in re.findall(_NAME, q.group(1))]
        am = re.search(r"([A-Za-z_][\w$.]*)@$", head)
        if am:
            self.at_model = am.group(1)
        # the words before the one being typed, in this statement, strings and comments left out
        stmt_before = self.masked[a:self.start] if not self.qualifier else self.masked[a:self.start - len(q.group(0))]
        self.tokens = re.findall(r"[A-Za-z_][\w$]*|[(),=@.*]", stmt_before)
        self.words = [t.upper() for t in self.tokens]

    @property
    def prev(self) -> str:
        return self.words[-1] if self.words else ""

    def open_paren_word(self) -> tuple[str, list[str]]:
        """The word before the innermost '(' still open at the cursor, and the tokens after it."""
        depth = 0
        for i in range(len(self.words) - 1, -1, -1):
            w = self.words[i]
            if w == ")":
                depth += 1
            elif w == "(":
                if depth == 0:
                    return (self.words[i - 1] if i > 0 else ""), self.tokens[i + 1:]
                depth -= 1
        return "", []

    def refs(self) -> list[tuple[list[str], str | None]]:
        """The relations the statement reads (FROM, JOIN, TABLE): (name parts, alias)."""
        out = []
        for m in _REF.finditer(self.statement):
            parts = [p.strip('"') for p in re.findall(_NAME, m.group(1))]
            alias = m.group(2)
            if alias and alias.upper() in _NOT_ALIAS:
                alias = None
            out.append((parts, alias))
        return out


def _closed(code: str, span: tuple[int, int, str]) -> bool:
    """Whether a string or comment ends before its span's end (a -- comment never does: the
    cursor at the end of its line is still in it)."""
    if span[2] == "'":
        return span[1] - span[0] >= 2 and code[span[1] - 1] == "'"
    return code[span[0]:span[1]].startswith("/*") and code[span[0]:span[1]].endswith("*/")


# -- names from the session ------------------------------------------------------------------
class _Names:
    """What the session knows, each looked up at most once per call."""

    def __init__(self, session):
        self.session = session

    @cached_property
    def columns(self) -> list[tuple[str, str, str, str, str, str]]:
        """(catalog, schema, table, column, type, table_type) of every relation the engine sees."""
        if self.session is None:
            return []
        try:
            t = self.session.engine.query(
                "SELECT c.table_catalog, c.table_schema, c.table_name, c.column_name, c.data_type, t.table_type "
                "FROM information_schema.columns c JOIN information_schema.tables t "
                "USING (table_catalog, table_schema, table_name) "
                "WHERE c.table_schema NOT IN ('information_schema', 'pg_catalog') "
                "ORDER BY c.table_catalog, c.table_schema, c.table_name, c.ordinal_position")
            rows = list(zip(*(t.column(i).to_pylist() for i in range(6))))
        except Exception:
            try:
                rows = [("", "", n, "", "", "BASE TABLE") for n in self.session.engine.table_names()]
            except Exception:
                rows = []
        return [r for r in rows if not str(r[2]).startswith("__mlsql_")]

    @cached_property
    def tables(self) -> dict[str, tuple[str, str, str, str]]:
        """lower(name) -> (catalog, schema, name, type); the current catalog's wins a clash."""
        out: dict[str, tuple[str, str, str, str]] = {}
        for cat, schema, name, _col, _typ, kind in self.columns:
            key = name.lower()
            if key not in out or cat == "workspace":
                out[key] = (cat, schema, name, kind)
        return out

    def columns_of(self, parts: list[str]) -> list[tuple[str, str]]:
        """(column, type) of a relation named by 1 to 3 parts (catalog.schema.table)."""
        if not parts:
            return []
        name = parts[-1].lower()
        qual = [p.lower() for p in parts[:-1]]
        found: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for cat, schema, table, col, typ, _kind in self.columns:
            if table.lower() != name or not col:
                continue
            if qual and [x.lower() for x in (cat, schema)][-len(qual):] != qual[-2:]:
                continue
            found.setdefault((cat, schema), []).append((col, typ))
        if not found:
            return []
        key = ("workspace", "main") if ("workspace", "main") in found else next(iter(found))
        return found[key]

    def tables_in(self, qual: list[str]) -> list[tuple[str, str]]:
        """(table, type) inside a catalog or catalog.schema."""
        q = [x.lower() for x in qual]
        out = {}
        for cat, schema, table, _c, _t, kind in self.columns:
            path = [cat.lower(), schema.lower()]
            if q == path[-len(q):] or (len(q) == 1 and q[0] == cat.lower()):
                out[table] = kind
        return sorted(out.items())

    @cached_property
    def models(self) -> dict[str, dict[str, Any]]:
        """name -> {'versions': [int], 'aliases': {alias: version}}."""
        if self.session is None:
            return {}
        import sqlite3

        ws = self.session.workspace
        uri = ws.tracking_uri
        if uri.startswith("sqlite:///"):
            path = uri[len("sqlite:///"):]
            import os

            if not os.path.exists(path):
                return {}
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
            try:
                out = {n: {"versions": [], "aliases": {}} for (n,) in con.execute("SELECT name FROM registered_models")}
                for n, v in con.execute("SELECT name, version FROM model_versions ORDER BY version"):
                    out.setdefault(n, {"versions": [], "aliases": {}})["versions"].append(int(v))
                try:
                    for n, a, v in con.execute("SELECT name, alias, version FROM registered_model_aliases"):
                        out.setdefault(n, {"versions": [], "aliases": {}})["aliases"][a] = int(v)
                except sqlite3.Error:
                    pass
                return out
            except sqlite3.Error:
                return {}
            finally:
                con.close()
        if "mlflow" not in sys.modules:
            return {}  # another store: only when MLflow is loaded already (its import takes seconds)
        out = {}
        for n in self.session.registry.names():
            vs = self.session.registry.versions(n)
            out[n] = {"versions": [v.version for v in vs], "aliases": {a: v.version for v in vs for a in v.aliases}}
        return out

    @cached_property
    def devices(self) -> list:
        try:
            return self.session.devices.devices() if self.session is not None else []
        except Exception:
            return []

    @cached_property
    def groups(self) -> list:
        try:
            return self.session.devices.groups() if self.session is not None else []
        except Exception:
            return []


def functions() -> dict[str, tuple[str, str]]:
    """DuckDB's built-in functions: lower name -> (type, description). Asked once per process."""
    global _functions_cache, _keywords_cache
    if _functions_cache is None:
        import duckdb

        con = duckdb.connect(":memory:")
        try:
            rows = con.sql("SELECT function_name, any_value(function_type), any_value(description), "
                           "any_value(return_type), any_value(parameters) FROM duckdb_functions() "
                           "GROUP BY function_name").fetchall()
            _keywords_cache = [r[0].upper() for r in con.sql("SELECT keyword_name FROM duckdb_keywords()").fetchall()]
        finally:
            con.close()
        out = {}
        for name, kind, desc, ret, params in rows:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or name.startswith("__"):
                continue
            sig = f"{name}({', '.join(params or [])})" + (f" -> {ret}" if ret else "")
            out[name] = (kind, f"{sig}\n\n{desc or ''}".strip())
        _functions_cache = out
    return _functions_cache


def keywords() -> list[str]:
    functions()
    return sorted(set(_keywords_cache or []) | set(MLSQL_KEYWORDS))


def option_names(kind: str, model_type: str | None = None) -> list[str]:
    """The OPTIONS names of a statement kind ('CREATE MODEL', 'EXPORT MODEL', 'DEPLOY MODEL',
    'CREATE DEVICE', 'CREATE DEVICE GROUP'), for CREATE MODEL those of ``model_type`` when known."""
    from mlsql.language.options import options_for

    try:
        return sorted({name for name, _type, _doc in options_for(kind, model_type=model_type)})
    except Exception:  # an unknown statement kind or model type: nothing to offer, never an error
        return []


def _statement_kind(words: list[str]) -> str | None:
    head = [w for w in words[:6] if w not in ("OR", "REPLACE", "IF", "NOT", "EXISTS")]
    if head[:2] == ["CREATE", "MODEL"]:
        return "CREATE MODEL"
    if head[:1] == ["EXPORT"]:
        return "EXPORT MODEL"
    if head[:1] == ["DEPLOY"]:
        return "DEPLOY MODEL"
    if head[:3] == ["CREATE", "DEVICE", "GROUP"]:
        return "CREATE DEVICE GROUP"
    if head[:2] == ["CREATE", "DEVICE"]:
        return "CREATE DEVICE"
    if head[:2] == ["CREATE", "JOB"]:
        return "CREATE JOB"
    return None


# -- completing -----------------------------------------------------------------------------
def _reply(items: list[tuple[str, str]], start: int, end: int) -> dict:
    seen: set[str] = set()
    matches, types = [], []
    for text, kind in items:
        if text in seen:
            continue
        seen.add(text)
        matches.append(text)
        types.append({"text": text, "type": kind, "start": start, "end": end})
    return {"matches": matches, "cursor_start": start, "cursor_end": end,
            "metadata": {"_jupyter_types_experimental": types}}


def _case(word: str, prefix: str) -> str:
    """Keywords in the case the user types them."""
    return word.lower() if prefix and prefix.islower() else word


def _complete(code: str, cursor_pos: int | None, session) -> dict:
    cursor = len(code) if cursor_pos is None else max(0, min(cursor_pos, len(code)))
    ctx = _Context(code, cursor)
    names = _Names(session)
    p = ctx.prefix.lower()

    def pick(cands, kind):
        return [(c, kind) for c in cands if c.lower().startswith(p)]

    if ctx.in_string is not None:
        return _complete_in_string(ctx, names)

    if ctx.at_model is not None:  # model@<version or alias>
        info = names.models.get(ctx.at_model) or next(
            (v for k, v in names.models.items() if k.lower() == ctx.at_model.lower()), None)
        if not info:
            return _reply([], ctx.start, cursor)
        items = pick([str(v) for v in reversed(info["versions"])], "version") + pick(sorted(info["aliases"]), "alias")
        return _reply(items, ctx.start, cursor)

    if ctx.qualifier is not None:
        q = ctx.qualifier
        if len(q) == 1 and q[0].upper() == "ML":
            return _reply(pick(sorted(ML_FUNCTIONS), "function"), ctx.start, cursor)
        items: list[tuple[str, str]] = []
        aliases = {(a or parts[-1]).lower(): parts for parts, a in ctx.refs()}
        target = aliases.get(q[-1].lower()) if len(q) == 1 else None
        cols = names.columns_of(target or q)
        items += pick([c for c, _ in cols], "column")
        if q[0].lower() in _CATALOG_NAMES or len(q) == 2:
            items += [(t, _table_kind(k)) for t, k in names.tables_in(q) if t.lower().startswith(p)]
        return _reply(items, ctx.start, cursor)

    prev = ctx.prev
    if prev == "MODEL" or (prev == "," and ctx.words[-2:-1] == ["MODELS"]):
        return _reply(pick(sorted(names.models), "model"), ctx.start, cursor)
    if prev == "DEVICE" and ctx.words[-2:-1] != ["CREATE"]:
        return _reply(pick([d.name for d in names.devices], "device")
                      + [(_case("GROUP", ctx.prefix), "keyword")] * ("group".startswith(p) and ctx.words[-2:-1] != ["TO"]),
                      ctx.start, cursor)
    if prev == "GROUP" and ctx.words[-2:-1] in (["DEVICE"], ["TO"], ["ON"]) and ctx.words[:1] != ["CREATE"]:
        return _reply(pick([g.name for g in names.groups], "group"), ctx.start, cursor)

    word, inside = ctx.open_paren_word()
    if word == "OPTIONS":
        kind = _statement_kind(ctx.words)
        toks = [t.upper() for t in inside]
        if not toks or toks[-1] in ("(", ","):
            # the masked statement blanks strings: read model_type's value from the real text
            mt = _MODEL_TYPE.search(code[ctx.stmt_start:ctx.stmt_end])
            return _reply(pick(option_names(kind or "CREATE MODEL", mt.group(1) if mt else None), "option"),
                          ctx.start, cursor)
        if toks[-1] == "=" and len(toks) >= 2 and toks[-2] == "MODEL_TYPE":
            from mlsql.ml.options import MODEL_TYPES

            return _reply([(f"'{m}'", "value") for m in MODEL_TYPES if m.startswith(p)], ctx.start, cursor)

    items = []
    if prev in _TABLE_WORDS:
        items += [(t[2], _table_kind(t[3])) for t in sorted(names.tables.values(), key=lambda t: t[2])
                  if t[2].lower().startswith(p)]
        if prev in ("FROM", "JOIN"):
            items += pick(["ML." + f for f in ML_FUNCTIONS], "function")
        return _reply(items, ctx.start, cursor)

    # anywhere else: the columns of the relations this statement reads, then keywords, functions, tables
    for parts, _alias in ctx.refs():
        items += pick([c for c, _ in names.columns_of(parts)], "column")
    if not ctx.prefix and items:
        return _reply(items, ctx.start, cursor)
    if ctx.prefix:
        if not ctx.words:
            items += [(_case(s, ctx.prefix), "statement") for s in STATEMENTS if s.lower().startswith(p)]
        items += [(_case(k, ctx.prefix), "keyword") for k in keywords() if k.lower().startswith(p)]
        items += pick(["ML." + f for f in ML_FUNCTIONS], "function")
        items += [(f, "function") for f in sorted(functions()) if f.startswith(p)]
        items += [(t[2], _table_kind(t[3])) for t in sorted(names.tables.values(), key=lambda t: t[2])
                  if t[2].lower().startswith(p)]
    return _reply(items, ctx.start, cursor)


def _table_kind(table_type: str) -> str:
    return "view" if "VIEW" in str(table_type).upper() else "table"


def _complete_in_string(ctx: _Context, names: _Names) -> dict:
    """Inside a string: model types after model_type =, devices in ML.DEVICE_METRICS('...'),
    quantization and providers in OPTIONS."""
    start = ctx.in_string[0] + 1
    typed = ctx.code[start:ctx.cursor]
    before = ctx.masked[ctx.stmt_start:ctx.in_string[0]]
    words = [w.upper() for w in re.findall(r"[A-Za-z_][\w$]*|[(),=.]", before)]
    cands: list[tuple[str, str]] = []
    if words[-2:] == ["MODEL_TYPE", "="]:
        from mlsql.ml.options import MODEL_TYPES

        cands = [(m, "value") for m in MODEL_TYPES]
    elif words[-2:] == ["QUANTIZE", "="]:
        from mlsql.language.options import QUANTIZE

        cands = [(q, "value") for q in QUANTIZE]
    elif words[-2:] == ["DEVICE_METRICS", "("]:
        cands = [(d.name, "device") for d in names.devices]
    cands = [(c, k) for c, k in cands if c.lower().startswith(typed.lower())]
    return _reply(cands, start, ctx.cursor)


# -- inspecting -----------------------------------------------------------------------------
def _token_at(code: str, cursor: int) -> tuple[str, int]:
    """The dotted name (``t.col``, ``ML.PREDICT``, ``model@2``) at the cursor and where it starts."""
    a = cursor
    while a > 0 and re.match(r"[\w$.@]", code[a - 1]):
        a -= 1
    b = cursor
    while b < len(code) and re.match(r"[\w$@]", code[b]):
        b += 1
    return code[a:b].strip("."), a


def _inspect(code: str, cursor_pos: int | None, session, detail_level: int) -> tuple[str, str] | None:
    cursor = len(code) if cursor_pos is None else max(0, min(cursor_pos, len(code)))
    token, start = _token_at(code, cursor)
    if not token:
        return None
    ctx = _Context(code, start)
    names = _Names(session)
    parts = token.split(".")
    if parts[0].upper() == "ML" and len(parts) == 2 and parts[1].upper() in ML_FUNCTIONS:
        sig, doc = ML_FUNCTIONS[parts[1].upper()]
        return f"{sig}\n\n{doc}", f"```sql\n{sig}\n```\n\n{doc}"
    model_ref = token if ("@" in token or ctx.prev == "MODEL") else None
    if model_ref is None and "." not in token and token.lower() not in names.tables:
        if token in names.models or token.lower() in {m.lower() for m in names.models}:
            model_ref = token
    if model_ref is not None and session is not None:
        return _describe_model(session, model_ref)
    aliases = {(a or p[-1]).lower(): p for p, a in ctx.refs()}
    if len(parts) >= 2:  # alias.column, table.column or catalog.table
        target = aliases.get(parts[-2].lower()) or parts[:-1]
        for col, typ in names.columns_of(target):
            if col.lower() == parts[-1].lower():
                return (f"{col}: {typ}  (column of {'.'.join(target)})",
                        f"**{col}** `{typ}` — column of `{'.'.join(target)}`")
    rel = aliases.get(token.lower()) or (parts if token.lower() in names.tables or len(parts) > 1 else None)
    if rel:
        cols = names.columns_of(rel)
        if cols:
            kind = _table_kind(names.tables.get(rel[-1].lower(), ("", "", "", ""))[3])
            full = ".".join(names.tables.get(rel[-1].lower(), ("", "", rel[-1], ""))[:3]).strip(".")
            plain = f"{kind} {full}: {len(cols)} columns\n" + "\n".join(f"  {c}: {t}" for c, t in cols)
            md = f"**{kind} `{full}`** — {len(cols)} columns\n\n| column | type |\n|---|---|\n" + \
                 "\n".join(f"| {c} | `{t}` |" for c, t in cols)
            return plain, md
    for parts_, _a in ctx.refs():
        for col, typ in names.columns_of(parts_):
            if col.lower() == token.lower():
                return (f"{col}: {typ}  (column of {'.'.join(parts_)})",
                        f"**{col}** `{typ}` — column of `{'.'.join(parts_)}`")
    for d in names.devices:
        if d.name == token:
            provs = ", ".join(d.providers) or "cpu"
            return (f"device {d.name} at {d.url} (providers {provs})" + (f"\n{d.description}" if d.description else ""),
                    f"**device `{d.name}`** at {d.url} — providers {provs}")
    for g in names.groups:
        if g.name == token:
            return (f"device group {g.name}: {', '.join(g.devices)}",
                    f"**device group `{g.name}`**: {', '.join(g.devices)}")
    fn = functions().get(token.lower())
    if fn:
        return fn[1], f"```\n{fn[1]}\n```"
    return None


def _describe_model(session, ref: str) -> tuple[str, str] | None:
    """DESCRIBE MODEL's properties, metrics first."""
    if not re.fullmatch(r"[\w$.]+(@\w+)?", ref):
        return None
    try:
        table = session.sql(f"DESCRIBE MODEL {ref}").to_arrow()
    except Exception:
        return None
    props = dict(zip(table.column("property").to_pylist(), table.column("value").to_pylist()))
    title = f"model {props.get('name')}@{props.get('version')} ({props.get('model_type')}, label {props.get('label')})"
    metrics = {k[len("metric."):]: v for k, v in props.items() if k.startswith("metric.")}
    other = [(k, v) for k, v in props.items()
             if not k.startswith("metric.") and k not in ("name", "version", "model_type", "label", "sql")]
    plain = title + "\nmetrics:\n" + "\n".join(f"  {k}: {v}" for k, v in metrics.items()) + "\n" + \
        "\n".join(f"{k}: {v}" for k, v in other if v)
    md = f"**{title}**\n\n| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in metrics.items()) \
        + "\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in other if v)
    if props.get("sql"):
        plain += f"\n\n{props['sql']}"
        md += f"\n\n```sql\n{props['sql']}\n```"
    return plain, md


# -- the Python kernel: %%mlsql cells and %mlsql lines ---------------------------------------
_LINE_MAGIC = re.compile(r"^[ \t]*%mlsql(?:[ \t]+(?:(?:-o|--out|--engine|--workspace|--limit)[ \t]+\S+|--[\w-]+=\S+"
                         r"|--no-progress|--plot|--no-plot))*[ \t]+", re.M)


def magic_view(code: str, cursor_pos: int | None) -> tuple[str, int, str] | None:
    """The SQL of a ``%%mlsql`` cell (or of the ``%mlsql`` line under the cursor) in a Python
    kernel's cell: (sql, cursor offset in it, the magic's option text); None elsewhere."""
    cursor = len(code) if cursor_pos is None else max(0, min(cursor_pos, len(code)))
    if code.startswith("%%mlsql"):
        nl = code.find("\n")
        if nl < 0 or cursor <= nl:
            return None  # on the %%mlsql line itself: its options, not SQL
        return code[nl + 1:], cursor - nl - 1, code[len("%%mlsql"):nl]
    line_start = code.rfind("\n", 0, cursor) + 1
    m = _LINE_MAGIC.match(code, line_start)
    if m is None or cursor < m.end():
        return None
    line_end = code.find("\n", cursor)
    line_end = len(code) if line_end < 0 else line_end
    return code[m.end():line_end], cursor - m.end(), code[line_start:m.end()].strip()[len("%mlsql"):]


def warm_up() -> None:
    """Read DuckDB's function and keyword lists in a background thread (its own in-memory
    connection), so that the first Tab of a kernel answers within the front-end's patience
    (JupyterLab drops a completion that takes over a second) without slowing ``%load_ext``."""
    if _functions_cache is None:
        threading.Thread(target=_quietly, args=(functions,), name="mlsql-completion-warm-up", daemon=True).start()


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # the first Tab tries again
        pass


def install_ipython_hooks(shell, magic) -> None:
    """Tab and Shift-Tab in ``%%mlsql`` cells and after ``%mlsql`` in the Python kernel:
    a context matcher in IPython's completer, and a wrapper around the kernel's ``do_inspect``
    (IPython's object inspection sees only a name, not the cell) that answers for those cells."""
    warm_up()
    completer = getattr(shell, "Completer", None)
    if completer is not None and not any(getattr(m, "_mlsql", False) for m in completer.custom_matchers):
        completer.custom_matchers.insert(0, _ipython_matcher(magic))
    kernel = getattr(shell, "kernel", None)
    if kernel is None or getattr(kernel, "mlsql_native", False) or getattr(kernel, "_mlsql_inspect", False):
        return
    original = kernel.do_inspect

    def do_inspect(code, cursor_pos, detail_level=0, omit_sections=()):
        view = magic_view(code, cursor_pos)
        if view is None:
            return original(code, cursor_pos, detail_level, omit_sections)
        sql, pos, options = view
        return {"status": "ok", **inspect(sql, pos, _magic_session(magic, options), detail_level)}

    kernel.do_inspect = do_inspect
    kernel._mlsql_inspect = True


def _magic_session(magic, options: str):
    """The session the magic would run this cell in (its --workspace and --engine)."""
    try:
        from mlsql.notebook.cell import parse_magic_options

        opts, _ = parse_magic_options(options)
        return magic.session(opts.get("workspace"), opts.get("engine"))
    except Exception:
        return None


def _ipython_matcher(magic):
    from IPython.core.completer import SimpleCompletion, context_matcher

    @context_matcher(identifier="mlsql")
    def mlsql_matcher(context):
        try:
            lines = context.full_text.split("\n")
            offset = sum(len(ln) + 1 for ln in lines[:context.cursor_line]) + context.cursor_position
            view = magic_view(context.full_text, offset)
            if view is None:
                return {"completions": [], "suppress": False}
            sql, pos, options = view
            r = complete(sql, pos, _magic_session(magic, options))
            kinds = {t["text"]: t["type"] for t in r["metadata"]["_jupyter_types_experimental"]}
            return {"completions": [SimpleCompletion(m, type=kinds.get(m)) for m in r["matches"]],
                    "matched_fragment": sql[r["cursor_start"]:pos], "suppress": True, "ordered": True}
        except Exception:
            return {"completions": [], "suppress": False}

    mlsql_matcher._mlsql = True
    return mlsql_matcher

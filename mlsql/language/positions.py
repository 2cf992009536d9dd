"""Where in a statement an error is, found in its sqlglot tree.

An error that only knows a name (an unknown option, a bad option value, a model, a table, a
column an ML function's input lacks) is placed on the node it is about: ``locate`` gives the
character offsets of that node in the script the tree was parsed from. The parser records the
positions (sqlglot's ``meta``: ``start`` and ``end``, inclusive), over all the tokens of an
option's value and of an ML function's input (``MLSQLParser._spanned``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from sqlglot import exp

from mlsql.errors import (
    EngineError,
    MLSQLError,
    OptionError,
    UnknownColumnError,
    UnknownModelError,
    UnknownOptionError,
    UnknownTableError,
)
from mlsql.language import expressions as mx


def locate(error: MLSQLError, tree: exp.Expression | None) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of what ``error`` is about in ``tree``, or None."""
    if tree is None:
        return None
    at = getattr(error, "at", None)  # an error that knows its offsets (a feature view's construct)
    if isinstance(at, tuple) and len(at) == 2:
        return at
    node: exp.Expression | None = None
    if isinstance(error, UnknownOptionError):
        node = _option_key(tree, error.name, error.statement_kind)
    elif isinstance(error, OptionError) and error.option:
        item = _option(tree, error.option, error.statement_kind)
        node = None if item is None else item[0] if error.at_name else item[1]
    elif isinstance(error, UnknownModelError):
        node = next((r.this for r in tree.find_all(mx.ModelRef) if _same(r.this.name, error.name)), None)
    elif isinstance(error, UnknownTableError):
        node = next((t.this for t in tree.find_all(exp.Table)
                     if isinstance(t.this, exp.Identifier) and _same(t.name, error.name.split(".")[-1])), None)
    elif isinstance(error, UnknownColumnError):
        node = _column(tree, error.name, error.function)
    elif isinstance(error, EngineError):  # the engine quotes the name it did not find: "nope"
        for name in re.findall(r'"([^"]+)"', error.message.split("\n")[0]):
            named = [n for n in tree.walk() if isinstance(n, exp.Identifier) and _same(n.name, name)]
            named = [n for n in named if extent(n) is not None]
            if named:
                node = min(named, key=lambda n: extent(n)[0])
                break
    return None if node is None else extent(node)


def extent(node: exp.Expression) -> tuple[int, int] | None:
    """The offsets a node covers: its own position, else from its first to its last token."""
    meta = node.meta if node._meta else {}
    if "start" in meta and "end" in meta:
        return meta["start"], meta["end"] + 1
    spans = [(n.meta["start"], n.meta["end"] + 1) for n in node.walk()
             if n._meta and "start" in n.meta and "end" in n.meta]
    if not spans:
        return None
    return min(a for a, _ in spans), max(b for _, b in spans)


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.lower() == b.lower()


def _options(tree: exp.Expression, statement_kind: str | None) -> Iterator[tuple[exp.Expression, exp.Expression]]:
    """The ``(name, value)`` nodes of the items of the statement's OPTIONS, or of the STRUCT settings of an ML
    function (``statement_kind`` 'ML.PREDICT'); every one of both when the kind is not known."""
    kind = (statement_kind or "").upper()
    if not kind.startswith("ML."):
        for node in tree.walk():
            if not isinstance(node, exp.Expression):
                continue
            opts = node.args.get("options")
            if isinstance(opts, list):
                yield from ((o.this, o.expression) for o in opts if isinstance(o, exp.EQ))
    if kind and not kind.startswith("ML."):
        return
    for fn in tree.find_all(mx.MLFunction):
        if kind and fn.func != kind[3:]:
            continue
        settings = fn.args.get("settings")
        if isinstance(settings, exp.Struct):
            for item in settings.expressions:
                if isinstance(item, exp.PropertyEQ | exp.EQ):  # STRUCT(3 AS top_k_features)
                    yield item.this, item.expression
                elif isinstance(item, exp.Alias):
                    yield item.args["alias"], item.this


def _option(tree: exp.Expression, name: str,
            statement_kind: str | None) -> tuple[exp.Expression, exp.Expression] | None:
    return next((kv for kv in _options(tree, statement_kind) if _same(kv[0].name, name)), None)


def _option_key(tree: exp.Expression, name: str, statement_kind: str | None) -> exp.Expression | None:
    item = _option(tree, name, statement_kind)
    return None if item is None else item[0]


def _column(tree: exp.Expression, name: str, function: str | None) -> exp.Expression | None:
    """An ML function's input lacking a column: where the input's own columns name it (``*
    EXCLUDE (x)``, ``x AS y``), else the whole input. Other column errors: the column's first
    use in the statement, else the option that names it (``input_label_cols = ['z']``)."""
    fns = [f for f in tree.find_all(mx.MLFunction) if f.input is not None
           and (function is None or f.func == function.upper())]
    if fns:
        fns.sort(key=lambda f: (extent(f.input) or (0, 0))[0])
        input_ = fns[0].input
        query = input_.this if isinstance(input_, exp.Subquery) else None
        if isinstance(query, exp.Select):
            for item in query.expressions:
                named = [n for n in item.walk() if isinstance(n, exp.Identifier) and _same(n.name, name)]
                if named:
                    return named[0]
        return input_
    uses = [n for n in tree.walk() if isinstance(n, exp.Column) and _same(n.name, name)]
    if uses:
        return min(uses, key=lambda n: (extent(n) or (0, 0))[0])
    # a column an option names: input_label_cols = ['z'], data_split_col = 'z'
    named = [lit for _, value in _options(tree, None) for lit in value.walk()
             if isinstance(lit, exp.Literal) and lit.is_string and _same(lit.this, name)]
    return named[0] if named else None

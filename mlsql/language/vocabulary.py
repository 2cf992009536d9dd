"""MLSQL's vocabulary as one JSON-able dict, assembled from the language's own tables.

The JupyterLab extension (``extensions/``) highlights, offers and checks MLSQL's words without
a copy of its own: its build runs ``python -m mlsql.language.vocabulary OUT.json`` and the
TypeScript imports that file. What it holds, and where each part comes from:

- ``keywords``: every word MLSQL's own statements are made of (``MODEL``, ``DEPLOY``, ``TO``,
  ``GROUP``, ``TRANSFORM``, ``OPTIONS``, ...; DuckDB's SQL has some of them too), read from the
  parser :class:`mlsql.language.dialect.MLSQLParser` itself: the words it matches
  (``_match_text_seq``, ``_match(TokenType.X)``, ``.text.upper() == ...``). A word the parser
  learns is in the next build.
- ``functions``: the ``ML.*`` functions and their argument shape. Table functions
  (:data:`mlsql.language.functions.ML_FUNCTIONS`; ``model``: their first argument is
  ``MODEL m``, unless in ``NO_MODEL_FUNCTIONS``; ``settings``: the names of their
  ``STRUCT(...)`` settings from ``OPTIONS``), and the TRANSFORM functions (:data:`TRANSFORM_FUNCTIONS`).
- ``options``: per statement kind, every option of :data:`mlsql.language.options.OPTIONS` in
  the table's order, with every field of :class:`~mlsql.language.options.Option` (type, doc,
  default, choices, min/max, items, model types, ...) but its ``check``, plus ``allowed`` (the
  words error messages use) and, for provider lists, ``values``: the provider names
  (``options.PROVIDERS``).
- ``values``: the value sets the options draw on, by name (``quantize``, ``providers``,
  ``model_type``, ``tree_format``).

The output is stable (sorted keys, lists in their tables' order), so the build is reproducible.
Imports only ``mlsql.language`` (and ``mlsql.errors`` through it).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from mlsql.language import dialect, options
from mlsql.language.functions import ML_FUNCTIONS, NO_MODEL_FUNCTIONS, TRANSFORM_FUNCTIONS

# ML.<function>: the namespace of the functions, not a statement word
FUNCTION_NAMESPACE = "ML"

_WORD = re.compile(r"[A-Z][A-Z_]*")


def _upper_text(node: ast.AST) -> bool:
    """``<token>.text.upper()``: a token's word, in upper case."""
    f = node.func if isinstance(node, ast.Call) else None
    return isinstance(f, ast.Attribute) and f.attr == "upper" and isinstance(f.value, ast.Attribute) \
        and f.value.attr == "text"


def _parser_words() -> set[str]:
    """The words MLSQLParser matches, read from its source."""
    tree = ast.parse(inspect.getsource(dialect.MLSQLParser))
    token_words: dict[str, set[str]] = {}
    for word, token_type in dialect.MLSQLTokenizer.KEYWORDS.items():
        token_words.setdefault(token_type.name, set()).add(word)
    words: set[str] = set()

    def text(node: ast.AST) -> list[str]:
        elts = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
        return [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "_match_text_seq":
                for a in node.args:
                    words.update(text(a))
            elif node.func.attr == "_match":
                for a in node.args:  # self._match(TokenType.ON): the words that make that token
                    if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name) and a.value.id == "TokenType":
                        words.update(token_words.get(a.attr, ()))
        elif isinstance(node, ast.Compare) and (isinstance(node.left, ast.Name) or _upper_text(node.left)):
            for c in node.comparators:  # <token>.text.upper() == 'X', action not in ('PAUSE', 'RESUME')
                words.update(text(c))
    return {w for w in words if _WORD.fullmatch(w)}


def keywords() -> list[str]:
    """Every word of MLSQL's own statements (the parser's, and the statement heads by which the
    dialect tells an MLSQL statement), upper case, sorted."""
    heads = {w for head, _ in dialect.STATEMENTS for w in head} | {"OR", "REPLACE"}  # CREATE [OR REPLACE]
    return sorted((_parser_words() | heads) - {FUNCTION_NAMESPACE})


def functions() -> dict[str, dict[str, Any]]:
    """``ML.<name>`` → its argument shape: ``kind`` (``table``: used as a table, ``FROM
    ML.PREDICT(...)``; ``transform``: in CREATE MODEL's TRANSFORM), ``model`` (its first argument
    is ``MODEL m``) and ``settings`` (the names its ``STRUCT(...)`` takes)."""
    out: dict[str, dict[str, Any]] = {}
    for name in ML_FUNCTIONS:
        out[name] = {"kind": "table", "model": name not in NO_MODEL_FUNCTIONS,
                     "settings": [o.name for o in options.OPTIONS.get(f"{FUNCTION_NAMESPACE}.{name}", ())]}
    for name in TRANSFORM_FUNCTIONS:
        out[name] = {"kind": "transform", "model": False, "settings": []}
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _option(o: options.Option) -> dict[str, Any]:
    out = {f.name: _jsonable(getattr(o, f.name)) for f in dataclasses.fields(o) if f.name != "check"}
    out["allowed"] = o.allowed()
    if o.check is options._providers:
        out["values"] = list(options.PROVIDERS)
    return out


def vocabulary() -> dict[str, Any]:
    """The vocabulary (see the module's doc), as plain JSON types."""
    return {
        "_generated_by": "python -m mlsql.language.vocabulary (from mlsql/language); do not edit",
        "namespace": FUNCTION_NAMESPACE,
        "keywords": keywords(),
        "functions": functions(),
        "options": {kind: [_option(o) for o in opts] for kind, opts in options.OPTIONS.items()},
        "values": {
            "model_type": list(options.MODEL_TYPES),
            "providers": list(options.PROVIDERS),
            "quantize": list(options.QUANTIZE),
            "tree_format": list(options.TREE_FORMATS),
        },
    }


def dumps() -> str:
    """The vocabulary as the JSON the extension reads: sorted keys, two-space indent, a final newline."""
    return json.dumps(vocabulary(), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m mlsql.language.vocabulary OUT.json", file=sys.stderr)
        return 2
    out = Path(args[0])
    text = dumps()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists() or out.read_text(encoding="utf-8") != text:  # unchanged: keep its time (no rebuild)
        out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DEPLOY's ``trigger`` option: ``STRUCT('app_events' AS on_table, 'kind = ''purchase''' AS when_sql)``.

The condition is SQL the notebook compiles, with sqlglot, into the expression tree of the feature
view contract (docs/DEVICE.md, "Feature views on the device": ``{"col"}``, ``{"lit"}``,
``{"op", "args"}``), which the agent evaluates over each batch of events; the agent never parses
SQL. What the tree cannot say (a function call, a subquery, a column of another table) is refused
here, naming the construct.
"""

from __future__ import annotations

from typing import Any

from mlsql.errors import MLSQLError

_CMP = {"EQ": "=", "NEQ": "<>", "LT": "<", "LTE": "<=", "GT": ">", "GTE": ">="}
_ARITH = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}
_BOOL = {"And": "and", "Or": "or"}


def compile_trigger(value: Any) -> dict:
    """The option's STRUCT -> ``{"on_table": NAME, "when": expression tree or None}`` for the agent."""
    if not isinstance(value, dict) or not set(value) <= {"on_table", "when_sql"} or "on_table" not in value:
        raise MLSQLError("Option trigger must be STRUCT('<event table>' AS on_table, '<condition>' AS when_sql)",
                         hint="For example: trigger = STRUCT('app_events' AS on_table, 'kind = ''purchase''' AS when_sql); "
                              "when_sql may be left out to run on every event.")
    table = value["on_table"]
    if not isinstance(table, str) or not table:
        raise MLSQLError("Option trigger: on_table must be the event table's name (a string)")
    when = value.get("when_sql")
    if when is None:
        return {"on_table": table, "when": None}
    if not isinstance(when, str) or not when.strip():
        raise MLSQLError("Option trigger: when_sql must be a SQL condition (a string), such as 'kind = ''purchase'''")
    import sqlglot
    from sqlglot.errors import ParseError

    try:
        tree = sqlglot.parse_one(when, read="duckdb", into=sqlglot.exp.Condition)
    except ParseError as exc:
        raise MLSQLError(f"Option trigger: when_sql {when!r} is not a SQL condition: {str(exc).splitlines()[0]}") \
            from None
    return {"on_table": table, "when": to_tree(tree, when)}


def to_tree(e, sql: str) -> dict:
    """A sqlglot expression -> the contract's expression tree."""
    from sqlglot import exp

    name = type(e).__name__
    if isinstance(e, exp.Paren):
        return to_tree(e.this, sql)
    if isinstance(e, exp.Column):
        if e.table:
            raise MLSQLError(f"Option trigger: when_sql names {e.sql()}: use the event table's columns, unqualified",
                             hint=f"In {sql!r}.")
        return {"col": e.name}
    if isinstance(e, exp.Boolean):
        return {"lit": e.this}
    if isinstance(e, exp.Null):
        return {"lit": None}
    if isinstance(e, exp.Literal):
        if e.is_string:
            return {"lit": e.this}
        text = e.this
        return {"lit": float(text) if any(c in text for c in ".eE") else int(text)}
    if isinstance(e, exp.Neg):
        inner = to_tree(e.this, sql)
        if "lit" in inner and isinstance(inner["lit"], int | float) and not isinstance(inner["lit"], bool):
            return {"lit": -inner["lit"]}
        return {"op": "neg", "args": [inner]}
    if name in _CMP:
        return {"op": _CMP[name], "args": [to_tree(e.this, sql), to_tree(e.expression, sql)]}
    if name in _ARITH:
        return {"op": _ARITH[name], "args": [to_tree(e.this, sql), to_tree(e.expression, sql)]}
    if name in _BOOL:
        return {"op": _BOOL[name], "args": [to_tree(e.this, sql), to_tree(e.expression, sql)]}
    if isinstance(e, exp.Not):
        if isinstance(e.this, exp.Is) and isinstance(e.this.expression, exp.Null):
            return {"op": "is_not_null", "args": [to_tree(e.this.this, sql)]}
        return {"op": "not", "args": [to_tree(e.this, sql)]}
    if isinstance(e, exp.Is) and isinstance(e.expression, exp.Null):
        return {"op": "is_null", "args": [to_tree(e.this, sql)]}
    if isinstance(e, exp.In) and not e.args.get("query"):
        items = [to_tree(x, sql) for x in e.expressions]
        if not all("lit" in x for x in items):
            raise MLSQLError(f"Option trigger: IN takes literals on the device, in {sql!r}")
        return {"op": "in", "args": [to_tree(e.this, sql), *items]}
    if isinstance(e, exp.Coalesce):
        return {"op": "coalesce", "args": [to_tree(e.this, sql), *(to_tree(x, sql) for x in e.expressions)]}
    if isinstance(e, exp.Case) and e.this is None:
        args = []
        for w in e.args.get("ifs") or []:
            args += [to_tree(w.this, sql), to_tree(w.args["true"], sql)]
        if e.args.get("default") is not None:
            args.append(to_tree(e.args["default"], sql))
        return {"op": "case", "args": args}
    raise MLSQLError(f"Option trigger: when_sql uses {e.sql()!r} ({name}), which the device cannot evaluate",
                     hint="A trigger condition takes the event's columns, literals, arithmetic, comparisons, "
                          "AND/OR/NOT, IS [NOT] NULL, IN (literals), COALESCE and CASE WHEN.")

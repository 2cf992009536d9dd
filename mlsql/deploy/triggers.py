"""DEPLOY's ``trigger`` option: ``STRUCT('app_events' AS on_table, 'kind = ''purchase''' AS when_sql)``.

The condition is SQL the notebook compiles into the expression tree of the feature view contract
(docs/DEVICE.md, "Feature views on the device": ``{"col"}``, ``{"lit"}``, ``{"op", "args"}``) with
the compiler of the views' own expressions (mlsql.language.feature_views.compile_condition), so a
trigger's condition and a feature's FILTER mean the same; the agent evaluates it over each batch of
events and never parses SQL. What the tree cannot say (a function call, a subquery, a column of
another table) is refused here, naming the construct.
"""

from __future__ import annotations

from typing import Any

from mlsql.errors import MLSQLError


def compile_trigger(value: Any) -> dict:
    """The option's STRUCT -> ``{"on_table": NAME, "when": expression tree or None}`` for the agent."""
    if not isinstance(value, dict) or not set(value) <= {"on_table", "when_sql"} or "on_table" not in value:
        raise MLSQLError(
            "Option trigger must be STRUCT('<event table>' AS on_table, '<condition>' AS when_sql)",
            hint="For example: trigger = STRUCT('app_events' AS on_table, 'kind = ''purchase''' AS when_sql); "
            "when_sql may be left out to run on every event.",
        )
    table = value["on_table"]
    if not isinstance(table, str) or not table:
        raise MLSQLError("Option trigger: on_table must be the event table's name (a string)")
    when = value.get("when_sql")
    if when is None:
        return {"on_table": table, "when": None}
    if not isinstance(when, str) or not when.strip():
        raise MLSQLError(
            "Option trigger: when_sql must be a SQL condition (a string), such as 'kind = ''purchase'''"
        )
    from mlsql.language.feature_views import compile_condition

    return {"on_table": table, "when": compile_condition(when, "Option trigger: when_sql")}

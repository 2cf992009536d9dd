"""The training data's statistics, stored with the model at CREATE MODEL and signed into its device
packages, so that a device (and later the notebook) can tell field data from training data
without a copy of the training rows.

Computed by the engine over every training row (aggregates only come back, on DuckDB and on
Spark alike), per raw input column:

- numbers and booleans: ``count`` (non-NULL rows), ``null_rate``, ``mean``, ``std`` (population),
  ``min``, ``max``;
- strings: ``count``, ``null_rate``, ``distinct``, ``values`` (the ``TOP_VALUES`` most frequent,
  most frequent first), ``freq`` (each one's share of the non-NULL rows) and ``other_share``
  (the share of non-NULL rows whose value is not in ``values``: 0 when every value is listed).
  A comparison of field data with training data uses ``other_share`` as the baseline of values
  outside the list, so a column with a long tail is not taken for drift;
- other types (dates, timestamps): ``count`` and ``null_rate``.
"""

from __future__ import annotations

from typing import Any

from mlsql._lazy import pyarrow as pa

TOP_VALUES = 1000  # string values listed per column; their shares and the rest's share are exact


def _ident(name: str) -> str:
    from sqlglot import exp

    return exp.to_identifier(name, quoted=True).sql("duckdb")


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    return "other"


def training_statistics(engine, relation: str, params: dict | None, schema: pa.Schema,
                        columns: list[str]) -> dict[str, dict[str, Any]]:
    """Statistics of ``columns`` of ``relation`` (a relation name or a parenthesized query in
    MLSQL's SQL, with its ``params``), keyed by column name as the schema spells it."""
    by_lower = {f.name.lower(): f for f in schema}
    fields = [by_lower[c.lower()] for c in columns if c.lower() in by_lower]
    if not fields:
        return {}
    parts = ["count(*) AS __n"]
    for i, f in enumerate(fields):
        c = _ident(f.name)
        parts.append(f"count({c}) AS nn_{i}")
        kind = _kind(f.type)
        if kind == "number":
            x = f"CAST({c} AS DOUBLE)"
            parts += [f"avg({x}) AS mean_{i}", f"stddev_pop({x}) AS std_{i}", f"min({x}) AS min_{i}",
                      f"max({x}) AS max_{i}"]
        elif kind == "string":
            parts.append(f"count(DISTINCT {c}) AS nd_{i}")
    row = engine.query(f"SELECT {', '.join(parts)} FROM {relation} AS __t", params).to_pylist()[0]
    total = int(row["__n"])
    out: dict[str, dict[str, Any]] = {}
    for i, f in enumerate(fields):
        count = int(row[f"nn_{i}"])
        st: dict[str, Any] = {"kind": _kind(f.type), "count": count,
                              "null_rate": (total - count) / total if total else 0.0}
        if st["kind"] == "number":
            st.update(mean=row[f"mean_{i}"], std=row[f"std_{i}"], min=row[f"min_{i}"], max=row[f"max_{i}"])
        elif st["kind"] == "string":
            c = _ident(f.name)
            top = engine.query(
                f"SELECT CAST({c} AS VARCHAR) AS v, count(*) AS n FROM {relation} AS __t WHERE {c} IS NOT NULL "
                f"GROUP BY 1 ORDER BY n DESC, v LIMIT {TOP_VALUES}", params)
            values, counts = top.column("v").to_pylist(), top.column("n").to_pylist()
            listed = sum(counts)
            st.update(distinct=int(row[f"nd_{i}"]), values=values,
                      freq={v: n / count for v, n in zip(values, counts)} if count else {},
                      other_share=(count - listed) / count if count else 0.0)
        out[f.name] = st
    return out

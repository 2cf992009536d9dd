"""The training data's statistics, stored with the model at CREATE MODEL and signed into its device
packages, so that a device (and later the notebook) can tell field data from training data
without a copy of the training rows.

Computed by the engine over every training row (aggregates only come back, on DuckDB and on
Spark alike), per raw input column:

- numbers and booleans: ``count`` (non-NULL rows), ``null_rate``, ``mean``, ``std`` (population),
  ``min``, ``max``, and ``histogram``: ``edges`` (``HISTOGRAM_BINS`` equal-width bins from ``min`` to
  ``max``, ``numpy.linspace``'s edges; one bin ``[min, max]`` when they are equal) and ``counts``
  (non-NULL rows per bin: ``edges[j] <= x < edges[j + 1]``, the last bin closed on the right), the
  baseline ``ML.VALIDATE_DATA_SKEW`` bins serving rows into (models trained before it have none);
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
HISTOGRAM_BINS = 10  # equal-width bins of a numeric column's histogram (BigQuery ML's num_histogram_buckets)


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


def _double(v: float) -> str:
    """A float64 as a literal both engines read to the same bits (DuckDB reads 0.1 as a DECIMAL)."""
    return f"CAST('{float(v)!r}' AS DOUBLE)"


def histogram_edges(lo: float, hi: float, bins: int) -> list[float]:
    """``bins`` equal-width bins from ``lo`` to ``hi`` (numpy.linspace's edges); one bin when equal."""
    import numpy as np

    return [float(lo), float(hi)] if hi <= lo else [float(e) for e in np.linspace(lo, hi, bins + 1)]


def bin_counts(engine, relation: str, params: dict | None, edges: dict[str, list[float]]) -> dict[str, list[int]]:
    """Per column of ``edges``: its non-NULL rows of ``relation`` counted into ``[below edges[0],
    edges[0] <= x < edges[1], ..., edges[-2] <= x <= edges[-1], above edges[-1]]`` by the engine
    (one aggregate query: only the counts come back)."""
    if not edges:
        return {}
    parts = []
    for i, (name, e) in enumerate(edges.items()):
        x = f"CAST({_ident(name)} AS DOUBLE)"
        lit = [_double(v) for v in e]
        conds = [f"{x} < {lit[0]}"]
        for j in range(len(e) - 1):
            upper = f"{x} <= {lit[j + 1]}" if j == len(e) - 2 else f"{x} < {lit[j + 1]}"
            conds.append(f"{x} >= {lit[j]} AND {upper}")
        conds.append(f"{x} > {lit[-1]}")
        parts += [f"count(CASE WHEN {c} THEN 1 END) AS b_{i}_{j}" for j, c in enumerate(conds)]
    row = engine.query(f"SELECT {', '.join(parts)} FROM {relation} AS __t", params).to_pylist()[0]
    return {name: [int(row[f"b_{i}_{j}"]) for j in range(len(e) + 1)] for i, (name, e) in enumerate(edges.items())}


def category_counts(engine, relation: str, params: dict | None, name: str,
                    listed: list[str]) -> tuple[dict[str, int], int]:
    """The non-NULL rows of column ``name`` of ``relation`` per value of ``listed`` (as text), and
    how many hold another value: grouped by the engine, at most ``len(listed) + 1`` rows back."""
    from sqlglot import exp

    c = _ident(name)
    v = f"CAST({c} AS VARCHAR)"
    key = (f"CASE WHEN {v} IN ({', '.join(exp.Literal.string(x).sql('duckdb') for x in listed)}) THEN {v} END"
           if listed else "CAST(NULL AS VARCHAR)")
    got = engine.query(f"SELECT {key} AS v, count(*) AS n FROM {relation} AS __t WHERE {c} IS NOT NULL GROUP BY 1",
                       params).to_pylist()
    counts = {r["v"]: int(r["n"]) for r in got if r["v"] is not None}
    return counts, sum(int(r["n"]) for r in got if r["v"] is None)


def training_statistics(engine, relation: str, params: dict | None, schema: pa.Schema,
                        columns: list[str], bins: int = HISTOGRAM_BINS) -> dict[str, dict[str, Any]]:
    """Statistics of ``columns`` of ``relation`` (a relation name or a parenthesized query in
    MLSQL's SQL, with its ``params``), keyed by column name as the schema spells it; numeric
    histograms of ``bins`` bins."""
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
    edges = {name: histogram_edges(st["min"], st["max"], bins) for name, st in out.items()
             if st["kind"] == "number" and st["count"]}
    for name, counts in bin_counts(engine, relation, params, edges).items():
        out[name]["histogram"] = {"edges": edges[name], "counts": counts[1:-1]}  # none below min or above max
    return out

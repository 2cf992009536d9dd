"""``ML.FEATURES_AT(view, (probes))`` as one engine query, written from the view spec (never from the
view's SQL: the spec is what a device computes, so the offline values come from the same definition).

The probes are put among the events (``UNION ALL``) and each feature is the view's own window
aggregate, ``PARTITION BY key ORDER BY <time in microseconds> RANGE BETWEEN w PRECEDING AND CURRENT
ROW``, evaluated at the probe rows: a probe at time ``at`` sees exactly the events with
``at - w <= time <= at`` (the events at ``at`` are its peers, so they are in its frame). Each
feature aggregates one value column ``CASE WHEN <filter> THEN <arg> END`` that is NULL on probe
rows, so probes never count themselves. One sort of the events and probes per key, whatever the
number of features; no join of probes to events.

``last`` is ``arg_max(value, (time, seq))`` over the non-NULL values: ties at the same time go to the
latest event in the event table's order as the engine scans it (``seq``). ``count_distinct`` is
capped at the view's ``max_distinct``.
"""

from __future__ import annotations

from sqlglot import exp

SQL_TYPES = {
    "duckdb": {
        "bool": "BOOLEAN",
        "int64": "BIGINT",
        "float64": "DOUBLE",
        "string": "VARCHAR",
        "timestamp": "TIMESTAMP",
    },
    "spark": {
        "bool": "BOOLEAN",
        "int64": "BIGINT",
        "float64": "DOUBLE",
        "string": "STRING",
        "timestamp": "TIMESTAMP",
    },
}
_OPS = {
    "+": exp.Add,
    "-": exp.Sub,
    "*": exp.Mul,
    "=": exp.EQ,
    "<>": exp.NEQ,
    "<": exp.LT,
    "<=": exp.LTE,
    ">": exp.GT,
    ">=": exp.GTE,
    "and": exp.And,
    "or": exp.Or,
}


def expression(e: dict, casts: dict[str, str] | None = None) -> exp.Expression:
    """A spec expression (``{"col"}``, ``{"lit"}``, ``{"op", "args"}``) as a sqlglot tree, with the
    contract's meaning on every engine (``/`` in float64, x / 0 is NULL). ``casts``: column → SQL
    type, so that arithmetic is in the contract's int64 / float64 whatever the table's own widths
    (an INTEGER column's ``x * 2`` would overflow at 2^31 in DuckDB, not on a device)."""
    if "col" in e:
        col = exp.column(exp.to_identifier(e["col"], quoted=True))
        to = (casts or {}).get(e["col"])
        return exp.Cast(this=col, to=exp.DataType.build(to)) if to else col
    if "lit" in e:
        v = e["lit"]
        if v is None:
            return exp.Null()
        if isinstance(v, bool):
            return exp.Boolean(this=v)
        if isinstance(v, int | float):
            return exp.Literal.number(v) if v >= 0 else exp.Neg(this=exp.Literal.number(-v))
        return exp.Literal.string(str(v))
    op, args = e["op"], [expression(a, casts) for a in e["args"]]
    if op in _OPS:
        return exp.Paren(this=_OPS[op](this=args[0], expression=args[1]))
    if op == "/":
        num = exp.Cast(this=args[0], to=exp.DataType.build("DOUBLE"))
        zero = exp.EQ(this=args[1].copy(), expression=exp.Literal.number(0))
        return exp.Case(
            ifs=[exp.If(this=zero, true=exp.Null())],
            default=exp.Div(this=num, expression=exp.Paren(this=args[1])),
        )
    if op == "neg":
        return exp.Neg(this=exp.Paren(this=args[0]))
    if op == "not":
        return exp.Not(this=exp.Paren(this=args[0]))
    if op == "is_null":
        return exp.Paren(this=exp.Is(this=args[0], expression=exp.Null()))
    if op == "is_not_null":
        return exp.Paren(this=exp.Not(this=exp.Is(this=args[0], expression=exp.Null())))
    if op == "in":
        return exp.Paren(this=exp.In(this=args[0], expressions=args[1:]))
    if op == "coalesce":
        return exp.Coalesce(this=args[0], expressions=args[1:])
    if op == "case":
        ifs = [exp.If(this=c, true=v) for c, v in zip(args[:-1:2], args[1:-1:2])]
        return exp.Case(ifs=ifs, default=args[-1])
    raise ValueError(f"unknown operator {op!r} in a feature view spec")


def value_type(spec: dict, f: dict) -> str | None:
    """The contract type a feature's value column is cast to before it is aggregated (None: left as is)."""
    if f["agg"] in ("count", "avg"):
        return None
    if f["agg"] == "count_distinct":
        return _arg_type(spec, f)
    return f["type"]  # int64 sums in BIGINT (DuckDB would widen to HUGEINT), float64 in DOUBLE


def features_at_sql(
    spec: dict,
    *,
    events: str,
    probes: str,
    probe_columns: list[str],
    key: str,
    at: str,
    at_is_micros: bool,
    dialect: str,
) -> str:
    """The query giving each row of ``probes`` (its columns ``probe_columns``, ``key`` the view's key
    and ``at`` the time) with the view's features as of ``at``. ``events`` and ``probes`` are
    queries in the engine's SQL (``dialect``: 'duckdb' or 'spark'); ``at_is_micros``: the probe's time
    is a whole number of microseconds since the epoch rather than a timestamp."""
    spark = dialect == "spark"
    types = SQL_TYPES["spark" if spark else "duckdb"]

    def q(name: str) -> str:
        return exp.to_identifier(name, quoted=True).sql(dialect)

    def sql(node: exp.Expression) -> str:
        return node.sql(dialect)

    def micros(col: str) -> str:
        return f"unix_micros(CAST({col} AS TIMESTAMP))" if spark else f"epoch_us({col})"

    row_id = "monotonically_increasing_id()" if spark else "row_number() OVER ()"
    key_type = types[next(c["type"] for c in spec["schema"] if c["name"] == spec["key"])]
    has_last = any(f["agg"] == "last" for f in spec["features"])

    casts = {c["name"]: types[c["type"]] for c in spec["schema"] if c["type"] in ("int64", "float64")}
    values, value_types = [], []
    for f in spec["features"]:
        arg = expression(f["arg"], casts) if f["arg"] is not None else exp.Literal.number(1)
        vt = value_type(spec, f)
        if vt is not None:
            arg = exp.Cast(this=arg, to=exp.DataType.build(types[vt]))
        if f["filter"] is not None:
            arg = exp.Case(ifs=[exp.If(this=expression(f["filter"], casts), true=arg)])
        values.append(sql(arg))
        value_types.append(types[vt] if vt is not None else ("BIGINT" if f["arg"] is None else None))
    null_values = []
    for f, vt in zip(spec["features"], value_types):
        t = vt or types[_arg_type(spec, f)]
        null_values.append(f"CAST(NULL AS {t})")

    k, t = q(spec["key"]), q(spec["time_col"])
    ev_cols = [f"CAST({k} AS {key_type}) AS __k", f"{micros(t)} AS __t", "CAST(NULL AS BIGINT) AS __pid"]
    pr_cols = [f"CAST({q(key)} AS {key_type})", q(at) if at_is_micros else micros(q(at)), "__pid"]
    if has_last:
        ev_cols.append(f"{row_id} AS __s")
        pr_cols.append("CAST(NULL AS BIGINT)")
    ev_cols += [f"{v} AS __v{i}" for i, v in enumerate(values)]
    pr_cols += null_values
    carried = [f"__c{i}" for i in range(len(probe_columns))]
    if spark:  # the probe's columns ride along (a CTE read twice would number its rows twice)
        ev_cols += [f"NULL AS {c}" for c in carried]
        pr_cols += [f"{q(c)} AS {a}" for c, a in zip(probe_columns, carried)]

    aggs = []
    for i, f in enumerate(spec["features"]):
        over = (
            f"OVER (PARTITION BY __k ORDER BY __t RANGE BETWEEN {int(f['window_us'])} PRECEDING "
            "AND CURRENT ROW)"
        )
        v = f"__v{i}"
        a = f["agg"]
        if a == "count":
            agg = f"count({v}) {over}"
        elif a == "count_distinct":
            n = int(f.get("max_distinct") or 64)
            inner = f"size(collect_set({v}) {over})" if spark else f"count(DISTINCT {v}) {over}"
            agg = f"least(CAST({inner} AS BIGINT), {n})"
        elif a == "last":
            order = "struct(__t, __s)" if spark else "{'t': __t, 's': __s}"
            fn = "max_by" if spark else "arg_max"
            agg = f"{fn}({v}, CASE WHEN {v} IS NOT NULL THEN {order} END) {over}"
        else:
            agg = f"{a}({v}) {over}"
        aggs.append(f"CAST({agg} AS {types[f['type']]}) AS {q(f['name'])}")

    feats = ", ".join(f"__w.{q(f['name'])}" for f in spec["features"])
    if spark:
        probe_out = ", ".join(f"__w.{a} AS {q(c)}" for c, a in zip(probe_columns, carried))
        return (
            f"WITH __p AS (SELECT {row_id} AS __pid, * FROM ({probes}) AS __q), "
            f"__u AS (SELECT {', '.join(ev_cols)} FROM ({events}) AS __e WHERE {k} IS NOT NULL AND {t} IS NOT NULL "
            f"UNION ALL SELECT {', '.join(pr_cols)} FROM __p), "
            f"__w AS (SELECT __pid, {', '.join(carried + aggs)} FROM __u) "
            f"SELECT {probe_out + ', ' if probe_out else ''}{feats} FROM __w WHERE __w.__pid IS NOT NULL "
            "ORDER BY __w.__pid"
        )
    probe_out = ", ".join(f"__p.{q(c)}" for c in probe_columns)
    return (
        f"WITH __p AS MATERIALIZED (SELECT {row_id} AS __pid, * FROM ({probes}) AS __q), "
        f"__u AS (SELECT {', '.join(ev_cols)} FROM ({events}) AS __e WHERE {k} IS NOT NULL AND {t} IS NOT NULL "
        f"UNION ALL SELECT {', '.join(pr_cols)} FROM __p), "
        f"__w AS (SELECT * FROM (SELECT __pid, {', '.join(aggs)} FROM __u) AS __a WHERE __pid IS NOT NULL) "
        f"SELECT {probe_out + ', ' if probe_out else ''}{feats} FROM __p JOIN __w ON __p.__pid = __w.__pid "
        "ORDER BY __p.__pid"
    )


def _arg_type(spec: dict, f: dict) -> str:
    from mlsql.language.feature_views import expr_type

    types = {c["name"]: c["type"] for c in spec["schema"]}
    return expr_type(f["arg"], types) or "int64"

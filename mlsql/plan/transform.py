"""TRANSFORM: preprocessing fitted at training time and re-applied at prediction.

A TRANSFORM clause is compiled to plain SQL. Fitting runs aggregate queries on
the engine over the training data and writes the statistics back into the
expressions as literals, so ``ML.STANDARD_SCALER(x) OVER ()`` becomes
``(x - 3.2) / 1.1``. The fitted form is a list of ``(name, sql)`` pairs in
DuckDB's dialect: the engine applies it with one SELECT, Spark gets it through
sqlglot, and the ONNX exporter compiles the same expressions into the graph.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
from sqlglot import exp

from mlsql.errors import MLSQLError, UnknownColumnError, UnknownFunctionError
from mlsql.language.functions import TRANSFORM_FUNCTIONS as FUNCTIONS

RunSQL = Callable[[str], pa.Table]


@dataclass
class FittedTransform:
    """The fitted TRANSFORM: output columns as SQL over the raw input columns."""

    items: list[tuple[str, str]]
    input_columns: list[str] = field(default_factory=list)
    # for each output, the raw columns it reads
    reads: dict[str, list[str]] = field(default_factory=dict)
    # the dialect the items are written in: every engine and the ONNX compiler read them in it
    # (DuckDB's LOG(x) is base 10; rendered for Spark it becomes LOG(10, x), not Spark's natural log)
    dialect: str = "duckdb"

    @property
    def output_columns(self) -> list[str]:
        return [name for name, _ in self.items]

    def select_sql(self, source: str, available: list[str], optional: set[str] = frozenset()) -> str:
        """``SELECT <items> FROM source``; items in ``optional`` are dropped when their inputs are absent."""
        have = {c.lower() for c in available}
        parts = []
        for name, sql in self.items:
            missing = [c for c in self.reads.get(name, []) if c.lower() not in have]
            if missing:
                if name.lower() in {o.lower() for o in optional}:
                    continue
                raise UnknownColumnError(
                    missing[0],
                    available,
                    message=f"Input has no column '{missing[0]}', needed by TRANSFORM output '{name}'",
                )
            if self.dialect != "duckdb":  # engines read MLSQL's (DuckDB) SQL and render it themselves
                sql = _parse(sql, self.dialect).sql("duckdb")
            parts.append(f"{sql} AS {exp.to_identifier(name).sql('duckdb')}")
        return f"SELECT {', '.join(parts)} FROM {source}"

    def to_json(self) -> str:
        return json.dumps(
            {"items": self.items, "input_columns": self.input_columns, "reads": self.reads,
             "dialect": self.dialect}, indent=1
        )

    @classmethod
    def from_json(cls, text: str) -> FittedTransform:
        d = json.loads(text)
        return cls([tuple(i) for i in d["items"]], d.get("input_columns", []), d.get("reads", {}),
                   d.get("dialect", "duckdb"))


def ml_call(node: exp.Expression) -> tuple[str, list[exp.Expression]] | None:
    """``(NAME, args)`` when ``node`` is an ``ML.NAME(...)`` call (with or without OVER)."""
    if isinstance(node, exp.Window):
        node = node.this
    if isinstance(node, exp.Dot) and isinstance(node.expression, exp.Anonymous):
        owner = node.this
        if isinstance(owner, (exp.Identifier, exp.Column)) and owner.name.upper() == "ML":
            return node.expression.name.upper(), list(node.expression.expressions)
    if isinstance(node, exp.Anonymous) and "." in node.name and node.name.upper().startswith("ML."):
        return node.name.split(".", 1)[1].upper(), list(node.expressions)
    return None


def fit_transform(
    items: list[exp.Expression],
    source: str,
    source_columns: list[str],
    run: RunSQL,
) -> FittedTransform:
    """Fit each TRANSFORM item against ``source`` (a relation name) and return the fitted SQL."""
    fitted: list[tuple[str, str]] = []
    reads: dict[str, list[str]] = {}
    lower_cols = {c.lower(): c for c in source_columns}
    for pos, item in enumerate(_expand_star(items, source_columns), start=1):
        name = _output_name(item, pos)
        body = item.this if isinstance(item, exp.Alias) else item
        body = body.copy()
        used = []
        for col in body.find_all(exp.Column):
            if col.table:
                col.set("table", None)
            real = lower_cols.get(col.name.lower())
            if real is None:
                raise UnknownColumnError(
                    col.name,
                    source_columns,
                    message=f"Unknown column '{col.name}' in TRANSFORM item {pos} ('{name}')",
                )
            if real not in used:
                used.append(real)
        body = _fit_calls(body, source, run, pos, name)
        fitted.append((name, body.sql("duckdb")))
        reads[name] = used
    names = [n.lower() for n, _ in fitted]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MLSQLError(f"TRANSFORM produces column '{dupes[0]}' more than once")
    inputs = [c for c in source_columns if any(c in r for r in reads.values())]
    return FittedTransform(fitted, inputs, reads)


def _expand_star(items: list[exp.Expression], columns: list[str]) -> list[exp.Expression]:
    out: list[exp.Expression] = []
    for item in items:
        star = item if isinstance(item, exp.Star) else None
        if isinstance(item, exp.Column) and isinstance(item.this, exp.Star):
            star = item.this
        if star is None:
            out.append(item)
            continue
        except_ = {e.name.lower() for e in (star.args.get("except_") or star.args.get("except") or [])}
        out.extend(exp.column(c, quoted=True) for c in columns if c.lower() not in except_)
    return out


def _output_name(item: exp.Expression, pos: int) -> str:
    if isinstance(item, exp.Alias):
        return item.alias
    if isinstance(item, exp.Column):
        return item.name
    raise MLSQLError(
        f"TRANSFORM item {pos} ({item.sql('duckdb')}) needs a name",
        hint=f"Write it as `{item.sql('duckdb')} AS some_name`.",
    )


def _fit_calls(body: exp.Expression, source: str, run: RunSQL, pos: int, name: str) -> exp.Expression:
    # Innermost calls first, so an outer scaler sees the already-fitted inner expression.
    def visit(node: exp.Expression) -> exp.Expression:
        call = ml_call(node)
        if call is None:
            return node
        fname, args = call
        if fname not in FUNCTIONS:
            raise UnknownFunctionError(
                f"ML.{fname}",
                [f"ML.{f}" for f in FUNCTIONS],
                message=f"Unknown TRANSFORM function 'ML.{fname}' in item {pos} ('{name}')",
            )
        if not args:
            raise MLSQLError(f"ML.{fname} in TRANSFORM item {pos} ('{name}') needs an argument")
        return _FITTERS[fname](args[0], args[1:], source, run, f"ML.{fname} in TRANSFORM item {pos}")

    return body.transform(visit, copy=False)


# -- one fitter per function ------------------------------------------------


def _scalar(run: RunSQL, sql: str) -> list:
    row = run(sql).to_pylist()
    return list(row[0].values()) if row else []


def _num(v: float | None) -> exp.Expression:
    if v is None or v != v:
        return exp.null()
    return exp.Literal.number(repr(float(v)))


def _paren(e: exp.Expression) -> exp.Expression:
    return exp.paren(e.copy(), copy=False)


def _parse(sql: str, dialect: str = "duckdb") -> exp.Expression:
    import sqlglot

    return sqlglot.parse_one(sql, read=dialect)


def _arg_literal(args: list[exp.Expression], i: int, default, where: str):
    if len(args) <= i:
        return default
    from mlsql.language.options import read_literal

    v = read_literal(args[i], where=f"{where}: argument {i + 1}")
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _fit_standard(e, args, source, run, where):
    mean, std = _scalar(run, f"SELECT avg({e.sql('duckdb')}), stddev_samp({e.sql('duckdb')}) FROM {source}")
    std = std if std not in (None, 0) and std == std else 1.0
    return _parse(f"(({e.sql('duckdb')}) - {_num(mean).sql()}) / {_num(std).sql()}")


def _fit_min_max(e, args, source, run, where):
    lo, hi = _scalar(run, f"SELECT min({e.sql('duckdb')}), max({e.sql('duckdb')}) FROM {source}")
    if lo is None:
        return exp.null()
    span = (hi - lo) or 1.0
    x = e.sql("duckdb")
    return _parse(
        f"CASE WHEN ({x}) < {_num(lo).sql()} THEN 0.0 WHEN ({x}) > {_num(hi).sql()} THEN 1.0 "
        f"ELSE (({x}) - {_num(lo).sql()}) / {_num(span).sql()} END"
    )


def _fit_max_abs(e, args, source, run, where):
    (m,) = _scalar(run, f"SELECT max(abs({e.sql('duckdb')})) FROM {source}")
    return _parse(f"({e.sql('duckdb')}) / {_num(m or 1.0).sql()}")


def _bucket_case(e: exp.Expression, bounds: list[float]) -> exp.Expression:
    x = e.sql("duckdb")
    whens = " ".join(
        f"WHEN ({x}) < {_num(b).sql()} THEN 'bin_{i}'" for i, b in enumerate(bounds, start=1)
    )
    return _parse(f"CASE WHEN ({x}) IS NULL THEN NULL {whens} ELSE 'bin_{len(bounds) + 1}' END")


def _fit_bucketize(e, args, source, run, where):
    if not args or not isinstance(args[0], exp.Array):
        raise MLSQLError(f"{where}: expects an array of split points, e.g. ML.BUCKETIZE(x, [1, 5, 10])")
    bounds = []
    for b in args[0].expressions:
        v = _arg_literal([b], 0, None, where)
        if not isinstance(v, float):
            raise MLSQLError(f"{where}: split points must be numbers, got {b.sql('duckdb')}")
        bounds.append(v)
    if bounds != sorted(bounds):
        raise MLSQLError(f"{where}: split points must be in increasing order")
    return _bucket_case(e, bounds)


def _fit_quantile_bucketize(e, args, source, run, where):
    n = _arg_literal(args, 0, None, where)
    if not isinstance(n, float) or n < 2 or n != int(n):
        raise MLSQLError(f"{where}: the number of buckets must be an integer ≥ 2")
    n = int(n)
    qs = ", ".join(repr(i / n) for i in range(1, n))
    (bounds,) = _scalar(run, f"SELECT quantile_cont({e.sql('duckdb')}, [{qs}]) FROM {source}")
    bounds = sorted(set(b for b in (bounds or []) if b is not None))
    return _bucket_case(e, bounds)


def _fit_imputer(e, args, source, run, where):
    strategy = str(_arg_literal(args, 0, "mean", where)).lower()
    agg = {"mean": "avg", "median": "median", "most_frequent": "mode"}.get(strategy)
    if agg is None:
        raise MLSQLError(f"{where}: unknown strategy '{strategy}'", hint="Use 'mean', 'median' or 'most_frequent'.")
    (v,) = _scalar(run, f"SELECT {agg}({e.sql('duckdb')}) FROM {source}")
    lit = exp.Literal.string(v) if isinstance(v, str) else _num(v)
    return exp.func("COALESCE", _paren(e), lit)


def _categories(e, source, run, top_k: int, threshold: int) -> list[str]:
    x = e.sql("duckdb")
    t = run(
        f"SELECT CAST({x} AS VARCHAR) AS v, count(*) AS n FROM {source} WHERE ({x}) IS NOT NULL "
        f"GROUP BY 1 HAVING count(*) >= {int(threshold)} ORDER BY n DESC, v LIMIT {int(top_k)}"
    )
    return sorted(t.column("v").to_pylist())


def _in_list(x: str, values: list[str]) -> str:
    return ", ".join(exp.Literal.string(v).sql("duckdb") for v in values) if values else "NULL"


def _fit_label_encoder(e, args, source, run, where):
    top_k = int(_arg_literal(args, 0, 1_000_000, where))
    thr = int(_arg_literal(args, 1, 0, where))
    cats = _categories(e, source, run, top_k, thr)
    x = f"CAST({e.sql('duckdb')} AS VARCHAR)"
    if not cats:
        return exp.Literal.number(0)
    whens = " ".join(f"WHEN {exp.Literal.string(c).sql('duckdb')} THEN {i}" for i, c in enumerate(cats, 1))
    return _parse(f"CASE {x} {whens} ELSE 0 END")


def _fit_one_hot(e, args, source, run, where):
    # The category itself comes out; automatic encoding one-hot encodes it for
    # linear models. Rare and unseen values become NULL, BigQuery's "other" bucket.
    drop = str(_arg_literal(args, 0, "none", where)).lower()
    top_k = int(_arg_literal(args, 1, 32000, where))
    thr = int(_arg_literal(args, 2, 5, where))
    if drop not in ("none", "most_frequent"):
        raise MLSQLError(f"{where}: drop must be 'none' or 'most_frequent'")
    cats = _categories(e, source, run, top_k, thr)
    x = f"CAST({e.sql('duckdb')} AS VARCHAR)"
    return _parse(f"CASE WHEN {x} IN ({_in_list(x, cats)}) THEN {x} ELSE NULL END")


_FITTERS = {
    "STANDARD_SCALER": _fit_standard,
    "MIN_MAX_SCALER": _fit_min_max,
    "MAX_ABS_SCALER": _fit_max_abs,
    "BUCKETIZE": _fit_bucketize,
    "QUANTILE_BUCKETIZE": _fit_quantile_bucketize,
    "IMPUTER": _fit_imputer,
    "LABEL_ENCODER": _fit_label_encoder,
    "ONE_HOT_ENCODER": _fit_one_hot,
}

"""A feature view's SELECT → its view spec, the JSON document the workspace stores, a model package
carries and a device agent installs (docs/LANGUAGE.md, Feature views; the agent never reads SQL).

A feature view is DuckDB window SQL restricted to what a device can compute incrementally: one
event table, aggregates (count, sum, avg, min, max, ``arg_max(x, time_col)``, ``count(DISTINCT x)``)
each with an optional ``FILTER (WHERE ...)`` and per-row expressions inside, over trailing time
ranges ``PARTITION BY key ORDER BY time_col RANGE BETWEEN INTERVAL ... PRECEDING AND CURRENT ROW``.
Anything else is refused here with a :class:`FeatureViewError` naming the construct and where it
is in the statement. Pure: the event table's schema comes in as ``[(name, arrow type text)]``.
"""

from __future__ import annotations

import re
from typing import Any

from sqlglot import exp

from mlsql.errors import FeatureViewError, MLSQLError, OptionError, UnknownColumnError
from mlsql.language.positions import extent

FORMAT = 1
TYPES = ("bool", "int64", "float64", "string", "timestamp")
NUMERIC = ("int64", "float64")
_UNIT_US = {
    "microsecond": 1,
    "millisecond": 1_000,
    "second": 1_000_000,
    "minute": 60_000_000,
    "hour": 3_600_000_000,
    "day": 86_400_000_000,
    "week": 604_800_000_000,
}
_BINARY = {
    exp.Add: "+",
    exp.Sub: "-",
    exp.Mul: "*",
    exp.Div: "/",
    exp.EQ: "=",
    exp.NEQ: "<>",
    exp.LT: "<",
    exp.LTE: "<=",
    exp.GT: ">",
    exp.GTE: ">=",
    exp.And: "and",
    exp.Or: "or",
}
_COMPARE = ("=", "<>", "<", "<=", ">", ">=")


def spec_type(arrow_type: str) -> str | None:
    """The contract's column type of an Arrow type (its text), or None for one a device cannot hold."""
    t = arrow_type.lower()
    if t == "bool":
        return "bool"
    if re.fullmatch(r"u?int(8|16|32|64)", t):
        return "int64"
    if t in ("halffloat", "float", "double") or t.startswith("decimal"):
        return "float64"
    if t in ("string", "large_string", "string_view", "utf8", "large_utf8"):
        return "string"
    if t.startswith("timestamp"):
        return "timestamp"
    return None


class _Compiler:
    inside = "inside a feature"  # where an expression is, in a refusal

    def __init__(self, name: str, options: dict, schema: list[tuple[str, str]], sql: str, start: int):
        self.name, self.options, self.sql, self.start = name, options, sql, start
        self.types = {n.lower(): spec_type(t) for n, t in schema}
        self.raw_types = {n.lower(): t for n, t in schema}
        self.names = {n.lower(): n for n, _ in schema}
        self.key = str(options["key"])
        self.time_col = str(options["time_col"])
        self.ttl_us = int(round(float(options["ttl"]) * 1_000_000))

    # -- where a construct is ----------------------------------------------------------------
    def at(self, node: exp.Expression | None, word: str | None = None, *, before: bool = False):
        """Offsets in the script of ``node`` or, with ``word``, of that word at or after (``before``:
        the last one before) the node's first token, within the statement."""
        span = extent(node) if node is not None else None
        if word is None:
            return span
        rel = (span[0] - self.start) if span is not None else 0
        pattern = re.compile(r"(?<![\w$])" + word + r"(?![\w$])", re.IGNORECASE)
        if before:
            hits = list(pattern.finditer(self.sql, 0, max(rel, 0)))
            m = hits[-1] if hits else None
        else:
            m = pattern.search(self.sql, max(rel, 0))
        if m is None:
            return span
        return self.start + m.start(), self.start + m.end()

    def refuse(self, message: str, node=None, word: str | None = None, *, before: bool = False, hint=None):
        raise FeatureViewError(
            f"CREATE FEATURE VIEW {self.name}: {message}", at=self.at(node, word, before=before), hint=hint
        )

    # -- the statement -------------------------------------------------------------------------
    def compile(self, query: exp.Expression, table: str) -> dict:
        select = query
        if not isinstance(select, exp.Select):
            what = type(select).__name__.upper()
            self.refuse(
                f"a {what} is not a feature view: write one SELECT over one event table",
                select,
                what if what in ("UNION", "INTERSECT", "EXCEPT") else None,
            )
        where = select.args.get("where")
        for sub in select.find_all(exp.Subquery, exp.Select):
            if sub is not select:
                self.refuse(
                    "a subquery cannot run on a device: a feature view reads its event table only",
                    sub,
                    r"\(\s*SELECT",
                    before=True,
                )
        for arg, what in (
            ("joins", "a JOIN"),
            ("group", "GROUP BY"),
            ("having", "HAVING"),
            ("order", "ORDER BY"),
            ("limit", "LIMIT"),
            ("qualify", "QUALIFY"),
            ("distinct", "SELECT DISTINCT"),
            ("with", "WITH"),
            ("with_", "WITH"),
        ):
            node = select.args.get(arg)
            if node:
                node = node[0] if isinstance(node, list) else node
                word = {
                    "a JOIN": "JOIN",
                    "GROUP BY": "GROUP",
                    "ORDER BY": "ORDER",
                    "SELECT DISTINCT": "DISTINCT",
                }.get(what, what)
                self.refuse(
                    f"{what} is not allowed: a feature view aggregates one event table by its key over "
                    "trailing time windows",
                    node,
                    word,
                    before=arg == "joins",
                )
        if event_table(select) is None:
            self.refuse("a feature view reads one event table: FROM <table>", select, "FROM")
        self.check_columns()
        windows = {w.name.lower(): w for w in select.args.get("windows") or []}
        features: list[dict] = []
        seen: set[str] = set()
        base_filter = self.expr(where.this) if where is not None else None
        for item in select.expressions:
            value = item.this if isinstance(item, exp.Alias) else item
            if isinstance(value, exp.Column) and value.name.lower() in (
                self.key.lower(),
                self.time_col.lower(),
            ):
                self.column(value)
                continue
            if not isinstance(value, exp.Window):
                self.refuse(
                    f"'{item.sql('duckdb')}' is not a window aggregate: a feature view's columns are its "
                    "key and aggregates OVER a trailing time window",
                    item,
                )
            if not isinstance(item, exp.Alias):
                self.refuse("each feature needs a name: <aggregate> OVER <window> AS <name>", item)
            name = item.alias
            if name.lower() in seen:
                self.refuse(f"two features are named {name}", item.args["alias"])
            seen.add(name.lower())
            features.append(self.feature(name, value, windows, base_filter))
        if not features:
            self.refuse("the view has no features: add <aggregate> OVER <window> AS <name>", select)
        schema = [{"name": self.names[n], "type": t} for n, t in self.types.items() if t is not None]
        return {
            "format": FORMAT,
            "name": self.name,
            "table": table,
            "key": self.names[self.key.lower()],
            "time_col": self.names[self.time_col.lower()],
            "ttl_us": self.ttl_us,
            "schema": schema,
            "features": features,
        }

    def check_columns(self) -> None:
        for opt in ("key", "time_col"):
            col = str(self.options[opt])
            if col.lower() not in self.types:
                err = UnknownColumnError(
                    col,
                    list(self.names.values()),
                    message=f"Option {opt} = '{col}': the event table has no column '{col}'",
                )
                raise err
        tt = self.raw_types[self.time_col.lower()]
        if self.types[self.time_col.lower()] != "timestamp":
            self.option_error(
                "time_col",
                f"Option time_col = '{self.time_col}': the column is {tt}, not a TIMESTAMP",
                "A feature view's windows are time ranges over a TIMESTAMP column.",
            )
        if self.types[self.key.lower()] not in ("int64", "string"):  # what the agent keys its state by
            self.option_error(
                "key",
                f"Option key = '{self.key}': the column is {self.raw_types[self.key.lower()]}",
                "A key is a whole number or a string (the device keys its state by one of these).",
            )

    @staticmethod
    def option_error(option: str, message: str, hint: str) -> None:
        """An error about an option's value: the session points at the value in OPTIONS (...)."""
        err = OptionError(message, hint=hint)
        err.option, err.statement_kind = option, "CREATE FEATURE VIEW"
        raise err

    # -- one feature ---------------------------------------------------------------------------
    def feature(self, name: str, win: exp.Window, windows: dict, base_filter) -> dict:
        window_us = self.window(win, windows)
        agg = win.this
        filt = None
        if isinstance(agg, exp.Filter):
            filt = self.expr(agg.expression.this if isinstance(agg.expression, exp.Where) else agg.expression)
            agg = agg.this
        if base_filter is not None:
            filt = base_filter if filt is None else {"op": "and", "args": [base_filter, filt]}
        if filt is not None and self.type_of(filt) not in ("bool", None):
            self.refuse(f"the FILTER of {name} is not a condition", win)
        out: dict[str, Any] = {"name": name}
        if isinstance(agg, exp.Count):
            inner = agg.this
            if isinstance(inner, exp.Star) or inner is None:
                out.update(agg="count", arg=None)
            elif isinstance(inner, exp.Distinct):
                if len(inner.expressions) != 1:
                    self.refuse("count(DISTINCT ...) takes one expression", agg)
                out.update(agg="count_distinct", arg=self.expr(inner.expressions[0]))
            else:
                out.update(agg="count", arg=self.expr(inner))
        elif isinstance(agg, exp.Sum | exp.Avg | exp.Min | exp.Max):
            if isinstance(agg.this, exp.Distinct):
                self.refuse(
                    f"{agg.key}(DISTINCT ...) is not supported: only count(DISTINCT x) is", agg, "DISTINCT"
                )
            out.update(agg=agg.key.lower(), arg=self.expr(agg.this))
        elif isinstance(agg, exp.ArgMax):
            by = agg.expression
            if not (isinstance(by, exp.Column) and by.name.lower() == self.time_col.lower()):
                self.refuse(
                    f"arg_max(x, y) is supported with y = the time column {self.time_col} only (the last "
                    "value in the window)",
                    by if by is not None else agg,
                )
            out.update(agg="last", arg=self.expr(agg.this))
        else:
            what = agg.sql_name() if isinstance(agg, exp.Func) else type(agg).__name__
            if isinstance(agg, exp.Anonymous):
                what = str(agg.this)
            self.refuse(
                f"the aggregate {what.lower()}(...) is not supported in a feature view",
                agg,
                hint="Supported: count(*), count(x), count(DISTINCT x), sum, avg, min, max, "
                "arg_max(x, <time_col>), each with FILTER (WHERE ...).",
            )
        arg_type = self.type_of(out["arg"]) if out["arg"] is not None else None
        if out["agg"] in ("sum", "avg") and arg_type not in NUMERIC + (None,):
            self.refuse(f"{out['agg']}() of a {arg_type} value", agg)
        out["filter"] = filt
        out["window_us"] = window_us
        out["type"] = (
            {
                "count": "int64",
                "count_distinct": "int64",
                "avg": "float64",
                "sum": "int64" if arg_type in ("int64", "bool") else "float64",
            }.get(out["agg"])
            or arg_type
            or "float64"
        )
        if out["agg"] == "count_distinct":
            out["max_distinct"] = int(self.options.get("max_distinct") or 64)
        return out

    def window(self, win: exp.Window, windows: dict) -> int:
        named = win.args.get("alias")  # OVER w: the window the WINDOW clause names
        spec_node = win
        if named is not None and not win.args.get("partition_by") and not win.args.get("spec"):
            ref = windows.get(named.name.lower())
            if ref is None:
                self.refuse(f"OVER {named.name}: no window of that name in the WINDOW clause", named)
            spec_node = ref
        at = spec_node.this if spec_node is not win else win.this  # the window's name, or the aggregate
        parts = spec_node.args.get("partition_by") or []
        if not parts:
            self.refuse(
                f"a window without PARTITION BY {self.key}: every window is partitioned by the view's key",
                at,
                "OVER" if spec_node is win else None,
            )
        if len(parts) > 1:
            self.refuse(
                f"a second partition key ({parts[1].sql('duckdb')}): a feature view has one key, {self.key}",
                parts[1],
            )
        if not (isinstance(parts[0], exp.Column) and parts[0].name.lower() == self.key.lower()):
            self.refuse(f"PARTITION BY {parts[0].sql('duckdb')}: the view's key is {self.key}", parts[0])
        order = spec_node.args.get("order")
        keys = order.expressions if order is not None else []
        if (
            len(keys) != 1
            or not isinstance(keys[0].this, exp.Column)
            or keys[0].this.name.lower() != self.time_col.lower()
            or keys[0].args.get("desc")
        ):
            node = keys[0] if keys else parts[0]
            self.refuse(
                f"a window must be ORDER BY {self.time_col} (the view's time column, ascending)",
                node,
                None if keys else "ORDER",
            )
        order_at = keys[0]
        frame = spec_node.args.get("spec")
        if frame is None:
            self.refuse(
                "a window without a frame runs from the first event (unbounded): write RANGE BETWEEN "
                "INTERVAL ... PRECEDING AND CURRENT ROW",
                order_at,
            )
        kind = str(frame.args.get("kind") or "").upper()
        if kind != "RANGE":
            self.refuse(
                f"a {kind} frame counts rows, not time: a feature view's windows are RANGE BETWEEN "
                "INTERVAL ... PRECEDING AND CURRENT ROW",
                order_at,
                kind,
            )
        start, side = frame.args.get("start"), str(frame.args.get("start_side") or "").upper()
        end, end_side = frame.args.get("end"), str(frame.args.get("end_side") or "").upper()
        if (
            isinstance(start, str)
            and start.upper() == "UNBOUNDED"
            or isinstance(end, str)
            and end.upper() == "UNBOUNDED"
        ):
            self.refuse(
                "an unbounded window keeps every event: give it a length (INTERVAL ... PRECEDING)",
                order_at,
                "UNBOUNDED",
            )
        if side == "FOLLOWING" or end_side == "FOLLOWING":
            self.refuse(
                "a FOLLOWING window reads events after the time it is computed at (the future)",
                order_at,
                "FOLLOWING",
            )
        if not (isinstance(end, str) and end.upper() == "CURRENT ROW") or side != "PRECEDING":
            self.refuse(
                "a window must end at CURRENT ROW and start INTERVAL ... PRECEDING", order_at, "RANGE"
            )
        if frame.args.get("exclude"):
            self.refuse("EXCLUDE in a window frame is not supported", order_at, "EXCLUDE")
        us = self.interval_us(start, order_at)
        if us > self.ttl_us:
            self.refuse(
                f"the window INTERVAL {_interval_words(start)} is longer than the view's ttl "
                f"({self.ttl_us / 86_400_000_000:g} days): a device keeps a key's events for ttl only",
                order_at,
                "INTERVAL",
            )
        return us

    def interval_us(self, node, at) -> int:
        if not isinstance(node, exp.Interval):
            self.refuse(
                f"the window's length {node.sql('duckdb') if isinstance(node, exp.Expression) else node} "
                "is not an INTERVAL",
                at,
                "RANGE",
            )
        text = node.this.name if node.this is not None else ""
        unit = node.args.get("unit")
        if unit is not None:
            text = f"{text} {unit.name}"
        total, found = 0, False
        for m in re.finditer(r"(\d+)\s*([a-z]+)", text.lower()):
            u = m.group(2).rstrip("s") if m.group(2) not in ("ms", "us") else m.group(2)
            u = {
                "ms": "millisecond",
                "us": "microsecond",
                "min": "minute",
                "sec": "second",
                "hr": "hour",
                "h": "hour",
                "d": "day",
            }.get(u, u)
            if u not in _UNIT_US:
                self.refuse(
                    f"INTERVAL {text}: a window's length is a fixed time (microseconds to weeks); "
                    f"{m.group(2)} has no fixed length",
                    at,
                    "INTERVAL",
                )
            total += int(m.group(1)) * _UNIT_US[u]
            found = True
        if not found or total <= 0:
            self.refuse(f"INTERVAL {text} is not a window length", at, "INTERVAL")
        return total

    # -- per-row expressions -------------------------------------------------------------------
    def column(self, node: exp.Column) -> dict:
        name = node.name
        if node.table and node.table.lower() not in ("",):
            pass  # app_events.price: the one table's column
        if name.lower() not in self.types:
            err = UnknownColumnError(name, list(self.names.values()), where="in the event table")
            err.at = self.at(node)
            raise err
        if self.types[name.lower()] is None:
            self.refuse(
                f"column {name} is {self.raw_types[name.lower()]}, which a device cannot aggregate "
                f"(it holds {', '.join(TYPES)})",
                node,
            )
        return {"col": self.names[name.lower()]}

    def expr(self, node: exp.Expression) -> dict:
        if isinstance(node, exp.Paren):
            return self.expr(node.this)
        if isinstance(node, exp.Column):
            return self.column(node)
        if isinstance(node, exp.Literal):
            if node.is_string:
                return {"lit": node.this}
            v = float(node.this)
            return {"lit": int(node.this) if re.fullmatch(r"-?\d+", node.this) else v}
        if isinstance(node, exp.Boolean):
            return {"lit": bool(node.this)}
        if isinstance(node, exp.Null):
            return {"lit": None}
        if isinstance(node, exp.Neg):
            inner = self.expr(node.this)
            if (
                "lit" in inner
                and isinstance(inner["lit"], int | float)
                and not isinstance(inner["lit"], bool)
            ):
                return {"lit": -inner["lit"]}
            return {"op": "neg", "args": [inner]}
        if type(node) in _BINARY:
            op = _BINARY[type(node)]
            args = [self.expr(node.this), self.expr(node.expression)]
            if op in ("+", "-", "*", "/"):
                for a, side in zip(args, (node.this, node.expression)):
                    if self.type_of(a) not in NUMERIC + (None,):  # the agent's arithmetic: numbers only
                        self.refuse(f"'{op}' of a {self.type_of(a)} value", side)
            return {"op": op, "args": args}
        if isinstance(node, exp.Not):
            inner = node.this.this if isinstance(node.this, exp.Paren) else node.this
            if isinstance(inner, exp.Is) and isinstance(inner.expression, exp.Null):
                return {"op": "is_not_null", "args": [self.expr(inner.this)]}
            return {"op": "not", "args": [self.expr(node.this)]}
        if isinstance(node, exp.Is):
            if not isinstance(node.expression, exp.Null):
                self.refuse("IS is supported as IS NULL / IS NOT NULL only", node)
            return {"op": "is_null", "args": [self.expr(node.this)]}
        if isinstance(node, exp.In):
            if node.args.get("query") is not None or node.args.get("unnest") is not None:
                self.refuse("IN (subquery) cannot run on a device", node)
            values = [self.expr(v) for v in node.expressions]
            if any("lit" not in v for v in values):
                self.refuse("IN (...) takes literal values only", node)
            return {"op": "in", "args": [self.expr(node.this), *values]}
        if isinstance(node, exp.Coalesce):
            return {
                "op": "coalesce",
                "args": [self.expr(node.this), *(self.expr(x) for x in node.expressions)],
            }
        if isinstance(node, exp.Case):
            if node.this is not None:  # CASE x WHEN v THEN ...: each WHEN as x = v
                base = self.expr(node.this)
                args = []
                for w in node.args.get("ifs") or []:
                    args += [{"op": "=", "args": [base, self.expr(w.this)]}, self.expr(w.args["true"])]
            else:
                args = []
                for w in node.args.get("ifs") or []:
                    args += [self.expr(w.this), self.expr(w.args["true"])]
            default = node.args.get("default")
            args.append(self.expr(default) if default is not None else {"lit": None})
            return {"op": "case", "args": args}
        if isinstance(node, exp.If):
            return {
                "op": "case",
                "args": [
                    self.expr(node.this),
                    self.expr(node.args["true"]),
                    self.expr(node.args["false"]) if node.args.get("false") is not None else {"lit": None},
                ],
            }
        what = node.sql_name() if isinstance(node, exp.Func) else type(node).__name__
        if isinstance(node, exp.Anonymous):
            what = str(node.this)
        self.refuse(
            f"{what.lower()}(...) is not supported {self.inside}: a device evaluates + - * /, "
            "comparisons, AND/OR/NOT, IS [NOT] NULL, IN, COALESCE and CASE",
            node,
            hint=None,
        )
        raise AssertionError  # unreachable

    def type_of(self, e: dict | None) -> str | None:
        return expr_type(e, {self.names[k]: t for k, t in self.types.items()})


def _interval_words(node: exp.Interval) -> str:
    unit = node.args.get("unit")
    return (
        f"{node.this.name if node.this is not None else ''} {unit.name if unit is not None else ''}".strip()
    )


def expr_type(e: dict | None, types: dict[str, str | None]) -> str | None:
    """The contract type of an expression of a spec (None: the NULL literal, of any type)."""
    if e is None:
        return None
    if "col" in e:
        return types.get(e["col"])
    if "lit" in e:
        v = e["lit"]
        return (
            None
            if v is None
            else "bool"
            if isinstance(v, bool)
            else "int64"
            if isinstance(v, int)
            else "float64"
            if isinstance(v, float)
            else "string"
        )
    op, args = e["op"], e["args"]
    if op in ("+", "-", "*"):
        ts = {expr_type(a, types) for a in args} - {None}
        return "float64" if "float64" in ts else "int64"
    if op == "/":
        return "float64"
    if op == "neg":
        return expr_type(args[0], types)
    if op in ("coalesce", "case"):
        vals = args if op == "coalesce" else [*args[1:-1:2], args[-1]]
        ts = {expr_type(a, types) for a in vals} - {None}
        if ts <= {"int64", "float64", "bool"} and "float64" in ts:
            return "float64"
        if ts == {"int64", "bool"}:
            return "int64"
        return next(iter(ts)) if len(ts) == 1 else (sorted(ts)[0] if ts else None)
    return "bool"


def compile_view(
    name: str,
    query: exp.Expression,
    options: dict,
    schema: list[tuple[str, str]],
    *,
    table: str,
    sql: str,
    start: int = 0,
) -> dict:
    """The view spec of ``CREATE FEATURE VIEW name OPTIONS (options) AS query`` over an event table
    ``table`` whose columns are ``schema`` (name, Arrow type text). ``sql`` is the statement's text and
    ``start`` its offset in the script: a refusal's ``at`` is offsets in the script."""
    spec = _Compiler(name, options, schema, sql, start).compile(query, table)
    spec["sql"] = sql
    return spec


class _Condition(_Compiler):
    """A condition with no table at hand (DEPLOY's trigger ``when_sql``): the same expressions as a
    feature's, its columns taken by name; the agent checks them against its view's schema."""

    inside = "in a trigger condition"

    def __init__(self, sql: str, what: str):
        self.sql, self.start, self.what = sql, 0, what

    def column(self, node: exp.Column) -> dict:
        if node.table:
            self.refuse(f"names {node.sql()}: use the event table's columns, unqualified", node)
        return {"col": node.name}

    def type_of(self, e: dict | None) -> str | None:
        return None  # no schema here: the agent types the tree against the view's

    def refuse(self, message: str, node=None, word: str | None = None, *, before: bool = False, hint=None):
        where = f" ({node.sql()!r} in {self.sql!r})" if node is not None else f" (in {self.sql!r})"
        raise MLSQLError(f"{self.what}: {message}{where}", hint=hint)


def compile_condition(sql: str, what: str) -> dict:
    """A SQL condition (``kind = 'purchase' AND price > 5``) as the contract's expression tree, the
    way a feature's FILTER is compiled; ``what`` names it in an error (``Option trigger: when_sql``)."""
    import sqlglot
    from sqlglot.errors import ParseError

    try:
        tree = sqlglot.parse_one(sql, read="duckdb", into=exp.Condition)
    except ParseError as exc:
        raise MLSQLError(f"{what} {sql!r} is not a SQL condition: {str(exc).splitlines()[0]}") from None
    return _Condition(sql, what).expr(tree)


def event_table(query: exp.Expression) -> exp.Table | None:
    """The one table a feature view's SELECT reads, or None."""
    src = query.args.get("from_") or query.args.get("from") if isinstance(query, exp.Select) else None
    return src.this if src is not None and isinstance(src.this, exp.Table) else None


def describe_expr(e: dict | None) -> str:
    """A spec expression written back as SQL (DESCRIBE FEATURE VIEW)."""
    if e is None:
        return ""
    if "col" in e:
        return e["col"]
    if "lit" in e:
        v = e["lit"]
        return (
            "NULL"
            if v is None
            else ("TRUE" if v else "FALSE")
            if isinstance(v, bool)
            else "'" + v.replace("'", "''") + "'"
            if isinstance(v, str)
            else repr(v)
        )
    op, args = e["op"], [describe_expr(a) for a in e["args"]]
    if op in ("+", "-", "*", "/", "and", "or", *_COMPARE):
        return f"({args[0]} {op.upper() if op in ('and', 'or') else op} {args[1]})"
    if op == "neg":
        return f"-{args[0]}"
    if op == "not":
        return f"NOT {args[0]}"
    if op == "is_null":
        return f"{args[0]} IS NULL"
    if op == "is_not_null":
        return f"{args[0]} IS NOT NULL"
    if op == "in":
        return f"{args[0]} IN ({', '.join(args[1:])})"
    if op == "coalesce":
        return f"coalesce({', '.join(args)})"
    if op == "case":
        whens = " ".join(f"WHEN {c} THEN {v}" for c, v in zip(args[:-1:2], args[1:-1:2]))
        return f"CASE {whens} ELSE {args[-1]} END"
    return f"{op}({', '.join(args)})"

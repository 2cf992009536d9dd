"""TRANSFORM expressions (DuckDB SQL) compiled to ONNX operators.

Values are 1-D tensors of one row per element, of three kinds: ``num`` (double;
NULL is NaN), ``str`` (string; NULL is the empty string) and ``bool``. SQL's NULL
logic maps onto them: arithmetic propagates NaN, a comparison with NULL is false
(as a NULL condition is in CASE/WHERE), ``IS NULL`` tests NaN or ''.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import sqlglot
from sqlglot import exp

from mlsql.errors import ExportError
from mlsql.export.builder import Graph

NUMERIC_TYPES = {"DOUBLE", "FLOAT", "DECIMAL", "INT", "BIGINT", "SMALLINT", "TINYINT", "HUGEINT", "UBIGINT",
                 "UINT", "USMALLINT", "UTINYINT", "REAL", "NUMERIC", "FLOAT64", "INT64", "INTEGER"}
TEXT_TYPES = {"TEXT", "VARCHAR", "STRING", "CHAR", "NCHAR", "NVARCHAR"}


@dataclass
class V:
    name: str | None
    kind: str  # 'num' | 'str' | 'bool' | 'null'
    literal: object = None
    null: str | None = None  # bool values: a mask of rows where the value is NULL (SQL's third truth value)


class Compiler:
    def __init__(self, g: Graph, columns: dict[str, V], where: str = "", dialect: str = "duckdb"):
        self.g = g
        self.columns = {k.lower(): v for k, v in columns.items()}
        self.where = where
        # the dialect the expressions were fitted in (FittedTransform.dialect): read in it, a Spark
        # TRANSFORM's LOG(x) is the natural logarithm and DuckDB's the base-10 one
        self.dialect = dialect

    # -- entry -------------------------------------------------------------------
    def compile_sql(self, sql: str, output: str) -> V:
        tree = sqlglot.parse_one(sql, read=self.dialect)
        self._output = output
        self._sql = sql
        return self.compile(tree)

    def fail(self, node: exp.Expression, why: str = "") -> ExportError:
        text = node.sql(self.dialect)
        pos = self._sql.find(text) if getattr(self, "_sql", None) else -1
        at = f" at character {pos + 1} of '{self._sql}'" if pos >= 0 else ""
        return ExportError(
            f"Cannot compile '{text}' (TRANSFORM output '{self._output}'){at} to ONNX" + (f": {why}" if why else ""),
            hint="Supported: arithmetic, comparisons, AND/OR/NOT, CASE, COALESCE/IFNULL, CAST, IN, "
                 "LN/LOG/EXP/SQRT/ABS/POW/ROUND/FLOOR/CEIL/GREATEST/LEAST and the ML.* scalers and encoders.",
        )

    # -- coercions -----------------------------------------------------------------
    def num(self, v: V, node) -> str:
        if v.kind == "num":
            return v.name
        if v.kind == "bool":
            x = self.g.op("Cast", [v.name], to=11)
            if v.null is not None:
                x = self.g.op("Where", [v.null, self.g.const(np.nan, np.float64), x])
            return x
        if v.kind == "null":
            return self.g.const(np.nan, np.float64)
        raise self.fail(node, "a string is used as a number")

    def string(self, v: V, node) -> str:
        if v.kind == "str":
            return v.name
        if v.kind == "null":
            return self.g.const("", object)
        raise self.fail(node, "a number is used as a string")

    def boolean(self, v: V, node) -> str:
        """The value as a condition: NULL counts as false."""
        if v.kind == "bool":
            if v.null is not None:
                return self.g.op("And", [v.name, self.g.op("Not", [v.null])])
            return v.name
        if v.kind == "null":
            return self.g.const(False, np.bool_)
        if v.kind == "num":  # non-zero and not NULL
            ne = self.g.op("Not", [self.g.op("Equal", [v.name, self.g.const(0.0, np.float64)])])
            return self.g.op("And", [ne, self.g.op("Not", [self.g.op("IsNaN", [v.name])])])
        raise self.fail(node, "a string is used as a condition")

    def as_kind(self, v: V, kind: str, node) -> str:
        return {"num": self.num, "str": self.string, "bool": self.boolean}[kind](v, node)

    def str_equals(self, s: str, literal: str) -> str:
        """``s = 'literal'`` through a LabelEncoder (string Equal needs opset 19; this runs on any ORT)."""
        hit = self.g.op("LabelEncoder", [s], domain="ai.onnx.ml", keys_strings=[literal], values_int64s=[1],
                        default_int64=0)
        return self.g.op("Cast", [hit], to=9)

    def is_null(self, v: V, node) -> str:
        if v.kind == "num":
            return self.g.op("IsNaN", [v.name])
        if v.kind == "str":
            return self.str_equals(v.name, "")
        if v.kind == "null":
            return self.g.const(True, np.bool_)
        if v.null is not None:
            return v.null
        return self.g.const(False, np.bool_)

    def _or_null(self, *vals: V) -> str | None:
        """Mask of rows where any of ``vals`` is NULL (None when none can be)."""
        masks = []
        for v in vals:
            if v.kind == "null":
                return self.g.const(True, np.bool_)
            if v.literal is not None:
                continue
            if v.kind in ("num", "str") or v.null is not None:
                masks.append(self.is_null(v, None))
        if not masks:
            return None
        out = masks[0]
        for m in masks[1:]:
            out = self.g.op("Or", [out, m])
        return out

    # -- the compiler ------------------------------------------------------------------
    def compile(self, e: exp.Expression) -> V:
        """The ONNX value of one SQL expression: the rule of its node type in ``RULES``, or an
        ExportError naming the expression (a node with no rule is never guessed)."""
        for cls in type(e).__mro__:  # a subclass compiles as its parent does (TRY_CAST as CAST)
            rule = RULES.get(cls)
            if rule is not None:
                return rule(self, e)
        raise self.fail(e)

    def _column(self, e: exp.Column) -> V:
        v = self.columns.get(e.name.lower())
        if v is None:
            raise self.fail(e, f"unknown column '{e.name}'")
        return v

    def _literal(self, e: exp.Literal) -> V:
        if e.is_string:
            return V(self.g.const(e.this, object), "str", e.this)
        return V(self.g.const(float(e.this), np.float64), "num", float(e.this))

    def _binary(self, e, op: str, **attrs) -> V:
        a, b = self.num(self.compile(e.this), e), self.num(self.compile(e.expression), e)
        return V(self.g.op(op, [a, b], **attrs), "num")

    def _unary(self, e, op: str) -> V:
        if e.args.get("decimals") or e.args.get("expression"):
            raise self.fail(e)
        return V(self.g.op(op, [self.num(self.compile(e.this), e)]), "num")

    def _not(self, e: exp.Not) -> V:
        v = self.compile(e.this)
        if v.kind != "bool":
            v = V(self.boolean(v, e), "bool", null=self._or_null(v))
        return V(self.g.op("Not", [v.name]), "bool", null=v.null)

    def _is(self, e: exp.Is) -> V:
        if not isinstance(e.expression, exp.Null):
            raise self.fail(e)
        return V(self.is_null(self.compile(e.this), e), "bool")

    def _in(self, e: exp.In) -> V:
        if e.args.get("query") or not e.expressions:
            raise self.fail(e, "IN needs a list of values")
        x = self.compile(e.this)
        hits = [self._compare_values(x, self.compile(v), "Equal", e) for v in e.expressions]
        out = hits[0]
        for h in hits[1:]:
            out = self.g.op("Or", [out, h])
        return V(out, "bool", null=self._or_null(x))

    def _coalesce(self, e: exp.Coalesce) -> V:
        vals = [self.compile(e.this)] + [self.compile(x) for x in e.expressions]
        kind = next((v.kind for v in vals if v.kind != "null"), "num")
        out = self.as_kind(vals[-1], kind, e)
        for v in reversed(vals[:-1]):
            out = self.g.op("Where", [self.is_null(v, e), out, self.as_kind(v, kind, e)])
        return V(out, kind)

    def _log(self, e: exp.Log) -> V:
        g = self.g
        if e.expression is None:  # DuckDB: LOG(x) is the base-10 logarithm
            x, base = self.num(self.compile(e.this), e), 10.0
        else:
            bv = self.compile(e.this)
            if bv.literal is None:
                raise self.fail(e, "the base of LOG must be a literal")
            x, base = self.num(self.compile(e.expression), e), float(bv.literal)
        return V(g.op("Div", [g.op("Log", [x]), g.const(math.log(base), np.float64)]), "num")

    def _round(self, e: exp.Round) -> V:
        g = self.g
        x = self.num(self.compile(e.this), e)
        d = e.args.get("decimals")
        k = 0 if d is None else int(float(d.this))
        scale = g.const(10.0**k, np.float64)
        # DuckDB rounds half away from zero; ONNX Round is half-to-even
        scaled = g.op("Mul", [x, scale])
        r = g.op("Mul", [g.op("Sign", [scaled]), g.op("Floor", [g.op("Add", [g.op("Abs", [scaled]), g.const(0.5, np.float64)])])])
        return V(g.op("Div", [r, scale]), "num")

    def _extreme(self, e, greatest: bool) -> V:
        g = self.g
        vals = [self.num(self.compile(e.this), e)] + [self.num(self.compile(x), e) for x in e.expressions]
        big = g.const(-np.inf if greatest else np.inf, np.float64)
        nans = [g.op("IsNaN", [v]) for v in vals]
        filled = [g.op("Where", [n, big, v]) for n, v in zip(nans, vals)]  # DuckDB skips NULLs
        out = g.op("Max" if greatest else "Min", filled)
        all_nan = nans[0]
        for n in nans[1:]:
            all_nan = g.op("And", [all_nan, n])
        return V(g.op("Where", [all_nan, g.const(np.nan, np.float64), out]), "num")

    def _logic(self, e, is_and: bool) -> V:
        """Three-valued AND / OR."""
        g = self.g
        vals = []
        for side in (e.this, e.expression):
            v = self.compile(side)
            if v.kind != "bool":
                v = V(self.boolean(v, e), "bool", null=self._or_null(v))
            vals.append(v)
        a, b = vals
        false = g.const(False, np.bool_)
        an, bn = a.null or false, b.null or false
        at = g.op("And", [a.name, g.op("Not", [an])])  # known true
        bt = g.op("And", [b.name, g.op("Not", [bn])])
        if is_and:
            af = g.op("And", [g.op("Not", [a.name]), g.op("Not", [an])])  # known false
            bf = g.op("And", [g.op("Not", [b.name]), g.op("Not", [bn])])
            value = g.op("And", [at, bt])
            null = None if a.null is None and b.null is None else \
                g.op("And", [g.op("Or", [an, bn]), g.op("Not", [g.op("Or", [af, bf])])])
        else:
            value = g.op("Or", [at, bt])
            null = None if a.null is None and b.null is None else \
                g.op("And", [g.op("Or", [an, bn]), g.op("Not", [value])])
        return V(value, "bool", null=null)

    def _compare_values(self, a: V, b: V, op: str, node) -> str:
        g = self.g
        if "str" in (a.kind, b.kind):
            if op not in ("Equal", "NotEqual"):
                raise self.fail(node, "only = and <> compare strings in ONNX")
            if a.literal is not None or b.literal is not None:
                col, lit = (b, a) if a.literal is not None else (a, b)
                if col.literal is not None:
                    same = g.const(col.literal == lit.literal, np.bool_)
                elif lit.kind == "null":
                    return g.const(False, np.bool_)
                else:
                    same = self.str_equals(self.string(col, node), str(lit.literal))
            else:
                sa, sb = self.string(a, node), self.string(b, node)
                same = g.op("Equal", [sa, sb])  # needs opset 19
            nonnull = g.op("Not", [self.is_null(a if a.kind == "str" else b, node)])
            if op == "NotEqual":
                return g.op("And", [g.op("Not", [same]), nonnull])
            return g.op("And", [same, nonnull])
        na, nb = self.num(a, node), self.num(b, node)
        if op == "NotEqual":  # NULL <> x is not true
            ne = g.op("Not", [g.op("Equal", [na, nb])])
            both = g.op("Not", [g.op("Or", [g.op("IsNaN", [na]), g.op("IsNaN", [nb])])])
            return g.op("And", [ne, both])
        return g.op(op, [na, nb])

    def _compare(self, e, op) -> V:
        a, b = self.compile(e.this), self.compile(e.expression)
        return V(self._compare_values(a, b, op, e), "bool", null=self._or_null(a, b))

    def _case(self, e: exp.Case) -> V:
        g = self.g
        subject = self.compile(e.this) if e.this is not None else None
        conds, vals = [], []
        for i in e.args.get("ifs") or []:
            if subject is not None:
                conds.append(self._compare_values(subject, self.compile(i.this), "Equal", e))
            else:
                conds.append(self.boolean(self.compile(i.this), e))
            vals.append(self.compile(i.args["true"]))
        default = self.compile(e.args["default"]) if e.args.get("default") is not None else V(None, "null")
        kinds = [v.kind for v in vals + [default] if v.kind != "null"]
        kind = "str" if "str" in kinds else ("num" if "num" in kinds else ("bool" if kinds else "num"))
        out = self.as_kind(default, kind, e)
        for c, v in reversed(list(zip(conds, vals))):
            out = g.op("Where", [c, self.as_kind(v, kind, e), out])
        return V(out, kind)

    def _cast(self, e: exp.Cast) -> V:
        g = self.g
        v = self.compile(e.this)
        to = e.to.this.name if hasattr(e.to.this, "name") else str(e.to.this)
        to = to.upper()
        if to in NUMERIC_TYPES:
            if v.kind == "str":
                raise self.fail(e, "casting strings to numbers is not compiled")
            x = self.num(v, e)
            if to in ("DOUBLE", "FLOAT", "DECIMAL", "REAL", "NUMERIC", "FLOAT64"):
                return V(x, "num")
            # integer casts round half away from zero, as DuckDB does
            r = g.op("Mul", [g.op("Sign", [x]), g.op("Floor", [g.op("Add", [g.op("Abs", [x]), g.const(0.5, np.float64)])])])
            return V(r, "num")
        if to in TEXT_TYPES:
            if v.kind in ("str", "null"):
                return V(self.string(v, e), "str")
            raise self.fail(e, "casting numbers to text is not compiled")
        if to == "BOOLEAN":
            return V(self.boolean(v, e), "bool")
        raise self.fail(e, f"CAST to {to} is not compiled")


# node type -> how it compiles (sqlglot's Generator.TRANSFORMS, for ONNX): a SQL function or operator
# the export supports is one entry here
RULES: dict[type[exp.Expression], Callable[[Compiler, exp.Expression], V]] = {
    exp.Paren: lambda c, e: c.compile(e.this),
    exp.Column: Compiler._column,
    exp.Literal: Compiler._literal,
    exp.Boolean: lambda c, e: V(c.g.const(bool(e.this), np.bool_), "bool", bool(e.this)),
    exp.Null: lambda c, e: V(None, "null"),
    exp.Neg: lambda c, e: V(c.g.op("Neg", [c.num(c.compile(e.this), e)]), "num"),
    **{cls: partial(Compiler._binary, op=op) for cls, op in
       {exp.Add: "Add", exp.Sub: "Sub", exp.Mul: "Mul", exp.Div: "Div", exp.Pow: "Pow"}.items()},
    exp.Mod: lambda c, e: c._binary(e, "Mod", fmod=1),
    exp.IntDiv: lambda c, e: V(c.g.op("Floor", [c._binary(e, "Div").name]), "num"),
    **{cls: partial(Compiler._compare, op=op) for cls, op in
       {exp.EQ: "Equal", exp.NEQ: "NotEqual", exp.LT: "Less", exp.LTE: "LessOrEqual", exp.GT: "Greater",
        exp.GTE: "GreaterOrEqual"}.items()},
    exp.And: lambda c, e: c._logic(e, True),
    exp.Or: lambda c, e: c._logic(e, False),
    exp.Not: Compiler._not,
    exp.Is: Compiler._is,
    exp.In: Compiler._in,
    exp.Case: lambda c, e: c._case(e),
    exp.Coalesce: Compiler._coalesce,
    exp.Cast: lambda c, e: c._cast(e),
    **{cls: partial(Compiler._unary, op=op) for cls, op in
       {exp.Ln: "Log", exp.Exp: "Exp", exp.Sqrt: "Sqrt", exp.Abs: "Abs", exp.Floor: "Floor", exp.Ceil: "Ceil"}.items()},
    exp.Log: Compiler._log,
    exp.Round: Compiler._round,
    exp.Greatest: lambda c, e: c._extreme(e, True),
    exp.Least: lambda c, e: c._extreme(e, False),
}

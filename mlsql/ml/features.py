"""Automatic feature encoding: Arrow columns → one float32 matrix, the way BigQuery ML does it.

Numeric and boolean columns pass through (NULL → the training mean). Dates are
days since 1970-01-01, timestamps seconds since 1970-01-01 00:00 (UTC for a
time zone-aware column), times seconds since midnight, durations seconds: the
same numbers the exported ONNX graph takes as its double input. String
columns are categorical: ordinal codes for trees, one-hot for linear and DNN
models; NULL and values unseen at training time share a bucket of their own.
Everything here works column-at-a-time on Arrow/numpy arrays, never per row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlsql.errors import InputTypeError, TrainingError

MAX_CATEGORIES = 10_000


@dataclass
class FeatureSpec:
    name: str
    kind: str  # 'numeric' | 'categorical'
    arrow_type: str
    mean: float | None = None
    categories: list[str] | None = None
    encoding: str = "value"  # 'value' | 'onehot' | 'ordinal'

    @property
    def width(self) -> int:
        return len(self.categories) + 1 if self.encoding == "onehot" else 1

    def to_dict(self) -> dict:
        return asdict(self)


def _kind(t: pa.DataType) -> str | None:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t):
        return "numeric"
    if pa.types.is_temporal(t) and not pa.types.is_interval(t):
        return "numeric"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "categorical"
    return None


def numeric_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric/boolean/temporal column as float64 with NaN for NULL."""
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = t.value_type
    if pa.types.is_date(t):
        col = col.cast(pa.date32()).cast(pa.int32())
    elif pa.types.is_timestamp(t) or pa.types.is_time(t) or pa.types.is_duration(t):
        per_second = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}[t.unit]
        col = pc.divide(col.cast(pa.int64()).cast(pa.float64()), per_second)
    if not pa.types.is_float64(col.type):
        col = col.cast(pa.float64())
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col.to_numpy(zero_copy_only=False)


_SQL_TYPES = {"string": "VARCHAR", "large_string": "VARCHAR", "string_view": "VARCHAR", "double": "DOUBLE",
              "float": "FLOAT", "int64": "BIGINT", "int32": "INTEGER", "int16": "SMALLINT", "int8": "TINYINT",
              "uint64": "UBIGINT", "uint32": "UINTEGER", "uint16": "USMALLINT", "uint8": "UTINYINT",
              "bool": "BOOLEAN", "date32[day]": "DATE", "binary": "BLOB"}


def sql_type(t: pa.DataType | str) -> str:
    """An Arrow type as the SQL type name a user wrote (VARCHAR, DOUBLE, DATE, ...)."""
    name = str(t)
    if name in _SQL_TYPES:
        return _SQL_TYPES[name]
    if name.startswith("timestamp"):
        return "TIMESTAMP WITH TIME ZONE" if "tz=" in name else "TIMESTAMP"
    if name.startswith("decimal"):
        return name.replace("decimal128", "DECIMAL").replace("decimal256", "DECIMAL")
    if name.startswith(("list", "large_list")):
        return "LIST"
    if name.startswith("struct"):
        return "STRUCT"
    return name.upper()


def check_input_types(table: pa.Table, specs: list[FeatureSpec], where: str) -> None:
    """Each feature column can be read the way the model was trained on it, or an
    ``InputTypeError`` names the column, the type the model expects and the type it got."""
    by_lower = {c.lower(): c for c in table.column_names}
    for s in specs:
        real = by_lower.get(s.name.lower())
        if real is None:
            continue
        got = table.column(real).type
        kind = _kind(got)
        if s.kind == "numeric" and kind != "numeric":
            if pa.types.is_null(got):  # an all-NULL column: every row takes the training mean
                continue
            trained = sql_type(s.arrow_type)
            target = trained if trained.startswith(("DATE", "TIME")) else "DOUBLE"
            raise InputTypeError(
                f"{where}: column '{s.name}' is {sql_type(got)}, but the model was trained on it as {trained}",
                hint=f"Give it as {'a ' + trained if target != 'DOUBLE' else 'a number'}, "
                     f"e.g. TRY_CAST({s.name} AS {target}).")
        if s.kind == "categorical" and kind is None and not pa.types.is_null(got):
            raise InputTypeError(
                f"{where}: column '{s.name}' is {sql_type(got)}, but the model was trained on it as VARCHAR",
                hint=f"Give it as a string, e.g. CAST({s.name} AS VARCHAR).")


def string_values(col) -> pa.Array:
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
    if not pa.types.is_string(col.type):
        col = col.cast(pa.string())
    return col


def fit_features(table: pa.Table, names: list[str], encoding: str, mask: np.ndarray | None = None) -> list[FeatureSpec]:
    """Learn each column's encoding from the training rows (``mask`` True = training row)."""
    specs = []
    arrow_mask = pa.array(mask) if mask is not None and not mask.all() else None
    for name in names:
        col = table.column(name)
        kind = _kind(col.type)
        if kind is None:
            raise TrainingError(
                f"Column '{name}' has type {col.type}, which cannot be a model feature",
                hint="Use numbers, booleans, dates or strings; turn lists and structs into columns first.",
            )
        if kind == "numeric":
            x = numeric_values(col)
            if mask is not None:
                x = x[mask]
            mean = float(np.nanmean(x)) if np.isfinite(x).any() else 0.0
            specs.append(FeatureSpec(name, "numeric", str(col.type), mean=mean, encoding="value"))
        else:
            s = string_values(col)
            if arrow_mask is not None:
                s = s.filter(arrow_mask)
            cats = pc.unique(s.drop_null()) if s.null_count < len(s) else pa.array([], pa.string())
            if isinstance(cats, pa.ChunkedArray):
                cats = cats.combine_chunks()
            cats = sorted(cats.to_pylist())
            if len(cats) > MAX_CATEGORIES:
                raise TrainingError(
                    f"Column '{name}' has {len(cats):,} distinct values; at most {MAX_CATEGORIES:,} are supported",
                    hint="Group rare values, hash them into buckets, or leave the column out.",
                )
            specs.append(FeatureSpec(name, "categorical", str(col.type), categories=cats,
                                     encoding="onehot" if encoding == "onehot" else "ordinal"))
    return specs


def encoded_names(specs: list[FeatureSpec]) -> list[str]:
    out = []
    for s in specs:
        if s.encoding == "onehot":
            out += [f"{s.name}={c}" for c in s.categories] + [f"{s.name}=<other>"]
        else:
            out.append(s.name)
    return out


def feature_of_column(specs: list[FeatureSpec]) -> np.ndarray:
    """For each encoded column, the index of the feature it came from."""
    return np.repeat(np.arange(len(specs)), [s.width for s in specs])


def category_codes(col, categories: list[str]) -> np.ndarray:
    """Index of each value in ``categories``; NULL and unseen values → len(categories)."""
    s = string_values(col)
    codes = pc.index_in(s, value_set=pa.array(categories, pa.string()))
    codes = pc.fill_null(codes, len(categories))
    if isinstance(codes, pa.ChunkedArray):
        codes = codes.combine_chunks()
    return codes.to_numpy(zero_copy_only=False)


def encode(table: pa.Table, specs: list[FeatureSpec], out: np.ndarray | None = None) -> np.ndarray:
    """The float32 design matrix for ``table`` (columns located by name, case-insensitively)."""
    by_lower = {c.lower(): c for c in table.column_names}
    n = table.num_rows
    width = sum(s.width for s in specs)
    if out is None:
        out = np.zeros((n, width), dtype=np.float32)
    j = 0
    for s in specs:
        real = by_lower.get(s.name.lower())
        if real is None:
            raise TrainingError(f"Input has no column '{s.name}'")
        col = table.column(real)
        if s.kind == "numeric":
            x = numeric_values(col)
            np.copyto(out[:, j], x, casting="unsafe")
            nan = np.isnan(out[:, j])
            if nan.any():
                out[nan, j] = s.mean
            j += 1
        else:
            if _kind(col.type) == "numeric":  # e.g. a numeric column where strings were trained
                col = col.cast(pa.string())
            codes = category_codes(col, s.categories)
            if s.encoding == "ordinal":
                out[:, j] = codes
                j += 1
            else:
                out[:, j:j + s.width] = 0
                out[np.arange(n), j + codes] = 1.0
                j += s.width
    return out

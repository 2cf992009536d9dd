"""Turn request payloads (JSON rows/columns, or an .npz batch) into ORT feeds, with validation."""

from __future__ import annotations

import difflib
import io
import json
import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_ROWS = 100_000
# strings become one Python object each (about 60 bytes) on their way to ORT: bound their number
MAX_STRING_ELEMENTS = 1_000_000
BIG_PARSE = 1 << 20  # bytes: a body (or an .npz's contents) over this is parsed under the caller's semaphore
_FLOAT_MAX = {"float16": 65504.0, "float32": float(np.finfo(np.float32).max), "float64": float(np.finfo(np.float64).max)}
_INT_RANGES = {k: (np.iinfo(k).min, np.iinfo(k).max) for k in
               ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")}


class InputError(ValueError):
    """The request's data does not fit the model's input schema; the message says where."""


class LimitError(InputError):
    """The request is over a size limit (rows, strings, bytes): answered 413."""


@dataclass
class InputSpec:
    name: str
    type: str                 # manifest type: float32 ... string
    row_shape: tuple           # per-row shape; -1 = any size
    nullable: bool

    @property
    def width(self) -> int | None:
        if len(self.row_shape) == 0:
            return None
        if len(self.row_shape) == 1:
            return self.row_shape[0]
        return -2  # higher rank


def make_spec(col, session_shape) -> InputSpec:
    shape = col.shape if col.shape is not None else session_shape
    if shape is None or len(shape) == 0:
        row = ()
    else:
        row = tuple(d if isinstance(d, int) and d > 0 else -1 for d in list(shape)[1:])
    return InputSpec(col.name, col.type, row, col.nullable)


def _suggest(name: str, names: list[str]) -> str:
    m = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""


def columns_from_json(payload: Any, specs: list[InputSpec]) -> dict[str, list]:
    """{"rows": [{col: v}...]} or {"columns": {col: [v...]}} -> {col: [v...]}, names checked."""
    if not isinstance(payload, dict):
        raise InputError('request body must be a JSON object with "rows" or "columns"')
    unknown_keys = set(payload) - {"rows", "columns"}
    if unknown_keys:
        raise InputError(f"unknown field(s) in request: {', '.join(sorted(map(str, unknown_keys)))} "
                         '(expected "rows" or "columns")')
    names = [s.name for s in specs]
    if ("rows" in payload) == ("columns" in payload):
        raise InputError('request body needs exactly one of "rows" or "columns"')
    if "rows" in payload:
        rows = payload["rows"]
        if not isinstance(rows, list) or not rows:
            raise InputError('"rows" must be a non-empty list of objects')
        if len(rows) > MAX_ROWS:
            raise LimitError(f"{len(rows)} rows is over the limit of {MAX_ROWS} per request")
        cols: dict[str, list] = {n: [] for n in names}
        known = set(names)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise InputError(f"row {i} is not a JSON object")
            extra = set(row) - known
            if extra:
                bad = sorted(map(str, extra))[0]
                raise InputError(f"row {i}: unknown column {bad!r}{_suggest(bad, names)}; "
                                 f"model inputs: {', '.join(names)}")
            for n in names:
                if n not in row:
                    raise InputError(f"row {i}: missing column {n!r}")
                cols[n].append(row[n])
        return cols
    columns = payload["columns"]
    if not isinstance(columns, dict) or not columns:
        raise InputError('"columns" must be a non-empty object of column name -> list of values')
    for k in columns:
        if k not in names:
            raise InputError(f"unknown column {k!r}{_suggest(str(k), names)}; model inputs: {', '.join(names)}")
    missing = [n for n in names if n not in columns]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)}")
    n_rows = None
    for n in names:
        v = columns[n]
        if not isinstance(v, list) or not v:
            raise InputError(f"column {n!r} must be a non-empty list of values")
        if n_rows is None:
            n_rows = len(v)
        elif len(v) != n_rows:
            raise InputError(f"column {n!r} has {len(v)} values, column {names[0]!r} has {n_rows}")
    if n_rows > MAX_ROWS:
        raise LimitError(f"{n_rows} rows is over the limit of {MAX_ROWS} per request")
    return {n: columns[n] for n in names}


def _bad_value(spec: InputSpec, row: int, v: Any, why: str = "") -> InputError:
    shown = repr(v)
    if len(shown) > 40:
        shown = shown[:40] + "..."
    what = "a string" if spec.type == "string" else f"a {spec.type} number"
    if spec.nullable:
        what += " or null"
    return InputError(f"column {spec.name!r} row {row}: expected {what}, got {shown}{why}")


def _check_scalar(spec: InputSpec, row: int, v: Any):
    t = spec.type
    if v is None:
        if not spec.nullable:
            raise _bad_value(spec, row, v, " (column is not nullable)")
        return "" if t == "string" else (math.nan if t.startswith("float") else None)
    if t == "string":
        if not isinstance(v, str):
            raise _bad_value(spec, row, v)
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad_value(spec, row, v, " (not valid UTF-8: lone surrogate)") from None
        return v
    if t == "bool":
        if not isinstance(v, bool):
            raise _bad_value(spec, row, v)
        return v
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _bad_value(spec, row, v)
    if t.startswith("float"):
        try:
            f = float(v)
        except OverflowError:  # an integer literal such as 10**400
            raise _bad_value(spec, row, v, f" (out of range for {t})") from None
        if not math.isfinite(f):  # JSON's NaN/Infinity literals are refused earlier: 1e400 lands here
            raise _bad_value(spec, row, v, " (out of range: NaN and infinity are not allowed; send null for a "
                                           "missing value)")
        if abs(f) > _FLOAT_MAX.get(t, math.inf):
            raise _bad_value(spec, row, v, f" (out of range for {t})")
        return f
    # integer column
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise _bad_value(spec, row, v, " (not an integer)")
        v = int(v)
    lo, hi = _INT_RANGES[t]
    if not lo <= v <= hi:
        raise _bad_value(spec, row, v, f" (out of range for {t})")
    return v


def _np_dtype(t: str):
    return object if t == "string" else np.dtype(t)


_NUMBER_TYPES = {"float": frozenset((int, float)), "int": frozenset((int,))}


def _fast_numeric(spec: InputSpec, values: list, n: int) -> np.ndarray | None:
    """A numeric column whose values are all plain numbers of the right shape, checked with a type
    scan and the builtin min/max (C loops over the lists) instead of a Python call per value, then
    converted once. None when anything is unusual (a null, a bool, a string, a ragged row, a value
    out of range): the per-value path then finds it and names the row."""
    t = spec.type
    if t in _FLOAT_MAX:
        allowed, top = _NUMBER_TYPES["float"], _FLOAT_MAX[t]
        bottom = -top
    elif t in _INT_RANGES:
        allowed, (bottom, top) = _NUMBER_TYPES["int"], _INT_RANGES[t]
    else:
        return None
    width = spec.width
    if width is None:
        rows = (values,)
    elif width > 0:
        rows = values
        for r in rows:
            if type(r) is not list or len(r) != width:
                return None
    else:
        return None
    types: set = set()
    for r in rows:
        types.update(map(type, r))
    if not types <= allowed:
        return None
    # an overflowing literal (1e400) parses as inf, outside every range; JSON has no NaN
    if not (bottom <= min(map(min, rows)) and max(map(max, rows)) <= top):
        return None
    return np.array(values, dtype=t)


def column_array(spec: InputSpec, values: list) -> np.ndarray:
    """Validate one column's JSON values and build the ORT array."""
    n = len(values)
    width = spec.width
    if spec.type != "string" and spec.type != "bool" and width != -2 and n:
        fast = _fast_numeric(spec, values, n)
        if fast is not None:
            return fast
    if width is None or width == 1:
        checked = []
        for i, v in enumerate(values):
            if width == 1 and isinstance(v, list):
                if len(v) != 1:
                    raise InputError(f"column {spec.name!r} row {i}: expected 1 value, got a list of {len(v)}")
                v = v[0]
            checked.append(_check_scalar(spec, i, v))
        if spec.type.startswith("int") or spec.type.startswith("uint"):
            if any(c is None for c in checked):
                raise InputError(f"column {spec.name!r}: null in an integer column")
        arr = np.array(checked, dtype=_np_dtype(spec.type))
        return arr.reshape(n, 1) if width == 1 else arr
    if width == -2:
        try:
            arr = np.array(values)
        except (ValueError, TypeError) as exc:
            raise InputError(f"column {spec.name!r}: values are not a regular array ({exc})") from None
        return _check_array(spec, arr, n)
    rows = []
    k = None
    for i, v in enumerate(values):
        if not isinstance(v, list):
            raise InputError(f"column {spec.name!r} row {i}: expected a list of "
                             f"{width if width > 0 else 'N'} values, got {type(v).__name__}")
        if width > 0 and len(v) != width:
            raise InputError(f"column {spec.name!r} row {i}: expected {width} values, got {len(v)}")
        if k is None:
            k = len(v)
        elif len(v) != k:
            raise InputError(f"column {spec.name!r} row {i}: {len(v)} values, row 0 has {k}")
        rows.append([_check_scalar(spec, i, x) for x in v])
    if k == 0:
        raise InputError(f"column {spec.name!r}: empty lists")
    return np.array(rows, dtype=_np_dtype(spec.type))


def _check_array(spec: InputSpec, arr: np.ndarray, n: int) -> np.ndarray:
    t = spec.type
    kind = arr.dtype.kind
    if arr.dtype.itemsize == 0:
        raise InputError(f"column {spec.name!r}: dtype {arr.dtype.str} has zero-size items")
    if t == "string":
        if kind not in "US":
            raise InputError(f"column {spec.name!r}: expected strings, got dtype {arr.dtype}")
        if arr.size > MAX_STRING_ELEMENTS:
            raise LimitError(f"column {spec.name!r}: {arr.size} strings, over the limit of "
                             f"{MAX_STRING_ELEMENTS} per request")
        if kind == "U":
            # one join and encode holds the interpreter lock throughout: under 16 concurrent requests
            # that is faster than a vectorized numpy check, which drops and re-takes the lock
            try:
                "".join(arr.ravel().tolist()).encode("utf-8")
            except (UnicodeEncodeError, SystemError, ValueError):  # SystemError: code point > U+10FFFF
                raise InputError(f"column {spec.name!r}: strings are not valid Unicode "
                                 f"(lone surrogate or code point over U+10FFFF)") from None
            arr = arr.astype(object)
        else:
            arr = np.char.decode(arr, "utf-8", "replace").astype(object)
    elif t == "bool":
        if kind != "b":
            raise InputError(f"column {spec.name!r}: expected bool, got dtype {arr.dtype}")
    elif t.startswith("float"):
        if kind not in "fiub" or kind == "b":
            raise InputError(f"column {spec.name!r}: expected {t} numbers, got dtype {arr.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(t, copy=False)
        if arr.size and arr.ndim and not np.isfinite(arr).all():
            bad_mask = np.isinf(arr) if spec.nullable else ~np.isfinite(arr)
            if bad_mask.any():  # NaN is null where the column is nullable; infinity never is
                bad = int(np.argwhere(bad_mask.reshape(arr.shape[0], -1))[0][0])
                what = "infinite or out of range for " + t if np.isinf(arr).any() else "NaN not allowed"
                raise InputError(f"column {spec.name!r} row {bad}: {what}"
                                 + ("" if spec.nullable else " (column is not nullable)"))
    else:
        if kind not in "iu":
            raise InputError(f"column {spec.name!r}: expected {t} integers, got dtype {arr.dtype}")
        lo, hi = _INT_RANGES[t]
        if arr.size and (arr.min() < lo or arr.max() > hi):
            raise InputError(f"column {spec.name!r}: values out of range for {t}")
        arr = arr.astype(t, copy=False)
    # shape
    if arr.ndim == 0 or arr.shape[0] != n:
        raise InputError(f"column {spec.name!r}: {arr.shape[0] if arr.ndim else 0} rows, expected {n}")
    row = spec.row_shape
    if row == (1,) and arr.ndim == 1:
        arr = arr.reshape(n, 1)
    if row == () and arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr.reshape(n)
    if len(arr.shape) - 1 != len(row) or any(r > 0 and r != s for r, s in zip(row, arr.shape[1:])):
        want = "x".join("N" if r < 0 else str(r) for r in row) or "scalar"
        raise InputError(f"column {spec.name!r}: each row has shape {tuple(arr.shape[1:])}, expected {want}")
    return arr


def feed_from_json(payload: Any, specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], int]:
    cols = columns_from_json(payload, specs)
    feed = {s.name: column_array(s, cols[s.name]) for s in specs}
    return feed, len(next(iter(cols.values())))


def _check_header(name: str, shape: Any, dtype: np.dtype, max_bytes: int) -> int:
    """Refuse an array by its header alone, before a byte of it is read or converted; its size."""
    if dtype.kind not in "fiubUS" or dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(f"array {name!r}: dtype {dtype.str} is not allowed (numbers, bools, strings; no objects)")
    if dtype.itemsize == 0:
        raise InputError(f"array {name!r}: dtype {dtype.str} has zero-size items")
    if not isinstance(shape, tuple) or not 1 <= len(shape) <= 4:
        raise InputError(f"array {name!r}: shape {shape!r} (1 to 4 dimensions, first = rows)")
    if shape[0] > MAX_ROWS:
        raise LimitError(f"array {name!r}: {shape[0]} rows is over the limit of {MAX_ROWS} per request")
    count = math.prod(shape)
    if dtype.kind in "US" and count > MAX_STRING_ELEMENTS:
        raise LimitError(f"array {name!r}: {count} strings, over the limit of {MAX_STRING_ELEMENTS} per request")
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise LimitError(f"array {name!r} declares {nbytes} bytes, over the limit of {max_bytes}")
    return nbytes


def feed_from_npz(body: bytes, specs: list[InputSpec], max_bytes: int,
                  big_lock=None) -> tuple[dict[str, np.ndarray], int]:
    """An uncompressed or compressed .npz (numpy.savez) with one array per input column.

    Read member by member: each .npy header (dtype, shape) is checked before its data is read,
    and exactly the announced bytes are read (a header claiming 745 GiB, a zero-size dtype with
    10**8 elements, or a zip bomb costs nothing)."""

    try:
        zf = zipfile.ZipFile(io.BytesIO(body))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
        raise InputError(f"binary body is not an .npz archive: {exc}") from None
    if len(infos) > max(8, 2 * len(specs)):
        raise InputError(f".npz holds {len(infos)} arrays; the model takes {len(specs)} columns")
    declared = sum(i.file_size for i in infos)
    if declared > max_bytes:
        raise LimitError(f".npz expands to {declared} bytes, over the limit of {max_bytes}")
    if big_lock is not None and declared > BIG_PARSE:
        with big_lock:
            return _read_npz(zf, infos, specs, max_bytes)
    return _read_npz(zf, infos, specs, max_bytes)


def _read_npz(zf, infos, specs, max_bytes: int) -> tuple[dict[str, np.ndarray], int]:
    from numpy.lib import format as npy

    arrays: dict[str, np.ndarray] = {}
    budget = max_bytes
    for info in infos:
        name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise InputError(f"array {name!r}: unsupported compression")
        try:
            with zf.open(info) as f:
                version = npy.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = npy.read_array_header_1_0(f, max_header_size=4096)
                elif version == (2, 0):
                    shape, fortran, dtype = npy.read_array_header_2_0(f, max_header_size=4096)
                else:
                    raise InputError(f"array {name!r}: .npy version {version} not supported")
                nbytes = _check_header(name, shape, dtype, budget)
                budget -= nbytes
                data = f.read(nbytes)
        except InputError:
            raise
        except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError, SyntaxError, TypeError,
                NotImplementedError, RuntimeError) as exc:
            raise InputError(f"array {name!r}: not a readable .npy member ({type(exc).__name__}: "
                             f"{str(exc)[:160]})") from None
        if len(data) != nbytes:
            raise InputError(f"array {name!r}: {len(data)} bytes of data, its header announces {nbytes}")
        if name in arrays:
            raise InputError(f"array {name!r} appears twice")
        arrays[name] = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return _feed_from_arrays(arrays, specs)


def feed_from_columns(body: bytes, specs: list[InputSpec], max_bytes: int) -> tuple[dict[str, np.ndarray], int]:
    """An application/x-mlsql-columns body (device_bridge.columns): one typed buffer per column."""
    from device_bridge.columns import ColumnsError, decode

    try:
        arrays, _ = decode(body, max_bytes)
    except ColumnsError as exc:
        raise InputError(str(exc)) from None
    return _feed_from_arrays(arrays, specs)


def _feed_from_arrays(arrays: dict[str, np.ndarray], specs: list[InputSpec]) -> tuple[dict[str, np.ndarray], int]:
    names = [s.name for s in specs]
    for k in arrays:
        if k not in names:
            raise InputError(f"unknown column {k!r}{_suggest(k, names)}; model inputs: {', '.join(names)}")
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)}")
    strings = sum(a.size for a in arrays.values() if a.dtype.kind in "US")
    if strings > MAX_STRING_ELEMENTS:
        raise LimitError(f"{strings} strings in one request, over the limit of {MAX_STRING_ELEMENTS}")
    first = arrays[names[0]]
    n = first.shape[0] if first.ndim else 0
    if n == 0:
        raise InputError("batch has no rows")
    if n > MAX_ROWS:
        raise LimitError(f"{n} rows is over the limit of {MAX_ROWS} per request")
    return {s.name: _check_array(s, arrays[s.name], n) for s in specs}, n


def outputs_to_columns(result: dict) -> bytes | None:
    """A predict result as an application/x-mlsql-columns answer (None when an output is not a tensor)."""
    from device_bridge.columns import encode

    arrays = {}
    for name, v in result["outputs"].items():
        if not isinstance(v, np.ndarray):
            return None
        arrays[name] = v
    return encode(arrays, {k: v for k, v in result.items() if k != "outputs"})


def outputs_to_npz(result: dict) -> bytes | None:
    """A predict result as an .npz answer: one array per output plus ``__meta__`` (JSON bytes).

    None when an output is not a plain tensor (a ZipMap's list of maps): answer in JSON then.
    """
    arrays = {}
    for name, v in result["outputs"].items():
        if not isinstance(v, np.ndarray):
            return None
        arrays[name] = v.astype(str) if v.dtype.kind == "O" else v
    meta = {k: v for k, v in result.items() if k != "outputs"}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def outputs_to_json(names: list[str], values: list) -> dict[str, Any]:
    out = {}
    for name, v in zip(names, values):
        out[name] = _jsonable(v)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        if v.dtype.kind == "f":
            if v.size and not np.isfinite(v).all():
                obj = v.astype(object)
                obj[~np.isfinite(v)] = None
                return obj.tolist()
            return v.tolist()
        if v.dtype.kind in "OUS":
            return [_jsonable(x) for x in v.tolist()] if v.ndim else str(v)
        return v.tolist()
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v

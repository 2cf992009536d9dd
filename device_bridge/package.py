"""The model package: one signed file that carries a model to a device.

Layout: an uncompressed ZIP archive (``unzip -l`` lists it) with, in order,

    manifest.json   canonical JSON: name, version, input/output schema, preferred
                    providers, sha256 + size of every other file, metrics, created_at,
                    key_id of the signer
    manifest.sig    64-byte Ed25519 signature over the bytes of manifest.json
    model.onnx      the model
    ...             any further files the manifest lists (sorted by name)

The signature covers the manifest and the manifest covers every file, so the
content is authenticated. On top of that, the archive itself must be exactly
the bytes this module writes for that content (fixed timestamps, no extra
fields, no compression): a package differing from its canonical encoding in
any byte — a header field, a timestamp, trailing junk — is refused too.
The writer is ours, not `zipfile`'s, so the canonical bytes do not change with
the Python version on either side.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_bridge.keys import key_id as _key_id

FORMAT = "mlsql-package/1"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MODEL_FILE = "model.onnx"
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
MAX_FILES = 64

# Column types a manifest may declare: numpy dtype names, plus string. Outputs may
# also be non-tensor values (a classifier's ZipMap gives a sequence of maps).
TENSOR_TYPES = (
    "float32", "float64", "float16", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool", "string",
)
OUTPUT_ONLY_TYPES = ("sequence", "map", "other")

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# Each path component starts with a letter, digit or underscore: no "..", no ".", no
# hidden files, no absolute paths, no backslashes, no drive letters.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}){0,7}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PackageError(ValueError):
    """A package that cannot be built or must not be installed; the message says why."""


class UntrustedKeyError(PackageError):
    """Signed by a key this device does not trust."""


@dataclass(frozen=True)
class Column:
    """One column of a model's input or output: one ONNX input/output tensor."""

    name: str
    type: str
    shape: tuple[int | None, ...] | None = None  # None: unknown; None entries: any size
    nullable: bool = False  # inputs: JSON null / NaN accepted (the model imputes them)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "shape": None if self.shape is None else list(self.shape),
            "nullable": self.nullable,
        }


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    inputs: tuple[Column, ...]
    outputs: tuple[Column, ...]
    providers: tuple[str, ...]
    files: dict[str, FileEntry]
    metrics: dict[str, Any]
    created_at: str
    key_id: str
    extra: dict[str, Any] = field(default_factory=dict)  # any other signed field

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(
            format=FORMAT,
            name=self.name,
            version=self.version,
            inputs=[c.to_dict() for c in self.inputs],
            outputs=[c.to_dict() for c in self.outputs],
            providers=list(self.providers),
            files={k: {"sha256": v.sha256, "size": v.size} for k, v in sorted(self.files.items())},
            metrics=self.metrics,
            created_at=self.created_at,
            key_id=self.key_id,
        )
        return d

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())


_RESERVED = {"format", "name", "version", "inputs", "outputs", "providers", "files", "metrics",
             "created_at", "key_id"}


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that gets signed."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise PackageError(f"manifest is not plain JSON: {exc}") from None


# --------------------------------------------------------------------------- build


def build_package(
    model: str | os.PathLike | bytes,
    manifest_fields: dict[str, Any],
    private_key: Ed25519PrivateKey,
    *,
    extra_files: dict[str, bytes] | None = None,
    out: str | os.PathLike | None = None,
) -> bytes:
    """Build a signed package and return its bytes (also written to `out` when given).

    `manifest_fields`: `name`, `version` (int >= 1) and optionally `inputs` /
    `outputs` (lists of `{"name", "type", "shape"?, "nullable"?}`; inferred from
    the ONNX graph when left out, which needs the `onnx` package), `providers`
    (ordered preference, default `["cpu"]`), `metrics`, `created_at` and any other
    JSON fields, which are signed with the rest.
    """
    model_bytes = model if isinstance(model, bytes | bytearray) else Path(model).read_bytes()
    model_bytes = bytes(model_bytes)
    if not model_bytes:
        raise PackageError("model.onnx is empty")
    fields = dict(manifest_fields)
    files = {MODEL_FILE: model_bytes}
    for fname, data in (extra_files or {}).items():
        if fname in (MANIFEST_FILE, SIGNATURE_FILE, MODEL_FILE):
            raise PackageError(f"extra file name {fname!r} is reserved")
        _check_file_name(fname)
        files[fname] = bytes(data)
    if "inputs" not in fields or "outputs" not in fields:
        inferred_inputs, inferred_outputs = _infer_schema(model_bytes)
        fields.setdefault("inputs", inferred_inputs)
        fields.setdefault("outputs", inferred_outputs)
    fields.setdefault("providers", ["cpu"])
    fields.setdefault("metrics", {})
    fields.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    fields["key_id"] = _key_id(private_key.public_key())
    fields["format"] = FORMAT
    fields["files"] = {
        k: {"sha256": hashlib.sha256(v).hexdigest(), "size": len(v)} for k, v in files.items()
    }
    manifest = _parse_manifest(fields)  # the same checks a device will run
    manifest_bytes = manifest.canonical_bytes()
    signature = private_key.sign(manifest_bytes)
    data = _encode(manifest_bytes, signature, files)
    if out is not None:
        Path(out).write_bytes(data)
    return data


def _infer_schema(model_bytes: bytes) -> tuple[list[dict], list[dict]]:
    try:
        import onnx  # build side only; the agent never builds packages
    except ImportError:
        raise PackageError("give manifest 'inputs' and 'outputs', or install onnx to infer them") from None
    try:
        proto = onnx.load_model_from_string(model_bytes)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise PackageError(f"model.onnx is not a valid ONNX model: {exc}") from None
    initializers = {i.name for i in proto.graph.initializer}

    def columns(values, outputs: bool) -> list[dict]:
        cols = []
        for v in values:
            if v.name in initializers:
                continue
            kind = v.type.WhichOneof("value")
            if kind != "tensor_type":
                if not outputs:
                    raise PackageError(f"input {v.name!r} is a {kind}, not a tensor")
                cols.append({"name": v.name, "type": "sequence" if kind == "sequence_type" else "other"})
                continue
            elem = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            dtype = "string" if elem.kind in "OUS" else elem.name
            shape = None
            if v.type.tensor_type.HasField("shape"):
                shape = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            cols.append({"name": v.name, "type": dtype, "shape": shape})
        return cols

    return columns(proto.graph.input, False), columns(proto.graph.output, True)


# --------------------------------------------------------------------------- verify


def verify_package(
    data: bytes | str | os.PathLike,
    trusted_public_keys: list[Ed25519PublicKey] | dict[str, Ed25519PublicKey],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[Manifest, dict[str, bytes]]:
    """Check a package end to end and return its manifest and files.

    Raises `PackageError` naming the first problem: too large, not a package
    (truncated or not a ZIP), unsafe file names, missing or bad signature, a key
    the device does not trust, a file whose hash differs, or bytes that are not the
    canonical encoding (modified after signing).
    """
    if isinstance(data, str | os.PathLike):
        path = Path(data)
        size = path.stat().st_size
        if size > max_bytes:
            raise PackageError(f"package is {size} bytes, over the limit of {max_bytes}")
        data = path.read_bytes()
    data = bytes(data)
    if len(data) > max_bytes:
        raise PackageError(f"package is {len(data)} bytes, over the limit of {max_bytes}")
    if isinstance(trusted_public_keys, dict):
        trusted = dict(trusted_public_keys)
    else:
        trusted = {_key_id(k): k for k in trusted_public_keys}

    members = _read_members(data)
    if MANIFEST_FILE not in members:
        raise PackageError("package has no manifest.json")
    if SIGNATURE_FILE not in members:
        raise PackageError("package is unsigned (no manifest.sig)")
    manifest_bytes = members[MANIFEST_FILE]
    try:
        raw = json.loads(manifest_bytes, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PackageError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PackageError("manifest.json must hold a JSON object")
    manifest = _parse_manifest(raw)
    if manifest.canonical_bytes() != manifest_bytes:
        raise PackageError("manifest.json is not in canonical form (modified after signing)")

    key = trusted.get(manifest.key_id)
    if key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise UntrustedKeyError(
            f"package is signed by key {manifest.key_id}, which this device does not trust "
            f"(trusted keys: {known})"
        )
    try:
        key.verify(members[SIGNATURE_FILE], manifest_bytes)
    except InvalidSignature:
        raise PackageError("bad signature: manifest.json was modified or signed by another key") from None

    files = {k: v for k, v in members.items() if k not in (MANIFEST_FILE, SIGNATURE_FILE)}
    extra = sorted(set(files) - set(manifest.files))
    if extra:
        raise PackageError(f"package holds files the manifest does not list: {', '.join(extra)}")
    for fname, entry in manifest.files.items():
        if fname not in files:
            raise PackageError(f"package is missing {fname}, listed in the manifest")
        content = files[fname]
        if len(content) != entry.size or hashlib.sha256(content).hexdigest() != entry.sha256:
            raise PackageError(f"{fname} does not match its sha256 in the manifest (tampered)")
    if _encode(manifest_bytes, members[SIGNATURE_FILE], files) != data:
        raise PackageError("package bytes differ from their canonical encoding (modified after signing)")
    return manifest, files


def read_manifest(data: bytes) -> Manifest:
    """The manifest of a package, WITHOUT checking its signature (for display only)."""
    members = _read_members(bytes(data))
    if MANIFEST_FILE not in members:
        raise PackageError("package has no manifest.json")
    try:
        raw = json.loads(members[MANIFEST_FILE], parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise PackageError(f"manifest.json is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise PackageError("manifest.json must hold a JSON object")
    return _parse_manifest(raw)


def verify_installed(folder: str | os.PathLike, trusted: dict) -> Manifest:
    """An installed version folder checked as at install: manifest.sig by a trusted key over the
    canonical manifest.json, and every listed file's hash."""
    folder = Path(folder)
    try:
        manifest_bytes = (folder / MANIFEST_FILE).read_bytes()
        sig = (folder / SIGNATURE_FILE).read_bytes()
    except OSError as exc:
        raise PackageError(f"cannot read the manifest or its signature: {exc}") from None
    manifest = manifest_from_json(manifest_bytes)
    if manifest.canonical_bytes() != manifest_bytes:
        raise PackageError("manifest.json is not in canonical form")
    key = trusted.get(manifest.key_id)
    if key is None:
        raise UntrustedKeyError(f"signed by key {manifest.key_id}, which this device does not trust")
    try:
        key.verify(sig, manifest_bytes)
    except InvalidSignature:
        raise PackageError("bad signature") from None
    check_installed_files(manifest, folder)
    return manifest


def signature_of(data: bytes) -> bytes:
    return _read_members(data)[SIGNATURE_FILE]


def check_installed_files(manifest: Manifest, folder: str | os.PathLike) -> None:
    """Re-hash the files of an installed version (catches disk corruption after install)."""
    folder = Path(folder)
    for fname, entry in manifest.files.items():
        path = folder / fname
        h = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise PackageError(f"installed file {fname} cannot be read: {exc}") from None
        if size != entry.size or h.hexdigest() != entry.sha256:
            raise PackageError(f"installed file {fname} no longer matches its sha256 (disk corruption?)")


def manifest_from_json(data: bytes) -> Manifest:
    """Parse an installed manifest.json (already verified at install time)."""
    raw = json.loads(data, parse_constant=_reject_constant)
    if not isinstance(raw, dict):
        raise PackageError("manifest.json must hold a JSON object")
    return _parse_manifest(raw)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _read_members(data: bytes) -> dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as exc:
        raise PackageError(f"not a valid package (truncated, or not an MLSQL package): {exc}") from None
    if len(infos) > MAX_FILES:
        raise PackageError(f"package holds {len(infos)} files, over the limit of {MAX_FILES}")
    members: dict[str, bytes] = {}
    total = 0
    for info in infos:
        _check_file_name(info.filename)
        if info.filename in members:
            raise PackageError(f"package holds {info.filename} twice")
        # Only stored entries: a deflated entry could expand far beyond the upload size.
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise PackageError(f"{info.filename} is compressed; packages hold stored files only")
        total += info.file_size
        if total > len(data):
            raise PackageError("package declares more content than it holds (truncated or corrupt)")
        try:
            members[info.filename] = zf.read(info)
        except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
            raise PackageError(f"not a valid package: cannot read {info.filename} ({exc}; corrupt or tampered)") from None
    return members


def _check_file_name(name: str) -> None:
    if not isinstance(name, str) or not _FILE_NAME.match(name):
        raise PackageError(f"unsafe file name in package: {name!r} (path traversal or odd characters)")


def _parse_manifest(raw: dict[str, Any]) -> Manifest:
    fmt = raw.get("format", FORMAT)
    if fmt != FORMAT:
        raise PackageError(f"unsupported package format {fmt!r} (this device reads {FORMAT!r})")
    name = raw.get("name")
    if not isinstance(name, str) or not MODEL_NAME.match(name):
        raise PackageError(f"manifest name {name!r} is not a valid model name "
                           "(letters, digits, '_', '.', '-'; up to 128 characters)")
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**31:
        raise PackageError(f"manifest version {version!r} must be a positive integer")
    inputs = _parse_columns(raw.get("inputs"), "inputs")
    outputs = _parse_columns(raw.get("outputs"), "outputs")
    if not inputs:
        raise PackageError("manifest declares no inputs")
    providers = raw.get("providers", ["cpu"])
    if not isinstance(providers, list) or not providers or not all(
        isinstance(p, str) and 0 < len(p) <= 64 for p in providers
    ):
        raise PackageError("manifest providers must be a non-empty list of provider names")
    files_raw = raw.get("files")
    if not isinstance(files_raw, dict) or MODEL_FILE not in files_raw:
        raise PackageError("manifest files must list model.onnx with its sha256")
    files = {}
    for fname, entry in files_raw.items():
        _check_file_name(fname)
        if fname in (MANIFEST_FILE, SIGNATURE_FILE):
            raise PackageError(f"manifest lists the reserved file {fname}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA256.match(entry["sha256"]) or isinstance(entry.get("size"), bool) \
                or not isinstance(entry.get("size"), int) or entry["size"] < 0:
            raise PackageError(f"manifest entry for {fname} needs a hex sha256 and a size")
        files[fname] = FileEntry(entry["sha256"], entry["size"])
    metrics = raw.get("metrics", {})
    if not isinstance(metrics, dict):
        raise PackageError("manifest metrics must be an object")
    created_at = raw.get("created_at")
    if not isinstance(created_at, str):
        raise PackageError("manifest created_at must be an ISO 8601 string")
    key = raw.get("key_id")
    if not isinstance(key, str) or not re.match(r"^[0-9a-f]{16}$", key):
        raise PackageError("manifest key_id must be 16 hex digits")
    extra = {k: v for k, v in raw.items() if k not in _RESERVED}
    return Manifest(name, version, inputs, outputs, tuple(providers), files, metrics, created_at, key, extra)


def _parse_columns(raw: Any, what: str) -> tuple[Column, ...]:
    if not isinstance(raw, list):
        raise PackageError(f"manifest {what} must be a list of columns")
    cols: list[Column] = []
    seen = set()
    allowed = TENSOR_TYPES + (OUTPUT_ONLY_TYPES if what == "outputs" else ())
    for item in raw:
        if isinstance(item, list | tuple) and len(item) == 2:
            item = {"name": item[0], "type": item[1]}
        if not isinstance(item, dict):
            raise PackageError(f"manifest {what}: each column is an object with name and type")
        cname, ctype = item.get("name"), item.get("type")
        if not isinstance(cname, str) or not cname or len(cname) > 256:
            raise PackageError(f"manifest {what}: column name {cname!r} is not a non-empty string")
        if cname in seen:
            raise PackageError(f"manifest {what}: column {cname!r} appears twice")
        seen.add(cname)
        if ctype not in allowed:
            raise PackageError(f"manifest {what}: column {cname!r} has unknown type {ctype!r} "
                               f"(one of: {', '.join(allowed)})")
        shape = item.get("shape")
        if shape is not None:
            if not isinstance(shape, list | tuple) or len(shape) > 8 or not all(
                d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape
            ):
                raise PackageError(f"manifest {what}: column {cname!r} has a bad shape {shape!r}")
            shape = tuple(shape)
        nullable = item.get("nullable", False)
        if not isinstance(nullable, bool):
            raise PackageError(f"manifest {what}: column {cname!r} nullable must be true or false")
        cols.append(Column(cname, ctype, shape, nullable))
    return tuple(cols)


# --------------------------------------------------------------------------- encoding

_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the earliest a ZIP can say
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_END = struct.Struct("<4sHHHHIIH")


def _encode(manifest_bytes: bytes, signature: bytes, files: dict[str, bytes]) -> bytes:
    entries = [(MANIFEST_FILE, manifest_bytes), (SIGNATURE_FILE, signature), (MODEL_FILE, files[MODEL_FILE])]
    entries += sorted((k, v) for k, v in files.items() if k != MODEL_FILE)
    out = bytearray()
    central = bytearray()
    for name, content in entries:
        if len(content) >= 2**32 or len(out) >= 2**32:
            raise PackageError("package over 4 GiB: not supported")
        bname = name.encode("ascii")
        crc = zlib.crc32(content)
        offset = len(out)
        out += _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, _DOS_DATE, crc, len(content), len(content), len(bname), 0)
        out += bname
        out += content
        central += _CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, _DOS_DATE, crc, len(content), len(content),
                                 len(bname), 0, 0, 0, 0, 0, offset)
        central += bname
    cd_offset = len(out)
    out += central
    out += _END.pack(b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), cd_offset, 0)
    return bytes(out)



def encode_installed(folder: str | os.PathLike) -> bytes:
    """The package bytes of an installed version, rebuilt from its folder (manifest.json, manifest.sig
    and the files the manifest lists): a package is its canonical encoding, so these are the very
    bytes that were installed (the base a delta update applies to). Not verified here: the caller
    compares the sha256 with the one recorded at install."""
    folder = Path(folder)
    try:
        manifest_bytes = (folder / MANIFEST_FILE).read_bytes()
        signature = (folder / SIGNATURE_FILE).read_bytes()
        manifest = manifest_from_json(manifest_bytes)
        files = {name: (folder / name).read_bytes() for name in manifest.files}
    except (OSError, ValueError) as exc:
        raise PackageError(f"cannot read the installed version in {folder}: {exc}") from None
    if MODEL_FILE not in files:
        raise PackageError(f"the installed version in {folder} lists no {MODEL_FILE}")
    return _encode(manifest_bytes, signature, files)

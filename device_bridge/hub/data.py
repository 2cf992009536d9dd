"""Device data at the hub: the samples and outcomes agents upload, as Parquet files.

Layout (``<hub store>/data``)::

    <kind>/group=<g>/model=<m>/day=<YYYY-MM-DD>/<agent>-<first>-<last>.parquet
    marks.json        high-water marks of dropped files, rows dropped per group
    .journal-*.json   an upload between its first and last rename (see below)

``first``/``last`` are the smallest and largest ``seq`` the upload stored (every day file of one
upload carries the same pair). **Idempotency**: the hub stores only rows whose seq is above the
high-water mark of (agent, kind, model), and that mark is *derived from the files on disk*
(the largest ``last`` among that key's file names, or the mark marks.json kept for a file the
bound dropped), never from bookkeeping written after them: a hub that dies between a rename
and anything else comes back with the mark the files say.

An upload whose rows span several days is written as one file per day: every file is written and
fsynced under a temporary name, then a journal listing the renames is written and fsynced, then
the files are renamed, then the journal is removed. At start-up a journal left behind is replayed
(the remaining renames done), and temporary files without a journal are deleted: an upload is on
disk whole or not at all, so the mark derived from the files never skips rows.

Bounded per group (``--data-max-mb``): over it the oldest files (by day, then by write time) are
deleted; their rows are counted in ``dropped_rows`` (``GET /v1/data/usage``) and their marks
kept in marks.json first.

pyarrow is imported when data arrives or is read, not when the hub starts.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from device_bridge.agent.core import atomic_write, fsync_dir
from device_bridge.hub.errors import NAME_RE, HubError

KINDS = ("samples", "outcomes")
MAX_UPLOAD_BYTES = 8 << 20
MAX_READ_ROWS = 1_000_000
NO_GROUP = "_none"
TIME_COLUMN = {"samples": "predicted_at", "outcomes": "label_at"}
ENVELOPE = {
    "samples": {"request_id": "string", "predicted_at": "timestamp", "device": "string", "model": "string",
                "version": "int32", "provider": "string", "latency_ms": "double", "seq": "int64"},
    "outcomes": {"request_id": "string", "label": "string", "label_at": "timestamp", "device": "string",
                 "model": "string", "seq": "int64"},
}


def _bad(msg: str) -> HubError:
    return HubError(400, msg, "request")


def _parse_name(name: str) -> tuple[str, int, int] | None:
    """``<agent>-<first>-<last>.parquet`` -> (agent, first, last)."""
    if not name.endswith(".parquet") or name.startswith("."):
        return None
    parts = name[:-8].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


class DataStore:
    def __init__(self, store: str | Path, max_mb_per_group: int = 1024):
        self.root = Path(store) / "data"
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_mb_per_group) << 20
        self.lock = threading.Lock()
        self.marks_path = self.root / "marks.json"
        try:
            marks = json.loads(self.marks_path.read_bytes())
        except (OSError, ValueError):
            marks = {}
        self.dropped_hwm: dict[str, int] = dict(marks.get("hwm", {}))
        self.dropped_rows: dict[str, int] = dict(marks.get("dropped_rows", {}))
        self._recover()
        self.hwm: dict[tuple, int] = {}
        self.files: dict[str, list] = {}  # group -> [(day, mtime, path, size)]
        for kind in KINDS:
            for path in (self.root / kind).glob("group=*/model=*/day=*/*.parquet"):
                self._index(kind, path)
        for key, v in self.dropped_hwm.items():
            agent, kind, model = key.split("|", 2)
            k = (agent, kind, model)
            self.hwm[k] = max(self.hwm.get(k, 0), int(v))

    # ------------------------------------------------------------------ disk

    def _recover(self) -> None:
        for journal in self.root.glob(".journal-*.json"):
            try:
                renames = json.loads(journal.read_bytes())
            except (OSError, ValueError):
                renames = []  # written but never fsynced whole: its temporary files are dropped below
            for tmp, final in renames:
                if Path(tmp).exists():
                    os.replace(tmp, final)
                    fsync_dir(Path(final).parent)
            journal.unlink(missing_ok=True)
        for tmp in self.root.glob("*/group=*/model=*/day=*/.*.tmp"):
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)

    def _index(self, kind: str, path: Path) -> None:
        parsed = _parse_name(path.name)
        if parsed is None:
            return
        agent, _first, last = parsed
        model = path.parent.parent.name[len("model="):]
        group = path.parent.parent.parent.name[len("group="):]
        day = path.parent.name[len("day="):]
        key = (agent, kind, model)
        self.hwm[key] = max(self.hwm.get(key, 0), last)
        st = path.stat()
        self.files.setdefault(group, []).append((day, st.st_mtime_ns, path, st.st_size))

    def _save_marks(self) -> None:
        atomic_write(self.marks_path, json.dumps({"hwm": self.dropped_hwm, "dropped_rows": self.dropped_rows},
                                                 sort_keys=True).encode())

    # ------------------------------------------------------------------ upload

    def check(self, kind: str, model: str, table, first: int, last: int, agent: str):
        """The uploaded table, checked and with the envelope's types; ``device`` is the credential's name."""
        import pyarrow as pa
        import pyarrow.compute as pc

        names = table.column_names
        if len(set(names)) != len(names):
            raise _bad("the upload has two columns of the same name")
        for col, typ in ENVELOPE[kind].items():
            if col not in names:
                raise _bad(f"the upload has no column {col!r} (a {kind} row has {', '.join(ENVELOPE[kind])})")
            t = table.schema.field(col).type
            ok = pa.types.is_timestamp(t) if typ == "timestamp" else str(t) == typ
            if not ok:
                raise _bad(f"column {col!r} must be {typ}, got {t}")
            if table.column(col).null_count and col in ("request_id", "seq", TIME_COLUMN[kind], "model"):
                raise _bad(f"column {col!r} has nulls")
        extra = [c for c in names if c not in ENVELOPE[kind] and not (kind == "samples" and c.startswith(("in.", "out.")))]
        if extra:
            raise _bad(f"unknown column {extra[0]!r} in {kind} (inputs are in.<name>, outputs out.<name>)")
        if table.num_rows == 0:
            return table
        seq = table.column("seq")
        lo, hi = pc.min(seq).as_py(), pc.max(seq).as_py()
        if lo < first or hi > last:
            raise _bad(f"seq runs from {lo} to {hi}, outside first={first} .. last={last}")
        if table.num_rows > 1:
            s = seq.combine_chunks()
            if not pc.all(pc.greater(s.slice(1), s.slice(0, len(s) - 1))).as_py():
                raise _bad("seq must increase strictly from row to row")
        if not pc.all(pc.equal(table.column("model"), model)).as_py():
            raise _bad(f"column 'model' holds another model than {model!r}")
        tcol = TIME_COLUMN[kind]
        table = table.set_column(names.index(tcol), tcol, pc.cast(table.column(tcol), pa.timestamp("us", tz="UTC")))
        idx = table.column_names.index("device")
        return table.set_column(idx, "device", pa.array([agent] * table.num_rows, pa.string()))

    def upload(self, agent: str, group: str, kind: str, model: str, first: int, last: int, body: bytes) -> dict:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if kind not in KINDS:
            raise _bad(f"kind must be samples or outcomes, got {kind!r}")
        if not NAME_RE.match(model or ""):
            raise _bad(f"model must be a model name, got {model!r}")
        if not 1 <= first <= last < 2**62:
            raise _bad("first and last must be sequence numbers with 1 <= first <= last")
        if len(body) > MAX_UPLOAD_BYTES:
            raise HubError(413, f"upload of {len(body)} bytes is over the limit of {MAX_UPLOAD_BYTES}", "too_large")
        try:
            table = pa.ipc.open_stream(pa.py_buffer(body)).read_all()
            table.validate(full=True)  # reading checks no string's UTF-8 (nor offsets): a lying body stops here
        except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:
            raise _bad(f"the body is not an Arrow IPC stream: {str(exc)[:200]}") from None
        table = self.check(kind, model, table, first, last, agent)
        key = (agent, kind, model)
        with self.lock:
            mark = self.hwm.get(key, 0)
            keep = table.filter(pc.greater(table.column("seq"), mark)) if table.num_rows else table
            if keep.num_rows == 0:
                return {"acked": last, "stored": 0}
            seq = keep.column("seq")
            lo, hi = pc.min(seq).as_py(), pc.max(seq).as_py()
            days = pc.strftime(keep.column(TIME_COLUMN[kind]), format="%Y-%m-%d")
            base = self.root / kind / f"group={group}" / f"model={model}"
            renames, written = [], []
            try:
                for day in sorted(pc.unique(days).to_pylist()):
                    part = keep.filter(pc.equal(days, day))
                    folder = base / f"day={day}"
                    folder.mkdir(parents=True, exist_ok=True)
                    final = folder / f"{agent}-{lo}-{hi}.parquet"
                    tmp = folder / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
                    written.append(tmp)
                    pq.write_table(part, tmp, compression="zstd")
                    with open(tmp, "rb+") as f:
                        os.fsync(f.fileno())
                    renames.append((str(tmp), str(final)))
                journal = self.root / f".journal-{uuid.uuid4().hex[:12]}.json"
                atomic_write(journal, json.dumps(renames).encode())
            except BaseException:
                for tmp in written:
                    tmp.unlink(missing_ok=True)
                raise
            for tmp, final in renames:
                os.replace(tmp, final)
                fsync_dir(Path(final).parent)
            journal.unlink(missing_ok=True)
            for _tmp, final in renames:
                st = os.stat(final)
                self.files.setdefault(group, []).append((Path(final).parent.name[4:], st.st_mtime_ns, Path(final),
                                                         st.st_size))
            self.hwm[key] = max(mark, hi)
            self._bound(group)
        return {"acked": last, "stored": keep.num_rows}

    def _bound(self, group: str) -> None:
        files = self.files.get(group, [])
        total = sum(f[3] for f in files)
        if total <= self.max_bytes:
            return
        import pyarrow.parquet as pq

        files.sort(key=lambda f: (f[0], f[1]))
        changed = False
        while total > self.max_bytes and len(files) > 1:
            day, _mt, path, size = files.pop(0)
            parsed = _parse_name(path.name)
            try:
                rows = pq.read_metadata(path).num_rows
            except Exception:  # noqa: BLE001 - a damaged file still goes
                rows = 0
            if parsed is not None:
                kind = path.parent.parent.parent.parent.name
                model = path.parent.parent.name[len("model="):]
                k = f"{parsed[0]}|{kind}|{model}"
                self.dropped_hwm[k] = max(self.dropped_hwm.get(k, 0), parsed[2])
            self.dropped_rows[group] = self.dropped_rows.get(group, 0) + rows
            self._save_marks()  # the mark first: the file's rows are never taken again
            changed = True
            path.unlink(missing_ok=True)
            total -= size
        if changed:
            self.files[group] = files

    # ------------------------------------------------------------------ reads

    @staticmethod
    def empty(kind: str):
        """No rows: the envelope's columns (without seq)."""
        import pyarrow as pa

        types = {"string": pa.string(), "timestamp": pa.timestamp("us", tz="UTC"), "int32": pa.int32(),
                 "double": pa.float64()}
        return pa.schema([(c, types[t]) for c, t in ENVELOPE[kind].items() if c != "seq"]).empty_table()

    def usage(self) -> dict:
        with self.lock:
            groups = {g: {"bytes": sum(f[3] for f in fs), "files": len(fs),
                          "dropped_rows": self.dropped_rows.get(g, 0)} for g, fs in self.files.items()}
            for g, k in self.dropped_rows.items():
                groups.setdefault(g, {"bytes": 0, "files": 0, "dropped_rows": k})
        return {"max_bytes_per_group": self.max_bytes, "groups": groups}

    def read(self, kind: str, group: str | None, model: str | None, since: datetime | None, max_rows: int):
        """Rows oldest first (by their time column), at most max_rows, schemas unified (a column missing
        from a file is null), without ``seq``."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if kind not in KINDS:
            raise HubError(404, f"no device data of kind {kind!r} (samples or outcomes)", "not_found")
        base = self.root / kind
        pattern = f"group={group or '*'}/model={model or '*'}/day=*/*.parquet"
        since_day = since.strftime("%Y-%m-%d") if since else ""
        by_day: dict[str, list[Path]] = {}
        for path in base.glob(pattern):
            day = path.parent.name[4:]
            if day >= since_day and _parse_name(path.name):
                by_day.setdefault(day, []).append(path)
        tables, got = [], 0
        tcol = TIME_COLUMN[kind]
        for day in sorted(by_day):
            for path in sorted(by_day[day]):
                try:
                    t = pq.read_table(path)
                except FileNotFoundError:  # dropped by the bound meanwhile
                    continue
                t = t.drop_columns(["seq"]) if "seq" in t.column_names else t
                if since is not None:
                    t = t.filter(pc.greater_equal(t.column(tcol), pa.scalar(since, pa.timestamp("us", tz="UTC"))))
                if t.num_rows:
                    tables.append(t)
                    got += t.num_rows
            if got >= max_rows:  # later days hold only later rows
                break
        if not tables:
            return None
        out = pa.concat_tables(tables, promote_options="permissive")
        out = out.sort_by([(tcol, "ascending"), ("request_id", "ascending")])
        return out.slice(0, max_rows)


def parse_since(v: str | None) -> datetime | None:
    if v is None or v == "":
        return None
    try:
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise _bad(f"since must be an ISO timestamp (2026-01-31T12:00:00Z), got {v[:40]!r}") from None
    return d.replace(tzinfo=timezone.utc) if d.tzinfo is None else d.astimezone(timezone.utc)

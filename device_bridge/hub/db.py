"""The hub's database: one storage layer over SQLite (the default: one file, ``STORE/hub.db``, in WAL
mode) and PostgreSQL (``--db postgresql://...``: several hub processes or machines on one state).

Both speak the same SQL here: ``?`` placeholders (rewritten to ``%s`` for psycopg), ``ON CONFLICT``
upserts, JSON kept as text. Each thread has its own connection; a write is one transaction, so a
process killed mid-write leaves the previous state whole. The schema is versioned
(``schema_version``): ``MIGRATIONS`` run in order, each in its own transaction, and a database
written by a newer hub is refused rather than guessed at. A store that still holds the JSON files
of the hubs before this layer (``hub_state.json``, ``credentials.json``) is imported on first
start, in the same transaction as the schema, and the files are kept beside it as ``*.bak``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from device_bridge.hub.errors import HubError

# version -> statements; {serial} is the dialect's auto-numbered key. Never edit a released entry:
# add the next version.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE agents (name TEXT PRIMARY KEY, url TEXT, grp TEXT, providers TEXT, registered_at DOUBLE PRECISION)",
        "CREATE TABLE reports (agent TEXT PRIMARY KEY, body TEXT NOT NULL, last_seen DOUBLE PRECISION NOT NULL)",
        "CREATE TABLE groups (name TEXT PRIMARY KEY, devices TEXT NOT NULL)",
        "CREATE TABLE desired (agent TEXT NOT NULL, model TEXT NOT NULL, entry TEXT NOT NULL, PRIMARY KEY (agent, model))",
        "CREATE TABLE previous (agent TEXT NOT NULL, model TEXT NOT NULL, entry TEXT NOT NULL, PRIMARY KEY (agent, model))",
        "CREATE TABLE blobs (sha256 TEXT PRIMARY KEY, meta TEXT NOT NULL, seq BIGINT NOT NULL)",
        "CREATE TABLE credentials (name TEXT PRIMARY KEY, sha256 TEXT, enrolled_at DOUBLE PRECISION, "
        "revoked_at DOUBLE PRECISION)",
        "CREATE INDEX credentials_by_hash ON credentials (sha256)",
        "CREATE TABLE events (id {serial} PRIMARY KEY, agent TEXT NOT NULL, seq BIGINT NOT NULL, body TEXT NOT NULL)",
        "CREATE TABLE event_marks (agent TEXT PRIMARY KEY, seq BIGINT NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)
MAX_EVENTS = 1000  # the newest events kept (GET /v1/events)


def _sqlite_serial(ddl: str) -> str:
    return ddl.replace("{serial}", "INTEGER")  # an INTEGER PRIMARY KEY numbers itself


def _pg_serial(ddl: str) -> str:
    return ddl.replace("{serial}", "BIGSERIAL")


class Database:
    """``url``: None or ``sqlite:///PATH`` (default ``STORE/hub.db``), or ``postgresql://...``."""

    def __init__(self, store: str | Path, url: str | None = None):
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        url = url or f"sqlite:///{self.store / 'hub.db'}"
        self.url = url
        self._local = threading.local()
        self._all: list = []
        self._mu = threading.Lock()
        self.commits = 0  # transactions committed by this process (the report flusher's tests count them)
        if url.startswith("sqlite:///"):
            self.kind = "sqlite"
            self.path = Path(url[len("sqlite:///"):])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # created 0600 before SQLite opens it (it holds the credentials' hashes; SQLite gives its
            # -wal and -shm files the database file's mode), and only then: closing any descriptor
            # of an open database file would drop this process's SQLite locks on it
            if not self.path.exists():
                try:
                    os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
                except FileExistsError:  # another process made it meanwhile
                    pass
        elif url.startswith(("postgresql://", "postgres://")):
            self.kind = "postgresql"
            try:
                import psycopg  # noqa: F401  (only a PostgreSQL hub needs it)
            except ImportError:
                raise HubError(500, "--db postgresql://... needs psycopg: pip install 'mlsql-device[postgres]'",
                               "store") from None
        else:
            raise HubError(400, f"--db must be sqlite:///PATH or postgresql://..., got {_safe(url)!r}", "store")
        self.describe = f"sqlite:///{self.path}" if self.kind == "sqlite" else _safe(url)
        self.migrate()

    # -- connections and transactions ---------------------------------------------------------

    def _connect(self):
        if self.kind == "sqlite":
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut may lose the last commits, never corrupt
            con.execute("PRAGMA busy_timeout=30000")
            return con
        import psycopg

        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise HubError(503, self._scrub(f"cannot reach the hub's database {self.describe}: {exc}".strip()),
                           "store") from None

    def _scrub(self, text: str) -> str:
        """A driver's message may quote the connection string: never its password."""
        for secret in _secrets(self.url):
            text = text.replace(secret, "***")
        return text

    def _con(self):
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._connect()
            self._local.con = con
            with self._mu:
                self._all.append(con)
        return con

    def _sql(self, q: str) -> str:
        return q if self.kind == "sqlite" else q.replace("?", "%s")

    @contextmanager
    def read(self):
        """Reads outside a transaction (each statement sees the latest commit): one round trip per
        statement, where a transaction would add two more."""
        con = self._con()
        cur = con.cursor()
        try:
            yield Tx(self, cur)
        except (sqlite3.Error, _pg_error()) as exc:
            self._drop_broken(con)
            raise HubError(503, self._scrub(f"the hub's database {self.describe} failed: {exc}"), "store") from None
        finally:
            _close(cur)

    @contextmanager
    def tx(self, lock: bool = False, durable: bool = True):
        """One transaction; yields a ``Tx``. ``lock``: writers that read before they write (desired
        state, credentials) run one at a time, across every process on this database. ``durable=False``
        (an agent's report, sent again at its next poll): PostgreSQL answers before its log reaches
        the disk; a crash may lose that last report, never leave half of it (SQLite in WAL with
        synchronous=NORMAL does the same for every commit)."""
        con = self._con()
        try:
            if self.kind == "sqlite":
                con.execute("BEGIN IMMEDIATE")  # a writer: take the lock first, never upgrade to it (SQLITE_BUSY)
                cur = con.cursor()
                try:
                    yield Tx(self, cur)
                except BaseException:
                    _close(cur)
                    con.execute("ROLLBACK")
                    raise
                _close(cur)
                con.execute("COMMIT")
                self.commits += 1
            else:
                with con.transaction():
                    cur = con.cursor()
                    if not durable:
                        cur.execute("SET LOCAL synchronous_commit = off")
                    if lock:
                        cur.execute("SELECT pg_advisory_xact_lock(7301)")
                    yield Tx(self, cur)
                self.commits += 1
        except (sqlite3.Error, _pg_error()) as exc:
            self._drop_broken(con)
            raise HubError(503, self._scrub(f"the hub's database {self.describe} failed: {exc}"), "store") from None

    def _drop_broken(self, con) -> None:
        """A connection the server closed is opened again by the next call."""
        if self.kind == "postgresql" and (con.closed or con.broken):
            self._local.con = None

    def close(self) -> None:
        with self._mu:
            for con in self._all:
                try:
                    con.close()
                except Exception:
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- schema ----------------------------------------------------------------------------------

    def version(self) -> int:
        with self.tx() as t:
            if not t.has_table("schema_version"):
                return 0
            row = t.one("SELECT MAX(version) FROM schema_version")
            return int(row[0] or 0)

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one version per transaction; the first also imports
        a JSON store. Hubs starting together on one database take turns (the lock)."""
        with self.tx(lock=True) as t:
            if not t.has_table("schema_version"):
                t.run("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        while True:
            with self.tx(lock=True) as t:
                cur = int(t.one("SELECT COALESCE(MAX(version), 0) FROM schema_version")[0])
                if cur > SCHEMA_VERSION:
                    raise HubError(500, f"the hub's database {self.describe} has schema version {cur}, newer than "
                                        f"this hub's {SCHEMA_VERSION}: run the newer hub", "store")
                if cur == SCHEMA_VERSION:
                    break
                nxt = cur + 1
                for ddl in MIGRATIONS[nxt]:
                    t.run(_sqlite_serial(ddl) if self.kind == "sqlite" else _pg_serial(ddl))
                if nxt == 1:
                    import_json_store(t, self.store)
                t.run("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (nxt, time.time()))
        with self.tx() as t:
            imported = t.one("SELECT 1 FROM meta WHERE key = 'imported_json'") is not None
        if imported:  # a crash between the import's commit and the renames: they happen now
            _keep_json_as_backup(self.store)


class Tx:
    """The statements of one transaction."""

    def __init__(self, db: Database, cur):
        self.db, self.cur = db, cur

    def run(self, q: str, args: tuple = ()) -> None:
        self.cur.execute(self.db._sql(q), args)

    def many(self, q: str, rows: list) -> None:
        """One statement for many rows (psycopg pipelines them: one round trip, not one per row)."""
        if rows:
            self.cur.executemany(self.db._sql(q), rows)

    def one(self, q: str, args: tuple = ()):
        # every row read: a statement left half-read would hold SQLite's snapshot (and so hide
        # what other processes commit) until its cursor is collected
        self.cur.execute(self.db._sql(q), args)
        rows = self.cur.fetchall()
        return rows[0] if rows else None

    def all(self, q: str, args: tuple = ()) -> list:
        self.cur.execute(self.db._sql(q), args)
        return self.cur.fetchall()

    def has_table(self, name: str) -> bool:
        if self.db.kind == "sqlite":
            return self.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)) is not None
        return self.one("SELECT to_regclass(?)", (name,))[0] is not None


def _close(cur) -> None:
    try:
        cur.close()
    except Exception:  # noqa: BLE001 - a connection already gone
        pass


def _pg_error():
    try:
        import psycopg

        return psycopg.Error
    except ImportError:
        return sqlite3.Error


def _safe(url: str) -> str:
    """The URL without its password, for messages: the ``user:pw@`` one and any ``password=`` of the
    query string (libpq's own parameter; ``?password=...`` is as valid a way to give it)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://***"  # not a URL urllib can read: show none of it
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        if ":" in creds:
            netloc = f"{creds.split(':', 1)[0]}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*/")
    # by hand, not urlunsplit: that drops the empty host of postgresql:///db?host=/run/...
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _secrets(url: str) -> list[str]:
    """The password(s) in ``url`` (as written and decoded), to scrub from a driver's error text."""
    from urllib.parse import parse_qsl, unquote, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    found += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() == "password"]
    return sorted({s for s in found if s}, key=len, reverse=True)


# -- the JSON store of earlier hubs -------------------------------------------------------------

def _read_json(path: Path):
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # never start on half a state: the operator decides
        raise HubError(500, f"cannot import {path} into the hub's database: {exc}; move it away to start "
                            "without it", "store") from None
    if not isinstance(data, dict):
        raise HubError(500, f"cannot import {path}: not a JSON object", "store")
    return data


def import_json_store(t: Tx, store: Path) -> None:
    """``hub_state.json`` and ``credentials.json`` into the new schema, inside its transaction: a
    file that is not what those hubs wrote stops the start, and nothing of it is kept."""
    try:
        _import(t, store)
    except (AttributeError, TypeError, ValueError) as exc:
        raise HubError(500, f"cannot import {store / 'hub_state.json'} or {store / 'credentials.json'} into the "
                            f"hub's database: not the layout those hubs wrote ({exc}); nothing was imported. "
                            "Repair or move the file to start", "store") from None


def _import(t: Tx, store: Path) -> None:
    state = _read_json(store / "hub_state.json") or {}
    for name, info in (state.get("agents") or {}).items():
        info = info or {}
        t.run("INSERT INTO agents (name, url, grp, providers, registered_at) VALUES (?, ?, ?, ?, ?)",
              (name, info.get("url"), info.get("group"), json.dumps(info.get("providers")), info.get("registered_at")))
    for group, devices in (state.get("groups") or {}).items():
        t.run("INSERT INTO groups (name, devices) VALUES (?, ?)", (group, json.dumps(devices)))
    for table in ("desired", "previous"):
        for agent, models in (state.get(table) or {}).items():
            for model, entry in (models or {}).items():
                t.run(f"INSERT INTO {table} (agent, model, entry) VALUES (?, ?, ?)",
                      (agent, model, json.dumps(entry, sort_keys=True)))
    for i, (sha, meta) in enumerate((state.get("blobs") or {}).items()):
        t.run("INSERT INTO blobs (sha256, meta, seq) VALUES (?, ?, ?)", (sha, json.dumps(meta), i + 1))
    for name, e in (_read_json(store / "credentials.json") or {}).items():
        if isinstance(e, dict):
            t.run("INSERT INTO credentials (name, sha256, enrolled_at, revoked_at) VALUES (?, ?, ?, ?)",
                  (name, e.get("sha256"), e.get("enrolled_at"), e.get("revoked_at")))
    if state or (store / "credentials.json").exists():
        t.run("INSERT INTO meta (key, value) VALUES ('imported_json', ?)", (json.dumps({"at": time.time()}),))


def _keep_json_as_backup(store: Path) -> None:
    """After the import committed: the JSON files become ``*.bak`` (kept, never read again)."""
    for name in ("hub_state.json", "credentials.json"):
        p = store / name
        if p.exists():
            os.replace(p, p.with_name(name + ".bak"))

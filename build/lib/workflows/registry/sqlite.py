"""The adapter registry: immutable numbered versions, lineage, aliases that move with a history.

`AdapterRegistry` is the interface the stages and the CLI use; `Registry` is the embedded default:

    <root>/registry.db                    SQLite in WAL mode; every change is one IMMEDIATE transaction
    <root>/adapters/<name>/<version>/     the adapter files, copied via a staging dir + rename, read-only

The root must be a persistent local POSIX path: SQLite's locking is not reliable on NFS or other
network filesystems, and object stores have no locking at all. Another backend (MLflow's model
registry, a database server) implements `AdapterRegistry` without touching the stages.

Invariants:
- A version row exists only if its directory was renamed into place first, so every row points at
  complete files; the sha256 of every file is recorded and checked on every read (`resolve`, `export`).
- Versions are numbered 1, 2, 3... per name and never reused (soft-deleted ones keep their number);
  the number is allocated inside the write transaction, so concurrent writers never collide.
- Registering the same content again (sha256 over `adapter_config.json` + the weights) returns the
  existing version, so a retried DAG never creates a duplicate.
- Aliases move only through `promote`/`rollback`/`record_decision`; each move is a row of
  `alias_history` with its reason and the gate's numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from workflows.artifacts import fsync_dir, fsync_tree, is_uri
from workflows.registry.base import (
    ANY_HOLDER,
    AdapterRegistry,
    AdapterVersion,
    AliasConflict,
    AliasMove,
    Lineage,
    Ref,
    RegistryError,
    adapter_content_sha256,
    check_adapter_dir,
    file_hashes,
    now_iso,
    validate_alias,
    validate_name,
    verify_files,
)

SCHEMA_VERSION = 1

ServableCheck = Callable[[Path], "tuple[bool, list[str]]"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, content_sha256 TEXT NOT NULL, created TEXT NOT NULL,
    files TEXT NOT NULL, metrics TEXT NOT NULL, lineage TEXT NOT NULL, tags TEXT NOT NULL,
    servable INTEGER NOT NULL, servable_reasons TEXT NOT NULL, deleted TEXT,
    PRIMARY KEY (name, version), UNIQUE (name, content_sha256));
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, updated TEXT NOT NULL,
    PRIMARY KEY (name, alias), FOREIGN KEY (name, version) REFERENCES versions (name, version));
CREATE TABLE IF NOT EXISTS alias_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL, from_version INTEGER,
    to_version INTEGER NOT NULL, action TEXT NOT NULL CHECK (action IN ('promote', 'rollback')),
    reason TEXT NOT NULL, numbers TEXT NOT NULL, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version INTEGER NOT NULL, alias TEXT NOT NULL,
    promote INTEGER NOT NULL, reason TEXT NOT NULL, numbers TEXT NOT NULL, time TEXT NOT NULL);
"""


def _lora_core_check_servable(adapter_dir: Path) -> tuple[bool, list[str]]:
    from lora_core import check_servable

    ok, reasons = check_servable(adapter_dir)
    return bool(ok), [str(r) for r in reasons]


class Registry(AdapterRegistry):
    """The embedded backend: SQLite (WAL) + a directory per version under a local POSIX root.

    Safe for concurrent use by many processes on one machine: each call opens its own connection,
    writes take SQLite's write lock up front (`BEGIN IMMEDIATE`) and wait for it (busy timeout),
    and the slow part of `register` (copying and hashing files) happens before the lock.
    """

    def __init__(self, root: str | Path, check_servable: ServableCheck | None = None, busy_timeout_s: float = 60.0):
        if is_uri(root):
            raise RegistryError(f"registry root {root}: the SQLite registry needs a local POSIX path "
                                "(not an object store or network filesystem)")
        self.root = Path(root).expanduser().resolve()
        self.db_path = self.root / "registry.db"
        self.adapters_dir = self.root / "adapters"
        self._check_servable = check_servable or _lora_core_check_servable
        self._busy_timeout_s = busy_timeout_s
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._init_db()

    @classmethod
    def existing(cls, root: str | Path) -> Registry | None:
        """The registry at `root` if one was ever created there, else None (and nothing is created:
        a dry run such as `loraflow dag` must not leave an empty registry behind)."""
        if is_uri(root) or not (Path(root).expanduser() / "registry.db").is_file():
            return None
        return cls(root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # -- SQLite plumbing -------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; we issue BEGIN/COMMIT ourselves.
        conn = sqlite3.connect(self.db_path, timeout=self._busy_timeout_s, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")  # a committed version survives power loss
        return conn

    @contextlib.contextmanager
    def _txn(self, write: bool) -> Iterator[sqlite3.Connection]:
        conn = self._open()
        try:
            # IMMEDIATE takes the write lock before the first read, so read-then-write sequences
            # (next version number, current alias holder) cannot interleave with another writer.
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _init_db(self) -> None:
        conn = self._open()
        try:
            # Switching to WAL needs an exclusive lock and may report SQLITE_BUSY without waiting
            # when several processes open a new registry at once: retry (it is persistent once set).
            deadline = time.monotonic() + self._busy_timeout_s
            while True:
                try:
                    conn.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            conn.execute("BEGIN IMMEDIATE")
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise RegistryError(f"{self.db_path} has schema {found}; this loraflow reads {SCHEMA_VERSION}")
            for statement in filter(str.strip, _SCHEMA.split(";")):  # executescript would COMMIT early
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        finally:
            conn.close()

    def integrity_check(self) -> str:
        """`PRAGMA integrity_check`: "ok" for a sound database file."""
        conn = self._open()
        try:
            return "\n".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
        finally:
            conn.close()

    # -- versions --------------------------------------------------------------------------------

    def register(self, adapter_dir, name, metrics=None, lineage=None, tags=None) -> int:
        validate_name(name)
        src = Path(adapter_dir).expanduser()
        check_adapter_dir(src)
        lineage_dict = dataclasses.asdict(Lineage.coerce(lineage))
        name_dir = self.adapters_dir / name
        name_dir.mkdir(parents=True, exist_ok=True)
        staging = name_dir / f".staging-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src, staging, symlinks=True)
            # Hash the copy, not the source: what is recorded is exactly what is stored.
            files = file_hashes(staging)
            content = adapter_content_sha256(staging)
            servable, reasons = self._check_servable(staging)  # judged on exactly what is stored
            for rel in files:
                (staging / rel).chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            # On disk before the row that points at them is committed: a crash (or power loss) at
            # any point never leaves a version row whose files are incomplete.
            fsync_tree(staging)
            with self._txn(write=True) as conn:
                row = conn.execute("SELECT version, deleted FROM versions WHERE name=? AND content_sha256=?",
                                   (name, content)).fetchone()
                if row is not None:  # same content: idempotent (and a soft-deleted twin comes back)
                    if row["deleted"]:
                        conn.execute("UPDATE versions SET deleted=NULL WHERE name=? AND version=?",
                                     (name, row["version"]))
                    return int(row["version"])
                version = conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions WHERE name=?",
                                       (name,)).fetchone()[0]
                dest = name_dir / str(version)
                if dest.exists():  # left by a writer that died between rename and commit
                    shutil.rmtree(dest)
                os.rename(staging, dest)
                fsync_dir(name_dir)  # the rename itself
                try:
                    conn.execute(
                        "INSERT INTO versions VALUES (?,?,?,?,?,?,?,?,?,?,NULL)",
                        (name, version, content, now_iso(), json.dumps(files), _dumps(metrics or {}),
                         _dumps(lineage_dict), _dumps(tags or {}), int(servable), json.dumps(reasons)))
                except BaseException:
                    shutil.rmtree(dest, ignore_errors=True)
                    raise
                return int(version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _row_to_version(self, row: sqlite3.Row) -> AdapterVersion:
        return AdapterVersion(
            name=row["name"], version=int(row["version"]), path=self.adapters_dir / row["name"] / str(row["version"]),
            content_sha256=row["content_sha256"], created=row["created"], files=json.loads(row["files"]),
            metrics=json.loads(row["metrics"]), lineage=json.loads(row["lineage"]), tags=json.loads(row["tags"]),
            servable=bool(row["servable"]), servable_reasons=json.loads(row["servable_reasons"]),
            deleted=row["deleted"])

    def _lookup(self, conn: sqlite3.Connection, ref: Ref) -> sqlite3.Row:
        version = ref.version
        if ref.alias is not None:
            hit = conn.execute("SELECT version FROM aliases WHERE name=? AND alias=?", (ref.name, ref.alias)).fetchone()
            if hit is None:
                raise RegistryError(f"{ref}: no version of {ref.name!r} holds alias {ref.alias!r}")
            version = hit["version"]
        row = conn.execute("SELECT * FROM versions WHERE name=? AND version=?", (ref.name, version)).fetchone()
        if row is None:
            known = [r[0] for r in conn.execute("SELECT version FROM versions WHERE name=? ORDER BY version",
                                                (ref.name,))]
            raise RegistryError(f"{ref}: not in the registry at {self.root} (versions of {ref.name!r}: {known or 'none'})")
        return row

    def get(self, ref) -> AdapterVersion:
        ref = ref if isinstance(ref, Ref) else Ref.parse(ref)
        with self._txn(write=False) as conn:
            return self._row_to_version(self._lookup(conn, ref))

    def resolve(self, ref) -> Path:
        v = self.get(ref)
        if v.deleted:
            raise RegistryError(f"{v.ref} was deleted at {v.deleted}")
        verify_files(v.path, v.files, v.ref)
        return v.path

    def list_versions(self, name=None, include_deleted=False) -> list[AdapterVersion]:
        query, args = "SELECT * FROM versions", []
        clauses = []
        if name is not None:
            clauses.append("name=?")
            args.append(validate_name(name))
        if not include_deleted:
            clauses.append("deleted IS NULL")
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        with self._txn(write=False) as conn:
            return [self._row_to_version(r) for r in conn.execute(query + " ORDER BY name, version", args)]

    def delete(self, ref) -> None:
        ref = ref if isinstance(ref, Ref) else Ref.parse(ref)
        with self._txn(write=True) as conn:
            row = self._lookup(conn, ref)
            held = [r[0] for r in conn.execute("SELECT alias FROM aliases WHERE name=? AND version=? ORDER BY alias",
                                               (row["name"], row["version"]))]
            if held:
                raise RegistryError(f"{row['name']}:{row['version']} holds alias(es) {held}; move them first")
            conn.execute("UPDATE versions SET deleted=? WHERE name=? AND version=? AND deleted IS NULL",
                         (now_iso(), row["name"], row["version"]))

    # -- aliases ---------------------------------------------------------------------------------

    def aliases(self, name) -> dict[str, int]:
        with self._txn(write=False) as conn:
            rows = conn.execute("SELECT alias, version FROM aliases WHERE name=?", (validate_name(name),))
            return {r["alias"]: int(r["version"]) for r in rows}

    def history(self, name, alias=None) -> list[AliasMove]:
        query, args = "SELECT * FROM alias_history WHERE name=?", [validate_name(name)]
        if alias is not None:
            query += " AND alias=?"
            args.append(validate_alias(alias))
        with self._txn(write=False) as conn:
            return [AliasMove(name=r["name"], alias=r["alias"], from_version=r["from_version"],
                              to_version=r["to_version"], action=r["action"], reason=r["reason"],
                              numbers=json.loads(r["numbers"]), time=r["time"])
                    for r in conn.execute(query + " ORDER BY id", args)]

    def _move(self, conn, name, alias, to_version, action, reason, numbers) -> AliasMove:
        row = self._lookup(conn, Ref(name, version=to_version))
        if row["deleted"]:
            raise RegistryError(f"{name}:{to_version} was deleted; it cannot take alias {alias!r}")
        cur = conn.execute("SELECT version FROM aliases WHERE name=? AND alias=?", (name, alias)).fetchone()
        from_version = None if cur is None else int(cur["version"])
        t = now_iso()
        conn.execute("INSERT INTO aliases VALUES (?,?,?,?) ON CONFLICT (name, alias) DO UPDATE "
                     "SET version=excluded.version, updated=excluded.updated", (name, alias, to_version, t))
        conn.execute("INSERT INTO alias_history (name, alias, from_version, to_version, action, reason, numbers, time) "
                     "VALUES (?,?,?,?,?,?,?,?)", (name, alias, from_version, to_version, action, reason,
                                                  _dumps(numbers or {}), t))
        return AliasMove(name, alias, from_version, to_version, action, reason, numbers or {}, t)

    def promote(self, name, version, alias, reason, numbers=None) -> AliasMove:
        validate_name(name)
        validate_alias(alias)
        with self._txn(write=True) as conn:
            return self._move(conn, name, alias, int(version), "promote", reason, numbers)

    def rollback(self, name, alias, reason="rollback") -> AliasMove:
        validate_name(name)
        validate_alias(alias)
        with self._txn(write=True) as conn:
            rows = conn.execute("SELECT action, from_version FROM alias_history WHERE name=? AND alias=? "
                                "ORDER BY id DESC", (name, alias)).fetchall()
            # An undo stack: each rollback cancels the most recent promotion not yet cancelled;
            # the target is the holder that promotion replaced.
            undone = 0
            for r in rows:
                if r["action"] == "rollback":
                    undone += 1
                elif undone:
                    undone -= 1
                else:
                    if r["from_version"] is None:
                        break
                    return self._move(conn, name, alias, int(r["from_version"]), "rollback", reason, {})
            raise RegistryError(f"{name}@{alias}: no earlier holder to roll back to")

    def record_decision(self, name, version, alias, promote, reason, numbers,
                        expected_holder=ANY_HOLDER) -> AliasMove | None:
        validate_name(name)
        validate_alias(alias)
        with self._txn(write=True) as conn:
            if expected_holder is not ANY_HOLDER:
                cur = conn.execute("SELECT version FROM aliases WHERE name=? AND alias=?", (name, alias)).fetchone()
                holder = None if cur is None else int(cur["version"])
                if holder != expected_holder:
                    raise AliasConflict(f"{name}@{alias} is now version {holder}, but the gate compared against "
                                        f"{expected_holder}; evaluate again against the new holder")
            conn.execute("INSERT INTO decisions (name, version, alias, promote, reason, numbers, time) "
                         "VALUES (?,?,?,?,?,?,?)", (name, int(version), alias, int(promote), reason,
                                                   _dumps(numbers), now_iso()))
            if promote:
                return self._move(conn, name, alias, int(version), "promote", reason, numbers)
            return None

    def decisions(self, name, version=None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM decisions WHERE name=?", [validate_name(name)]
        if version is not None:
            query += " AND version=?"
            args.append(int(version))
        with self._txn(write=False) as conn:
            return [{"name": r["name"], "version": r["version"], "alias": r["alias"], "promote": bool(r["promote"]),
                     "reason": r["reason"], "numbers": json.loads(r["numbers"]), "time": r["time"]}
                    for r in conn.execute(query + " ORDER BY id", args)]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)

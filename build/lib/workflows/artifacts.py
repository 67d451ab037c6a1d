"""Artifacts on disk: content hashes, fingerprints, locks and the write-then-rename commit protocol.

A directory is written into a temp sibling and renamed into place (`atomic_dir`), so a half-written
output is never visible under its final name. A stage directory also gets its `_SUCCESS` marker
last (`stage_output`); readers trust a stage directory only when the marker exists.

This is the lowest base module: it imports nothing from the project.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"


def cache_root() -> Path:
    """`$LORAFLOW_CACHE`, default `~/.cache/loraflow`."""
    return Path(os.environ.get("LORAFLOW_CACHE", "~/.cache/loraflow")).expanduser()


def is_uri(location: str | Path) -> bool:
    """An object-store or other URL (`s3://bucket/key`), as opposed to a local path."""
    return "://" in str(location)


# ----------------------------------------------------------------------------- hashes

def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file_cached(path: str | Path) -> str:
    """`sha256_file`, remembered across processes: keyed by the resolved path, size, mtime and inode
    under `$LORAFLOW_CACHE/sha256/`, so a large unchanged file is read once, not at every plan.
    Any change of content changes size or mtime (or, for a replaced file, the inode)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_keyed(str(p), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.cache
def _sha256_keyed(path: str, size: int, mtime_ns: int, inode: int) -> str:
    key = hashlib.sha256(f"{path}\0{size}\0{mtime_ns}\0{inode}".encode()).hexdigest()
    entry = cache_root() / "sha256" / key[:2] / key
    with contextlib.suppress(OSError):
        cached = entry.read_text().strip()
        if len(cached) == 64:
            return cached
    digest = sha256_file(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs the re-read next time
        atomic_write_text(entry, digest)
    return digest


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short stable hash of JSON-able parts (config sections, upstream fingerprints, digests)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:length]


# ----------------------------------------------------------------------------- atomic writes

def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def fsync_tree(directory: Path) -> None:
    """Flush every file below `directory` and the directories themselves to stable storage, so a
    rename or a database commit that follows never points at data still in the page cache."""
    for p in sorted(directory.rglob("*"), reverse=True):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [*(p for p in directory.rglob("*") if p.is_dir()), directory]:
        fsync_dir(d)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to stable storage."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside `final`; on clean exit rename it to `final`.

    On error the temp directory is removed and `final` is untouched. An existing `final` is an
    error unless `replace` (then it is swapped out after the new one is complete).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists; refusing to overwrite it")
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / SUCCESS).is_file()


@contextlib.contextmanager
def stage_output(final_dir: str | Path, success: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temp directory; on clean exit write `_SUCCESS` into it and rename it to `final_dir`.

    On error `final_dir` is left untouched. A `final_dir` without a marker (a crashed earlier
    attempt) is replaced; a complete one is never overwritten.
    """
    final_dir = Path(final_dir)
    if is_complete(final_dir):
        raise FileExistsError(f"{final_dir} is already complete; refusing to overwrite it")
    with atomic_dir(final_dir, replace=True) as tmp:
        yield tmp
        atomic_write_json(tmp / SUCCESS, success or {})


# ----------------------------------------------------------------------------- locks

class UserError(Exception):
    """A failure the user can fix (bad data, a missing file, a bad config, an unreachable store, a
    held lock): the CLI prints its message alone, without a traceback, and exits with `exit_code`."""

    exit_code = 1


class LockHeldError(UserError, RuntimeError):
    """Another process holds a lock this one would not wait for (the message names the holder)."""

    exit_code = 4


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True, held: str | None = None) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for the duration of the block.

    With `wait=False` a held lock raises LockHeldError with the message `held` (default: the path).
    Released when the block ends or the process dies, so a crash never leaves it stuck.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockHeldError(held or f"another process holds the lock {path}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

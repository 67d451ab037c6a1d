"""Artifacts on disk: content hashes, fingerprints and the stage-directory commit protocol.

A stage writes into a temp directory beside its final one; `_SUCCESS` is written last and the
directory is renamed into place, so a half-written output never looks complete. Readers trust a
directory only when its `_SUCCESS` marker exists.
"""

from __future__ import annotations

import contextlib
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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(*parts: Any, length: int = 16) -> str:
    """A short stable hash of JSON-able parts (config sections, upstream fingerprints, digests)."""
    return hashlib.sha256(canonical_json(list(parts)).encode()).hexdigest()[:length]


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


def is_complete(stage_dir: str | Path) -> bool:
    return (Path(stage_dir) / SUCCESS).is_file()


@contextlib.contextmanager
def stage_output(final_dir: str | Path, success: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temp directory; on clean exit write `_SUCCESS` into it and rename it to `final_dir`.

    On error the temp directory is removed and `final_dir` is left untouched. If `final_dir`
    already exists without a marker (a crashed earlier attempt), it is replaced.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.parent / f".{final_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        atomic_write_json(tmp / SUCCESS, success or {})
        if final_dir.exists():
            if is_complete(final_dir):
                raise FileExistsError(f"{final_dir} is already complete; refusing to overwrite it")
            shutil.rmtree(final_dir)
        os.rename(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_dir_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy a directory to `dst` via a temp sibling and a rename (no partial `dst` is ever visible)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, tmp)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst

"""Where stage outputs are committed: a local work directory or an object store (`s3://bucket/prefix`).

Stage code only ever writes local directories, committed with `artifacts.stage_output` (temp dir,
`_SUCCESS`, rename). With a local work directory that directory *is* the stage output and nothing
here does anything. On an object store rename is not atomic, so the local directory is a staging
copy under `$LORAFLOW_CACHE/work/<uri key>/` and `WorkStore.publish` uploads it file by file with
`_SUCCESS` uploaded last: that upload is the commit. A prefix holding files but no `_SUCCESS` is an
attempt that died half-way; the next publish clears it. A committed prefix is never overwritten, so
`fetch` can keep a downloaded copy for as long as its `_SUCCESS` matches the store's byte for byte
(each publish stamps the marker with a fresh id).

Everything goes through `pyarrow.fs`; endpoint, region and credentials come from the environment
as pyarrow reads them (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ..., instance roles). Ray Data and
Ray Train get the driver's filesystem object, so an endpoint set on the driver applies on every node.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workflows.artifacts import (
    SUCCESS,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    cache_root,
    is_complete,
    is_uri,
    stage_output,
)
from workflows.config import ConfigError

_CHUNK = 8 << 20
_UPLOAD_THREADS = 8


class StorageError(ConfigError):
    """The work directory's store cannot be used: no such bucket, endpoint unreachable, no credentials."""


def join(location: str | Path, *parts: str) -> str:
    """`location/part/...` for a local path or a URI (Path would fold `s3://` into `s3:/`)."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it) for a local path or a URI."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as e:  # pa.ArrowInvalid is a ValueError
        raise StorageError(f"{location}: not a storage URI pyarrow can open ({e})") from None
    return fs, path.rstrip("/")


# --- single files, local or remote (shard lists, small JSON outputs) ---------------------------------


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def size(location: str | Path) -> int:
    fs, path = resolve(location)
    return fs.get_file_info(path).size


def read_bytes(location: str | Path) -> bytes | None:
    """The file's bytes, or None when there is no such file."""
    fs, path = resolve(location)
    return read_from(fs, path)


def read_text(location: str | Path) -> str | None:
    data = read_bytes(location)
    return None if data is None else data.decode()


def read_json(location: str | Path) -> dict:
    text = read_text(location)
    if text is None:
        raise FileNotFoundError(f"{location} does not exist")
    return json.loads(text)


def parquet_rows(location: str | Path) -> int:
    fs, path = resolve(location)
    return pq.read_metadata(path, filesystem=fs).num_rows


def read_parquet(files: list[str], columns: list[str]) -> pa.Table:
    paths, fs = ray_paths(files)
    return pq.read_table(paths if len(paths) > 1 else paths[0], columns=columns, filesystem=fs)


def ray_paths(files: list[str]) -> tuple[list[str], pafs.FileSystem | None]:
    """`(paths, filesystem)` for `ray.data.read_parquet`: local files as they are, URIs as paths on
    the driver's filesystem object (which carries the endpoint to every node)."""
    if not files or not is_uri(files[0]):
        return list(files), None
    fs, _ = resolve(files[0])
    return [resolve(f)[1] for f in files], fs


def read_from(fs: pafs.FileSystem, path: str) -> bytes | None:
    """The bytes of `path` on `fs`, or None when there is no such file."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def upload_file(src: Path, fs: pafs.FileSystem, dst: str) -> None:
    with open(src, "rb") as f, fs.open_output_stream(dst) as out:
        shutil.copyfileobj(f, out, _CHUNK)


def upload_dir(src: Path, fs: pafs.FileSystem, dst: str, skip: tuple[str, ...] = ()) -> None:
    """Every file below `src` to `dst/<relative path>`, in parallel (order not guaranteed)."""
    files = [p for p in sorted(src.rglob("*")) if p.is_file() and p.relative_to(src).as_posix() not in skip]
    with ThreadPoolExecutor(_UPLOAD_THREADS) as pool:
        list(pool.map(lambda p: upload_file(p, fs, f"{dst}/{p.relative_to(src).as_posix()}"), files))


def download_file(fs: pafs.FileSystem, src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(src) as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out, _CHUNK)


def list_files(fs: pafs.FileSystem, root: str) -> dict[str, int]:
    """{relative POSIX path: size} of every file below `root` ({} when it does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path[len(root.rstrip("/")) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def download_dir(fs: pafs.FileSystem, src: str, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file below `src` into `dst`; returns the relative paths copied."""
    rels = sorted(r for r in list_files(fs, src) if r not in skip)
    with ThreadPoolExecutor(_UPLOAD_THREADS) as pool:
        list(pool.map(lambda r: download_file(fs, f"{src}/{r}", dst / r), rels))
    return rels


# --- the work directory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkStore:
    """A work directory. `uri` is where stage outputs count (a local path or a URI); `local` is the
    folder stage code writes into and locks live in: the work directory itself, or for an object
    store its mirror under `$LORAFLOW_CACHE/work/<hash of the URI>/` (staging, downloaded copies)."""

    uri: str
    fs: pafs.FileSystem
    root: str  # `uri` as a path on `fs`
    local: Path

    @classmethod
    def open(cls, work_dir: str) -> WorkStore:
        work_dir = work_dir.removeprefix("file://")  # a local path spelled as a URI
        if not is_uri(work_dir):
            path = Path(work_dir).expanduser().resolve()
            return cls(str(path), pafs.LocalFileSystem(), str(path), path)
        uri = work_dir.rstrip("/")
        fs, root = resolve(uri)
        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        return cls(uri, fs, root, cache_root() / "work" / key)

    @property
    def remote(self) -> bool:
        return is_uri(self.uri)

    def uri_of(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def path_of(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def local_of(self, *parts: str) -> Path:
        return self.local.joinpath(*parts)

    def check(self, write: bool = False) -> None:
        """Fail now, naming the URI, if the store cannot be used (a no-op for a local directory).

        Reads the bucket; with `write`, also writes and deletes a probe object, so missing write
        permission shows before any stage runs rather than after the first one.
        """
        if not self.remote:
            return
        bucket = self.root.split("/", 1)[0]
        hint = "check the bucket name, the endpoint (AWS_ENDPOINT_URL) and the credentials"
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as e:
            raise StorageError(f"cluster.work_dir {self.uri}: cannot reach the store: {e}; {hint}") from None
        if info.type != pafs.FileType.Directory:
            raise StorageError(f"cluster.work_dir {self.uri}: bucket {bucket!r} does not exist or is not "
                               f"visible with these credentials; {hint}")
        if write:
            probe = self.path_of(f".loraflow-write-check-{uuid.uuid4().hex[:8]}")
            try:
                with self.fs.open_output_stream(probe) as f:
                    f.write(b"ok")
                self.fs.delete_file(probe)
            except OSError as e:
                raise StorageError(f"cluster.work_dir {self.uri}: cannot write: {e}; {hint}") from None

    def is_complete(self, *parts: str) -> bool:
        if not self.remote:
            return is_complete(self.local_of(*parts))
        return self.fs.get_file_info(self.path_of(*parts, SUCCESS)).type == pafs.FileType.File

    def read_text(self, *parts: str) -> str | None:
        if not self.remote:
            path = self.local_of(*parts)
            return path.read_text() if path.is_file() else None
        data = read_from(self.fs, self.path_of(*parts))
        return None if data is None else data.decode()

    def write_text(self, text: str, *parts: str) -> None:
        """Replace a small file (one PUT on an object store: readers see the old or the new one)."""
        if not self.remote:
            atomic_write_text(self.local_of(*parts), text)
            return
        with self.fs.open_output_stream(self.path_of(*parts)) as f:
            f.write(text.encode())

    def clear_staging(self, *parts: str) -> None:
        """Before a stage runs: drop a stale local copy (object store only; the store is the truth)."""
        if self.remote:
            shutil.rmtree(self.local_of(*parts), ignore_errors=True)

    @contextlib.contextmanager
    def replacing(self, *parts: str) -> Iterator[None]:
        """A forced rerun (`--from STAGE`) of an output that is already complete.

        Local: the complete directory is moved aside while the stage runs, deleted once the new one
        is committed, and put back if the stage fails, so a failed rerun loses nothing. Object
        store: the stage is uncommitted first (its `_SUCCESS` deleted; `publish` then replaces the
        objects); a failed rerun leaves it missing, and the next run rebuilds it.
        """
        if self.remote:
            if self.is_complete(*parts):
                self.fs.delete_file(self.path_of(*parts, SUCCESS))
            yield
            return
        final = self.local_of(*parts)
        if not is_complete(final):
            yield
            return
        aside = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
        try:
            yield
        except BaseException:
            if not final.exists():
                os.rename(aside, final)
            raise
        shutil.rmtree(aside, ignore_errors=True)

    def publish(self, *parts: str) -> None:
        """Commit the stage directory `local_of(*parts)` (already committed locally by `stage_output`)
        to the store: clear what an unfinished attempt left, upload every file, then `_SUCCESS`.
        A no-op for a local work directory, where that directory is the output."""
        if not self.remote:
            return
        src, dst = self.local_of(*parts), self.path_of(*parts)
        marker = src / SUCCESS
        if not marker.is_file():
            raise FileNotFoundError(f"{src} has no {SUCCESS}: only a committed stage directory is published")
        if self.is_complete(*parts):
            raise FileExistsError(f"{self.uri_of(*parts)} is already complete; refusing to overwrite it")
        self.fs.delete_dir_contents(dst, missing_dir_ok=True)
        # A fresh id in the marker: a cached copy is current exactly when its marker equals the store's.
        atomic_write_json(marker, {**json.loads(marker.read_text() or "{}"), "published": uuid.uuid4().hex})
        upload_dir(src, self.fs, dst, skip=(SUCCESS,))
        upload_file(marker, self.fs, f"{dst}/{SUCCESS}")  # the commit

    def fetch(self, *parts: str) -> Path:
        """A local directory holding the committed output `parts`: for an object store, the cached
        copy if its `_SUCCESS` matches the store's, else a fresh download (temp dir, then rename)."""
        local = self.local_of(*parts)
        if not self.remote:
            return local
        src = self.path_of(*parts)
        marker = read_from(self.fs, f"{src}/{SUCCESS}")
        if marker is None:
            raise FileNotFoundError(f"{self.uri_of(*parts)} is not a complete stage output (no {SUCCESS})")
        cached = local / SUCCESS
        if cached.is_file() and cached.read_bytes() == marker:
            return local
        with atomic_dir(local, replace=True) as tmp:
            download_dir(self.fs, src, tmp, skip=(SUCCESS,))
            (tmp / SUCCESS).write_bytes(marker)
        return local


# --- writing from any node: stage outputs built in place ------------------------------------------


def open_output(location: str | Path) -> pa.NativeFile:
    """A stream writing the file `location` (local path or URI); local parent folders are created."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return fs.open_output_stream(path)


def write_parquet(table: pa.Table, location: str | Path) -> None:
    with open_output(location) as f:
        pq.write_table(table, f)


def write_json(obj: Any, location: str | Path) -> None:
    with open_output(location) as f:
        f.write((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def parquet_schema(location: str | Path) -> dict[str, str]:
    """{column: type} of a Parquet file, local or remote."""
    fs, path = resolve(location)
    return {f.name: str(f.type) for f in pq.read_schema(path, filesystem=fs)}


def delete_dir(location: str | Path) -> None:
    fs, path = resolve(location)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def move_dir(src: str | Path, dst: str | Path) -> None:
    """Move a folder's files to `dst` (replacing what was there): a rename locally, copies remotely."""
    delete_dir(dst)
    fs, source = resolve(src)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(resolve(dst)[1]).parent.mkdir(parents=True, exist_ok=True)
        if fs.get_file_info(source).type == pafs.FileType.Directory:
            os.rename(source, resolve(dst)[1])
        return
    _, target = resolve(dst)
    for rel in list_files(fs, source):
        fs.copy_file(f"{source}/{rel}", f"{target}/{rel}")
    delete_dir(src)


@contextlib.contextmanager
def committed_dir(location: str | Path) -> Iterator[str]:
    """Yield where a stage writes its files, from any node; commit them on a clean exit.

    Local: a temp folder beside `location`, renamed into place after `_SUCCESS` is written in it
    (`artifacts.stage_output`). Object store: the prefix itself, cleared of what an unfinished
    attempt left; `_SUCCESS` (with a fresh id) is uploaded last, and that upload is the commit. On
    error nothing is committed. A complete `location` is never overwritten.
    """
    if not is_uri(location):
        with stage_output(location) as tmp:
            yield str(tmp)
        return
    fs, root = resolve(location)
    if fs.get_file_info(f"{root}/{SUCCESS}").type == pafs.FileType.File:
        raise FileExistsError(f"{location} is already complete; refusing to overwrite it")
    fs.delete_dir_contents(root, missing_dir_ok=True)
    yield str(location).rstrip("/")
    with fs.open_output_stream(f"{root}/{SUCCESS}") as f:
        f.write(json.dumps({"published": uuid.uuid4().hex}).encode())

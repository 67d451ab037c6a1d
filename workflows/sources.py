"""Reading raw training data as numbered records, so one bad row never costs the others.

Every reader yields the same block schema, one row per input record:

| column   | type   | meaning |
|----------|--------|---------|
| `origin` | string | "train" or "eval" (which of `data.source` / `data.eval_source` it came from) |
| `source` | string | the file it was read from |
| `row`    | int64  | JSONL: 1-based line number; CSV: line where the record starts (the header is line 1); Parquet / HF Arrow: 1-based record index |
| `raw`    | binary | the record as JSON bytes (JSONL: the line exactly as stored) |
| `error`  | string | null, or a reject reason found while reading (`invalid_utf8`, `malformed_csv`) |

Why not `ray.data.read_json` / `read_text`: `read_json` fails the whole dataset on one malformed
line, and `read_text` decodes whole files at once (one invalid byte fails the file) and splits on
Unicode line separators that may sit unescaped inside valid JSON strings. Here JSONL is split on
raw `\\n` bytes and parsing happens later, per line, where a failure becomes a numbered reject.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

RECORD_SCHEMA = pa.schema([("origin", pa.string()), ("source", pa.string()), ("row", pa.int64()),
                           ("raw", pa.binary()), ("error", pa.string())])
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
               ".parquet": "parquet", ".arrow": "arrow"}
_COMPRESSION = (".gz", ".bz2", ".zst", ".lz4")
ROWS_PER_BLOCK = 4096  # fixed, so block boundaries (and thus packing) are the same every run


class SourceError(ValueError):
    """A data source that cannot be read at all (missing path, unknown format)."""


def _reader_for(path: str, reader: str) -> str:
    if reader != "auto":
        return reader
    name = path.lower()
    for ext in _COMPRESSION:
        name = name.removesuffix(ext)
    kind = _EXTENSIONS.get(Path(name).suffix)
    if kind is None:
        raise SourceError(f"{path}: cannot tell the format from the extension; set data.reader "
                          f"(one of jsonl, csv, parquet, hf)")
    return kind


def _visible(path: str) -> bool:
    return not any(part.startswith((".", "_")) for part in Path(path).parts[-1:])


def _expand_local(spec: str) -> list[str]:
    path = Path(spec)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = [str(p) for p in sorted(path.rglob("*")) if p.is_file() and _visible(str(p))]
    else:
        files = sorted(f for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    if not files:
        raise SourceError(f"data source {spec!r}: no such file, directory or glob match")
    return files


def _expand_remote(spec: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(spec)
    info = fs.get_file_info(root)
    scheme = spec.split("://", 1)[0]
    if info.type == pafs.FileType.File:
        return [spec]
    if info.type != pafs.FileType.Directory:
        raise SourceError(f"data source {spec!r} does not exist")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File and _visible(i.path))


def _expand_hf(spec: str) -> list[str]:
    """`hf:<save_to_disk dir or hub name>[#split]` -> the dataset's Arrow files (streamed, never
    materialised). A DatasetDict uses split `train` unless `#split` names another."""
    import datasets

    target, _, split = spec.removeprefix("hf:").partition("#")
    if Path(target).expanduser().is_dir():
        ds = datasets.load_from_disk(str(Path(target).expanduser()))
    else:
        ds = datasets.load_dataset(target)
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise SourceError(f"{spec}: no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise SourceError(f"{spec}: the dataset has no Arrow files on disk to stream from")
    return files


def expand_sources(specs: str | list[str], reader: str) -> list[tuple[str, str]]:
    """Resolved sources -> sorted `(file, reader kind)` pairs. Sources must already be resolved
    (`PipelineConfig.resolve_path`); `hf:` and `reader: hf` go through `datasets`."""
    files: list[tuple[str, str]] = []
    for spec in [specs] if isinstance(specs, str) else specs:
        if spec.startswith("hf:") or reader == "hf":
            files += [(f, "arrow") for f in _expand_hf(spec if spec.startswith("hf:") else f"hf:{spec}")]
        elif "://" in spec:
            files += [(f, _reader_for(f, reader)) for f in _expand_remote(spec)]
        else:
            files += [(f, _reader_for(f, reader)) for f in _expand_local(spec)]
    return sorted(set(files))


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed (local or any pyarrow filesystem URI)."""
    h = hashlib.sha256()
    if "://" in path:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(root) as f:
            while block := f.read(chunk):
                h.update(block)
    else:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the datasource

class _BlockBuilder:
    """Accumulates records and cuts a block every `ROWS_PER_BLOCK` rows."""

    def __init__(self, origin: str, source: str):
        self.origin, self.source = origin, source
        self.rows: list[int] = []
        self.raws: list[bytes] = []
        self.errors: list[str | None] = []

    def add(self, row: int, raw: bytes, error: str | None = None) -> pa.Table | None:
        self.rows.append(row)
        self.raws.append(raw)
        self.errors.append(error)
        return self.flush() if len(self.rows) >= ROWS_PER_BLOCK else None

    def flush(self) -> pa.Table | None:
        if not self.rows:
            return None
        n = len(self.rows)
        table = pa.Table.from_arrays(
            [pa.array([self.origin] * n, pa.string()), pa.array([self.source] * n, pa.string()),
             pa.array(self.rows, pa.int64()), pa.array(self.raws, pa.binary()),
             pa.array(self.errors, pa.string())], schema=RECORD_SCHEMA)
        self.rows, self.raws, self.errors = [], [], []
        return table


class RecordsDatasource(FileBasedDatasource):
    """Reads JSONL, CSV, Parquet or HF Arrow files into numbered raw records (schema above).

    `kinds` maps each path to its reader; one datasource reads a mix of formats.
    """

    def __init__(self, files: list[tuple[str, str]], origin: str, **kwargs: Any):
        super().__init__([f for f, _ in files], **kwargs)
        self._kinds = {f: k for f, k in files}
        self._origin = origin

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        kind = self._kinds.get(path) or next(k for p, k in self._kinds.items() if p.endswith(path))
        builder = _BlockBuilder(self._origin, path)
        reader = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": self._parquet_records,
                  "arrow": _arrow_records}[kind]
        for row, raw, error in reader(f, path):
            if (block := builder.add(row, raw, error)) is not None:
                yield block
        if (block := builder.flush()) is not None:
            yield block

    def _parquet_records(self, f: pa.NativeFile, path: str) -> Iterator[tuple[int, bytes, str | None]]:
        import pyarrow.parquet as pq

        # Parquet needs random access; the stream Ray opened does not seek.
        with self._filesystem.open_input_file(path) as seekable:
            parquet = pq.ParquetFile(seekable)
            yield from _table_records(parquet.iter_batches(batch_size=ROWS_PER_BLOCK))


def _jsonl_records(f: pa.NativeFile, path: str, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes, None]]:
    """(line number, line bytes) for every non-blank line; split on b"\\n" only."""
    line_no, carry = 0, b""
    while True:
        block = f.read(chunk)
        if not block:
            break
        lines = (carry + block).split(b"\n")
        carry = lines.pop()
        for line in lines:
            line_no += 1
            if line.strip():
                yield line_no, line.removesuffix(b"\r"), None
    if carry.strip():
        yield line_no + 1, carry.removesuffix(b"\r"), None


def _csv_records(f: pa.NativeFile, path: str) -> Iterator[tuple[int, bytes, str | None]]:
    """CSV records as JSON objects keyed by the header. Invalid UTF-8 or a wrong number of fields
    rejects that record only. Per-record Python, in the read task: CSV inputs are moderate."""
    text = io.TextIOWrapper(io.BufferedReader(f), encoding="utf-8", errors="surrogateescape", newline="")
    delimiter = "\t" if path.lower().removesuffix(".gz").endswith(".tsv") else ","
    reader = csv.reader(text, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    start = reader.line_num + 1
    for record in reader:
        line, start = start, reader.line_num + 1
        raw_text = delimiter.join(record)
        if any("\udc80" <= ch <= "\udcff" for ch in raw_text):
            yield line, raw_text.encode("utf-8", "surrogateescape"), "invalid_utf8"
        elif len(record) != len(header):
            yield line, raw_text.encode(), f"malformed_csv: {len(record)} fields, header has {len(header)}"
        else:
            yield line, json.dumps(dict(zip(header, record)), ensure_ascii=False).encode(), None


def _arrow_records(f: pa.NativeFile, path: str) -> Iterator[tuple[int, bytes, None]]:
    """HF `datasets` Arrow files (IPC stream format), streamed batch by batch."""
    yield from _table_records(pa.ipc.open_stream(f))


def _table_records(batches: Any) -> Iterator[tuple[int, bytes, None]]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield row, json.dumps(record, ensure_ascii=False, default=str).encode(), None

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
import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from workflows.prepare.inputs import uncompressed_name

RECORD_SCHEMA = pa.schema([("origin", pa.string()), ("source", pa.string()), ("row", pa.int64()),
                           ("raw", pa.binary()), ("error", pa.string())])
ROWS_PER_BLOCK = 4096  # fixed, so block boundaries (and thus packing) are the same every run


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
    delimiter = "\t" if uncompressed_name(path).endswith(".tsv") else ","
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

"""Reading raw training data as numbered records, so one bad row never costs the others.

Every reader yields the same block schema, one row per input record:

| column   | type   | meaning |
|----------|--------|---------|
| `origin` | string | "train" or "eval" (which of `data.source` / `data.eval_source` it came from) |
| `source` | string | the file it was read from; for a streamed HF dataset, its pinned `hf:` spec |
| `row`    | int64  | JSONL: 1-based line number; CSV: line where the record starts (the header is line 1); Parquet / HF Arrow: 1-based record index; streamed HF dataset: 1-based index in the stream |
| `raw`    | binary | the record as JSON bytes (JSONL: the line exactly as stored) |
| `error`  | string | null, or a reject reason found while reading (`invalid_utf8`, `malformed_csv`) |

Why not `ray.data.read_json` / `read_text`: `read_json` fails the whole dataset on one malformed
line, and `read_text` decodes whole files at once (one invalid byte fails the file) and splits on
Unicode line separators that may sit unescaped inside valid JSON strings. Here JSONL is split on
raw `\\n` bytes and parsing happens later, per line, where a failure becomes a numbered reject.

A streamed HF dataset (`data.streaming`, `HfStreamDatasource`) is read by one task, in stream
order, which numbers its rows as it goes: the numbers are exact whatever runs downstream, and a
row limit (`data.max_rows`) stops the stream after that many rows.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, FileBasedDatasource, ReadTask

from workflows.artifacts import is_uri
from workflows.prepare.inputs import HF_STREAM, open_stream, parse_hf_spec, uncompressed_name

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
        reader = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": self._parquet_records,
                  "arrow": _arrow_records}[kind]
        yield from _blocks(_BlockBuilder(self._origin, path), reader(f, path))

    def _parquet_records(self, f: pa.NativeFile, path: str) -> Iterator[tuple[int, bytes, str | None]]:
        # Parquet needs random access; the stream Ray opened does not seek.
        with self._filesystem.open_input_file(path) as seekable:
            parquet = pq.ParquetFile(seekable)
            yield from _table_records(parquet.iter_batches(batch_size=ROWS_PER_BLOCK))


class HfStreamDatasource(Datasource):
    """A streamed HF dataset (`inputs.open_stream` of a pinned spec) as numbered raw records, read
    by one task in stream order: the only way its row numbers are exact, as a stream has no index.
    `max_rows` stops the stream there (Ray Data's `limit` would let the task stream on until the
    whole execution ends)."""

    def __init__(self, spec: str, origin: str, max_rows: int | None = None):
        self._spec, self._origin, self._max_rows = spec, origin, max_rows

    def get_name(self) -> str:
        return "HfStream"

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown until streamed

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        limit = min((n for n in (self._max_rows, per_task_row_limit) if n is not None), default=None)
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        read = functools.partial(_stream_blocks, self._spec, self._origin, limit)
        return [ReadTask(read, meta, schema=RECORD_SCHEMA, per_task_row_limit=per_task_row_limit)]


def _stream_blocks(spec: str, origin: str, limit: int | None) -> Iterator[pa.Table]:
    stream = open_stream(spec).with_format("arrow")  # Arrow batches, no per-row feature decoding
    records = _table_records(stream.iter(batch_size=min(ROWS_PER_BLOCK, limit or ROWS_PER_BLOCK)))
    yield from _blocks(_BlockBuilder(origin, spec), itertools.islice(records, limit))


def read_datasets(entries: list[tuple[str, str]], origin: str, max_rows: int | None = None) -> list[ray.data.Dataset]:
    """Ray datasets of numbered records for one origin's `(file or spec, kind)` entries: the files in
    one `RecordsDatasource`, each streamed HF dataset in its own `HfStreamDatasource`, which reads
    at most `max_rows` (`data.max_rows`: the caller still limits the union).

    Object-store files and Hub streams are read wherever Ray schedules the task. A local path (a
    file, a `datasets` cache or folder) exists on the driver's disk only: on a cluster of several
    nodes its read tasks stay on the driver's node (`on_driver_node`)."""
    local = [(f, kind) for f, kind in entries if kind != HF_STREAM and not is_uri(f)]
    remote = [(f, kind) for f, kind in entries if kind != HF_STREAM and is_uri(f)]
    parts = [ray.data.read_datasource(RecordsDatasource(files, origin), **args)
             for files, args in ((remote, {}), (local, on_driver_node())) if files]
    for spec, kind in entries:
        if kind == HF_STREAM:
            args = on_driver_node() if parse_hf_spec(spec).local else {}
            parts.append(ray.data.read_datasource(HfStreamDatasource(spec, origin, max_rows), **args))
    return parts


def on_driver_node() -> dict[str, Any]:
    """Read arguments that pin a task to this (the driver's) node when the cluster has several:
    `num_cpus=0`, since the head of a cluster often has no CPUs for tasks (cluster/kuberay)."""
    if sum(1 for n in ray.nodes() if n.get("Alive")) <= 1:
        return {}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "ray_remote_args": {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}}


def _blocks(builder: _BlockBuilder, records: Iterable[tuple[int, bytes, str | None]]) -> Iterator[pa.Table]:
    for row, raw, error in records:
        if (block := builder.add(row, raw, error)) is not None:
            yield block
    if (block := builder.flush()) is not None:
        yield block


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

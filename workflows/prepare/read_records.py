"""Reading raw training data as numbered records, so one bad row never costs the others.

Every reader yields the same block schema, one row per input record:

| column   | type   | meaning |
|----------|--------|---------|
| `origin` | string | "train" or "eval" (which of `data.source` / `data.eval_source` it came from) |
| `source` | string | the file it was read from; for a streamed HF dataset, its pinned `hf:` spec |
| `row`    | int64  | JSONL: 1-based line number; CSV: line where the record starts (the header is line 1); CoNLL: line of the sentence's first word; Parquet / HF Arrow: 1-based record index; streamed HF dataset: 1-based index in the stream |
| `raw`    | binary | the record as JSON bytes (JSONL: the line exactly as stored) |
| `error`  | string | null, or a reject reason found while reading (`invalid_utf8`, `malformed_csv`, `too_long`) |

No input can exhaust a read task: a line longer than `MAX_LINE_BYTES` (a file without newlines, a
gzip bomb) is rejected as `too_long` and reading goes on at the next newline, holding at most one
capped line in memory; a CSV record that the csv module refuses (a field over its 128 KiB limit) or
that an unbalanced quote stretches over later lines is rejected alone, and reading goes on at the
line after its first.

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
MAX_LINE_BYTES = 16 << 20  # a longer line is a `too_long` reject (no training example is 16 MiB of text)
REJECT_PREFIX_BYTES = 1024  # what a rejects file keeps of a line too long to keep


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
                  "arrow": _arrow_records, "conll": conll_records}[kind]
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


def _jsonl_records(f: pa.NativeFile, path: str, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes, str | None]]:
    """(line number, line bytes) for every non-blank line; split on b"\\n" only. A line over
    `MAX_LINE_BYTES` is a `too_long` reject (its first bytes kept), skipped up to the next newline."""
    line_no, parts, size, too_long = 0, [], 0, False
    while block := f.read(chunk):
        *complete, tail = block.split(b"\n")
        for piece in complete:
            line_no += 1
            if too_long or size + len(piece) > MAX_LINE_BYTES:
                yield _too_long(line_no, b"".join([*parts, piece[:REJECT_PREFIX_BYTES]]))
            elif (line := b"".join([*parts, piece])).strip():
                yield line_no, line.removesuffix(b"\r"), None
            parts, size, too_long = [], 0, False
        if too_long:
            continue
        if size + len(tail) > MAX_LINE_BYTES:  # keep only a prefix for the rejects file, drop the rest
            parts, too_long = [(b"".join(parts) + tail)[:REJECT_PREFIX_BYTES]], True
        else:
            parts.append(tail)
            size += len(tail)
    if too_long:
        yield _too_long(line_no + 1, b"".join(parts))
    elif (line := b"".join(parts)).strip():
        yield line_no + 1, line.removesuffix(b"\r"), None


def _too_long(line_no: int, start: bytes) -> tuple[int, bytes, str]:
    return line_no, start[:REJECT_PREFIX_BYTES], f"too_long: the line is over {MAX_LINE_BYTES} bytes"


class _CsvLines:
    """The lines of a CSV text stream for `csv.reader`, numbered and capped at `MAX_LINE_BYTES`
    characters (a longer line reaches the reader as a blank line and is listed in `too_long`).
    `record` holds the lines the record being parsed has taken, so a bad record can be re-read
    from its second line (`reread`); `ended` says the record ran into the end of the file, which a
    record of several lines does only when a quote never closed."""

    def __init__(self, text: io.TextIOBase):
        self.text, self.line_no, self.ended = text, 0, False
        self.record: list[tuple[int, str]] = []
        self.pending: list[tuple[int, str]] = []  # lines to hand out again, in reverse order
        self.too_long: set[int] = set()

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        item = self.pending.pop() if self.pending else self._read()
        self.record.append(item)
        return item[1]

    def _read(self) -> tuple[int, str]:
        line = self.text.readline(MAX_LINE_BYTES + 1)
        if not line:
            self.ended = True
            raise StopIteration
        self.line_no += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(("\n", "\r")):
            while (rest := self.text.readline(MAX_LINE_BYTES)) and not rest.endswith(("\n", "\r")):
                pass
            self.too_long.add(self.line_no)
            return self.line_no, "\n"
        return self.line_no, line

    def start_record(self) -> None:
        self.record, self.ended = [], False

    def reread(self) -> None:
        """Hand out again every line of the current record but its first."""
        self.pending.extend(reversed(self.record[1:]))


def _csv_records(f: pa.NativeFile, path: str) -> Iterator[tuple[int, bytes, str | None]]:
    """CSV records as JSON objects keyed by the header. Invalid UTF-8, a wrong number of fields, a
    field over the csv module's limit or an unbalanced quote rejects that record only. Per-record
    Python, in the read task: CSV inputs are moderate."""
    text = io.TextIOWrapper(io.BufferedReader(f), encoding="utf-8", errors="surrogateescape", newline="")
    delimiter = "\t" if uncompressed_name(path).endswith(".tsv") else ","
    lines = _CsvLines(text)
    reader = csv.reader(lines, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    while True:
        lines.start_record()
        try:
            record, error = next(reader), None
        except StopIteration:
            return
        except csv.Error as e:
            record, error = None, f"malformed_csv: {e}"
        line, first = lines.record[0] if lines.record else (lines.line_no, "")
        if line in lines.too_long:
            yield _too_long(line, b"")
            continue
        if record is None or (len(lines.record) > 1 and (len(record) != len(header) or lines.ended)):
            # A field over the limit, or a quote that swallowed the lines after it: reject the first
            # line alone and read on from the second (a fresh reader: the old one is mid-field).
            lines.reread()
            reader = csv.reader(lines, delimiter=delimiter)
            raw = first.encode("utf-8", "surrogateescape")[:REJECT_PREFIX_BYTES]
            yield line, raw, error or f"malformed_csv: an unbalanced quote (the record ran over {len(lines.record)} lines)"
            continue
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


def conll_records(f: Any, path: str) -> Iterator[tuple[int, bytes, str | None]]:
    """CoNLL column files (`.conll`, `.txt`): one word per line, its tag in the last column, a blank
    line between sentences, `-DOCSTART-` lines skipped. Each sentence becomes `{"tokens", "tags"}`
    (the words-with-tags shape of `data.format: token_classification`). A line with one column only
    makes that sentence a `length_mismatch` reject."""
    text = io.TextIOWrapper(io.BufferedReader(f), encoding="utf-8", errors="surrogateescape", newline=None)
    tokens: list[str] = []
    tags: list[str] = []
    start, short = 0, None

    def sentence() -> tuple[int, bytes, str | None]:
        raw = json.dumps({"tokens": tokens, "tags": tags}, ensure_ascii=False).encode("utf-8", "surrogateescape")
        if any("\udc80" <= ch <= "\udcff" for ch in "".join(tokens + tags)):
            return start, raw, "invalid_utf8"
        if short is not None:
            return start, raw, f"length_mismatch: line {short} has a word but no tag column"
        return start, raw, None

    for line_no, line in enumerate(text, 1):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                yield sentence()
            tokens, tags, short = [], [], None
            continue
        if not tokens:
            start = line_no
        if len(columns) < 2 and short is None:
            short = line_no
        tokens.append(columns[0])
        tags.append(columns[-1] if len(columns) > 1 else "")
    if tokens:
        yield sentence()

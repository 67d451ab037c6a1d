"""Hostile input never fails a read: over-long lines, gzip bombs, deep JSON and broken CSV are
rejected record by record, in bounded memory, and reading goes on."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pyarrow as pa
import pytest

from workflows.prepare import read_records
from workflows.prepare.formats import RowError, parse_record

CAP = 64 << 10  # a low line cap keeps these tests cheap; the code path is the production one


@pytest.fixture
def low_cap(monkeypatch):
    monkeypatch.setattr(read_records, "MAX_LINE_BYTES", CAP, raising=False)


class Pieces:
    """A stream made of `pieces`: a long line costs no memory to produce."""

    def __init__(self, pieces):
        self.pieces = iter(pieces)

    def read(self, n: int) -> bytes:
        return next(self.pieces, b"")


def peak_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_line_without_newline_is_rejected_as_too_long_and_reading_goes_on_in_bounded_memory(low_cap):
    block = b"x" * CAP
    stream = Pieces([b'{"text": "before"}\n', *[block] * 128, b'x\n{"text": "after"}\n'])  # an 8 MiB line
    records, peak = peak_bytes(lambda: list(read_records._jsonl_records(stream, "f.jsonl", chunk=CAP)))
    assert [(row, error and error.split(":")[0]) for row, _, error in records] == [(1, None), (2, "too_long"), (3, None)]
    assert json.loads(records[2][1]) == {"text": "after"}
    assert len(records[1][1]) <= read_records.REJECT_PREFIX_BYTES
    assert peak < 8 * CAP  # the 8 MiB line was never held


def test_a_gzip_bomb_line_is_rejected_as_too_long_in_bounded_memory(low_cap, tmp_path):
    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wb", compresslevel=1) as f:
        zeros = b"0" * (1 << 20)
        for _ in range(64):  # 64 MiB of one line, about 64 KiB on disk
            f.write(zeros)
        f.write(b'\n{"text": "after"}')
    stream = pa.CompressedInputStream(pa.OSFile(str(path)), "gzip")
    records, peak = peak_bytes(lambda: list(read_records._jsonl_records(stream, str(path), chunk=CAP)))
    assert [(row, error and error.split(":")[0]) for row, _, error in records] == [(1, "too_long"), (2, None)]
    assert peak < 8 * CAP


def test_json_nested_100000_deep_is_not_json():
    with pytest.raises(RowError, match="not_json"):
        parse_record(b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def csv_records(text: str):
    return [(row, error and error.split(":")[0], raw) for row, raw, error in
            read_records._csv_records(pa.BufferReader(text.encode()), "f.csv")]


def test_a_csv_field_over_the_csv_limit_rejects_that_record_only():
    records = csv_records("text,label\nok,a\n" + "y" * 200_000 + ",b\nalso ok,c\n")
    assert [(row, error) for row, error, _ in records] == [(2, None), (3, "malformed_csv"), (4, None)]
    assert json.loads(records[2][2]) == {"text": "also ok", "label": "c"}


def test_an_unbalanced_quote_rejects_its_record_and_reading_goes_on_at_the_next_line():
    records = csv_records('text,label\nok,a\n"broken,b\nfine,c\nalso fine,d\n')
    assert [(row, error) for row, error, _ in records] == [(2, None), (3, "malformed_csv"), (4, None), (5, None)]


def test_an_unbalanced_quote_in_the_last_column_does_not_swallow_the_rest_of_the_file():
    records = csv_records('text,label\nok,"a\nfine,c\nalso fine,d\n')
    assert [(row, error) for row, error, _ in records] == [(2, "malformed_csv"), (3, None), (4, None)]


def test_a_quoted_field_over_several_lines_is_still_one_record():
    records = csv_records('text,label\n"two\nlines",a\nnext,b\n')
    assert [(row, error) for row, error, _ in records] == [(2, None), (4, None)]
    assert json.loads(records[0][2]) == {"text": "two\nlines", "label": "a"}


def test_an_over_long_csv_line_is_too_long_and_reading_goes_on(low_cap):
    records = csv_records("text,label\n" + "z" * (3 * CAP) + ",a\nfine,b\n")
    assert [(row, error) for row, error, _ in records] == [(2, "too_long"), (3, None)]

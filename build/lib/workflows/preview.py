"""Loss-mask preview (`loraflow preview CONFIG [-n N]`): the first examples as training sees them.

Each example is decoded with its trained tokens (labels != -100) marked: ANSI colour on a
terminal, `[[...]]` otherwise. Special tokens stay visible, so the rendered chat template shows.
Also printed: the template, where packing boundaries fall, and token counts.

Where the examples come from:
- the prepare stage's output, when it already exists for this config (`workflows.dag.plan`):
  the first rows of the FIRST train shard only. A packed row holds several examples; a boundary
  is where `position_ids` restart at 0.
- otherwise the first valid records of the first input file (at most `10 * n` records read),
  encoded in-process exactly as the prepare stage encodes them, not packed yet.

No Ray on this path, not even imported (`workflows.prepare.read_records` imports Ray Data, so the
few lines that read records are repeated here).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from workflows import storage
from workflows.config import PipelineConfig
from workflows.dag import plan
from workflows.models import load_tokenizer
from workflows.prepare.formats import IGNORE_INDEX, ExampleEncoder, RowError, canonical_example, parse_record
from workflows.prepare.inputs import HF_STREAM, input_files, open_stream, uncompressed_name
from workflows.prepared import PreparedData

COLOR_ON, COLOR_OFF = "\x1b[1;32m", "\x1b[0m"  # bold green: trained tokens on a terminal
OPEN, CLOSE = "[[", "]]"  # trained tokens otherwise
BOUNDARY = "------ packing boundary: position_ids restart at 0 ------"
RECORDS_PER_EXAMPLE = 10  # raw mode reads at most n * this many records


def preview(config: PipelineConfig, n: int = 3, color: bool | None = None, out: TextIO | None = None) -> list[dict]:
    """Print the first `n` examples with their trained tokens marked; return what was printed.

    `out`: where to print (default: `sys.stdout` at call time); `color`: ANSI colour instead of
    `[[...]]` (default: when `out` is a terminal and $NO_COLOR is unset).
    Returns one dict per shown row: `mode` ("prepared" | "inputs"), `source` (the shard or input
    file read), `row` (1-based: row of the shard, or the record's line / record number),
    `packed`, `template`, `num_tokens`, `num_trained` (None for classification), `label`
    (classification's label name, else None), `truncated` (inputs mode), `hidden_examples`
    (packed examples of the row beyond `n`) and `examples`: per (packed) example `num_tokens`,
    `num_trained` and `segments` [{"text", "trained"}] whose texts concatenate to its decoded text.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = sys.stdout if out is None else out
    if color is None:
        color = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
    stage = plan(config)["prepare"]
    tokenizer = load_tokenizer(config.model.name, revision=config.model.revision)
    if stage.status == "hit":
        header, items = _from_prepared(PreparedData.load(stage.uri), tokenizer, n)
    else:
        header, items = _from_inputs(config, tokenizer, n)
    header.append("classification: no token is marked, the whole text feeds the label"
                  if config.data.format == "classification" else
                  f"trained tokens (labels != -100) are {'bold green' if color else 'inside [[ ]]'}")
    print("\n".join(header), file=out)
    for item in items:
        _print_item(item, color, out)
    return items


# ----------------------------------------------------------------------------- prepared shards

def _from_prepared(prepared: PreparedData, tokenizer: Any, n: int) -> tuple[list[str], list[dict]]:
    m, shard = prepared.manifest, prepared.train_files[0]
    header = [f"prepared data: {prepared.root} (the prepare stage's output for this config)",
              f"task {m['task']} | format {m.get('format')} | template {_template(m.get('format'), m.get('template'))} | "
              f"max_seq_len {m.get('max_seq_len')} | packed {'yes' if prepared.packed else 'no'}",
              f"read: the first rows of {shard} (1 of {len(prepared.train_files)} train shards)"]
    fs, path = storage.resolve(shard)
    with fs.open_input_file(path) as f:
        batch = next(pq.ParquetFile(f).iter_batches(batch_size=n), None)
    rows = batch.to_pylist() if batch is not None else []
    if not rows:
        header.append("the first train shard holds no rows")
    labels = m.get("label_names") or []
    base = {"mode": "prepared", "source": shard, "packed": prepared.packed, "template": m.get("template"),
            "truncated": None, "label": None}
    items, left = [], n
    for index, row in enumerate(rows, 1):
        if left <= 0:
            break
        item = {**base, "row": index, "num_tokens": len(row["input_ids"])}
        if prepared.task == "seq_cls":
            label = row["label"]
            item.update(label=labels[label] if 0 <= label < len(labels) else str(label), num_trained=None,
                        hidden_examples=0, examples=[_example(tokenizer, row["input_ids"], None)])
        else:
            starts = [i for i, p in enumerate(row.get("position_ids") or [0]) if p == 0] + [len(row["input_ids"])]
            spans = list(zip(starts[:-1], starts[1:]))
            item.update(num_trained=sum(lab != IGNORE_INDEX for lab in row["labels"]),
                        hidden_examples=max(len(spans) - left, 0),
                        examples=[_example(tokenizer, row["input_ids"][a:b], row["labels"][a:b])
                                  for a, b in spans[:left]])
        left -= len(item["examples"])
        items.append(item)
    return header, items


# ----------------------------------------------------------------------------- raw inputs

def _from_inputs(config: PipelineConfig, tokenizer: Any, n: int) -> tuple[list[str], list[dict]]:
    data = config.data
    path, kind = input_files(config)["train"][0]
    encoder = ExampleEncoder(tokenizer, data.format, data.max_seq_len, data.template, data.truncate,
                             data.train_on_inputs)
    causal = data.format != "classification"
    template = "chat" if encoder.use_chat_template and data.format in ("instruction", "chat") else "plain"
    packed = causal and data.pack is not False
    header = [f"input: {path} (the prepare stage has not run for this config: encoded here, as prepare would)",
              f"model {config.model.name} | format {data.format} | template {_template(data.format, template)} | "
              f"max_seq_len {data.max_seq_len}",
              f"not packed yet: prepare packs training examples into rows of up to {data.max_seq_len} tokens "
              "(positions restart at each example, whose first label is then masked)" if packed
              else "rows are not packed"]
    base = {"mode": "inputs", "source": path, "packed": False, "template": template, "hidden_examples": 0}
    items: list[dict] = []
    for row, record in _records(path, kind, n * RECORDS_PER_EXAMPLE):
        try:
            if isinstance(record, RowError):
                raise record
            example = canonical_example(record, data.format, data.fields, data.system_prompt)
            if causal:
                enc = encoder.encode_causal([example])[0]
                if isinstance(enc, RowError):
                    raise enc
                shown = _example(tokenizer, enc.input_ids, enc.labels)
                extra = {"label": None, "num_trained": shown["num_trained"], "truncated": enc.truncated}
            else:
                ids, cut = encoder.encode_classification([example["text"]])
                if cut[0] and not data.truncate:
                    raise RowError("too_long", f"{len(ids[0])} tokens > max_seq_len {data.max_seq_len}")
                shown = _example(tokenizer, ids[0], None)
                extra = {"label": example["label"], "num_trained": None, "truncated": cut[0]}
        except RowError as e:
            header.append(f"skipped record {row}: {e}")
            continue
        items.append({**base, **extra, "row": row, "num_tokens": shown["num_tokens"], "examples": [shown]})
        if len(items) == n:
            break
    if not items:
        header.append(f"no valid example in the first {n * RECORDS_PER_EXAMPLE} records of {path}")
    return header, items


def _records(path: str, kind: str, limit: int) -> Iterator[tuple[int, dict | RowError]]:
    """(1-based line or record number, record or the RowError that rejects it), at most `limit`,
    read as `workflows.prepare.read_records` reads them."""
    if kind == HF_STREAM:  # `data.streaming`: the first records of the stream, nothing more
        yield from _table_records(open_stream(path).with_format("arrow").iter(batch_size=limit), limit)
        return
    fs, where = storage.resolve(path)
    if kind == "parquet":
        with fs.open_input_file(where) as f:
            yield from _table_records(pq.ParquetFile(f).iter_batches(batch_size=limit), limit)
        return
    with fs.open_input_stream(where, compression="detect") as f:
        if kind == "arrow":
            yield from _table_records(pa.ipc.open_stream(f), limit)
        elif kind == "csv":
            yield from _csv_records(f, path, limit)
        else:
            count = 0
            for line_no, line in enumerate(io.BufferedReader(f), 1):  # split on b"\n" only
                if not line.strip():
                    continue
                if count >= limit:
                    return
                count += 1
                try:
                    yield line_no, parse_record(line.removesuffix(b"\n").removesuffix(b"\r"))
                except RowError as e:
                    yield line_no, e


def _csv_records(f: Any, path: str, limit: int) -> Iterator[tuple[int, dict | RowError]]:
    text = io.TextIOWrapper(io.BufferedReader(f), encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter="\t" if uncompressed_name(path).endswith(".tsv") else ",")
    header = next(reader, None) or []
    start = reader.line_num + 1
    for count, record in enumerate(reader):
        if count >= limit:
            return
        line, start = start, reader.line_num + 1
        if any("\udc80" <= ch <= "\udcff" for field in record for ch in field):
            yield line, RowError("invalid_utf8", "the record is not valid UTF-8")
        elif len(record) != len(header):
            yield line, RowError("malformed_csv", f"{len(record)} fields, header has {len(header)}")
        else:
            yield line, dict(zip(header, record))


def _table_records(batches: Any, limit: int) -> Iterator[tuple[int, dict]]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            if row > limit:
                return
            # the JSON round trip prepare makes (dates and the like become strings)
            yield row, json.loads(json.dumps(record, ensure_ascii=False, default=str))


# ----------------------------------------------------------------------------- rendering

def _example(tokenizer: Any, ids: list[int], labels: list[int] | None) -> dict:
    """Decoded segments: each maximal run of trained (or untrained) tokens decoded on its own, so a
    segment's boundary is exactly a token boundary. No labels: one untrained segment."""
    flags = [False] * len(ids) if labels is None else [lab != IGNORE_INDEX for lab in labels]
    segments, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or flags[i] != flags[start]:
            # No clean-up for causal rows: it would move text across a segment boundary.
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=labels is None)
            segments.append({"text": text, "trained": flags[start]})
            start = i
    return {"num_tokens": len(ids), "num_trained": None if labels is None else sum(flags), "segments": segments}


def _template(fmt: str | None, template: str | None) -> str:
    return f"none ({fmt}: the text as it is)" if fmt in ("completion", "text", "classification") else str(template)


def _marked(segments: list[dict], color: bool) -> str:
    on, off = (COLOR_ON, COLOR_OFF) if color else (OPEN, CLOSE)
    return "".join(f"{on}{s['text']}{off}" if s["trained"] else s["text"] for s in segments)


def _counts(d: dict) -> str:
    return f"{d['num_tokens']} tokens" + ("" if d["num_trained"] is None else f", {d['num_trained']} trained")


def _print_item(item: dict, color: bool, out: Any) -> None:
    what = f"row {item['row']}" if item["mode"] == "prepared" else f"record {item['row']}"
    parts = [_counts(item)]
    if item["label"] is not None:
        parts.append(f"label {item['label']!r}")
    total = len(item["examples"]) + item["hidden_examples"]
    if total > 1:
        parts.insert(0, f"{total} packed examples")
    if item.get("truncated"):
        parts.append("truncated to max_seq_len")
    print(f"\n=== {what}: {', '.join(parts)} ===", file=out)
    for k, example in enumerate(item["examples"]):
        if k:
            print(BOUNDARY, file=out)
        if total > 1:
            print(f"[example {k + 1} of {total}: {_counts(example)}]", file=out)
        print(_marked(example["segments"], color), file=out)
    if item["hidden_examples"]:
        print(f"{BOUNDARY}\n... {item['hidden_examples']} more packed example(s) in this row not shown", file=out)

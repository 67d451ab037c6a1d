"""The per-record work of the prepare stage, as a Ray Data `map_batches` callable.

`EncodeExamples` turns raw records (`workflows.prepare.read_records.RECORD_SCHEMA`) into one
output row per record: an encoded example assigned to `train` or `eval`, or a `reject` with its
reason. Nothing is dropped here, so the stage can count every record; duplicates are found later,
per bucket (`workflows.prepare.finalize`).

Output columns (`encoded_schema(task)`): `kind`, `reason`, `detail`, `source`, `row`, `raw`
(rejects only, first 2,000 characters), `example_id`, `input_ids` (list<int32>), `truncated`,
`num_tokens`, and per task: causal `labels`, `prompt_len`, `reference`, `num_trained`;
classification `label_name`, `text`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

from workflows.config import DataSection
from workflows.models import load_tokenizer
from workflows.prepare.formats import (
    IGNORE_INDEX,
    ExampleEncoder,
    RowError,
    canonical_example,
    example_id,
    parse_record,
    reference_text,
)

RAW_PREVIEW_CHARS = 2000

_COMMON = [("kind", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string()),
           ("row", pa.int64()), ("raw", pa.string()), ("example_id", pa.string()),
           ("input_ids", pa.list_(pa.int32())), ("truncated", pa.bool_()), ("num_tokens", pa.int32())]
_CAUSAL = [("labels", pa.list_(pa.int32())), ("prompt_len", pa.int32()), ("reference", pa.string()),
           ("num_trained", pa.int32())]
_CLASSIFICATION = [("label_name", pa.string()), ("text", pa.string())]


def encoded_schema(task: str) -> pa.Schema:
    return pa.schema(_COMMON + (_CLASSIFICATION if task == "seq_cls" else _CAUSAL))


def eval_side(example_hash: str, seed: int, eval_fraction: float) -> bool:
    """Whether an example belongs to eval: a hash of (seed, content id) compared with the
    fraction, so an example stays on its side however much data is added around it."""
    h = int(hashlib.sha256(f"{seed}:{example_hash}".encode()).hexdigest()[:8], 16)
    return h / 2**32 < eval_fraction


class EncodeExamples:
    """Validate, render, tokenize and split one batch of raw records.

    The tokenizer is built once per actor in `__init__` (never captured from the driver: that
    ships it through pickling and breaks remote-code tokenizers).
    """

    def __init__(self, model_name: str, data: DataSection, task: str):
        self.data, self.task = data, task
        self.tokenizer = load_tokenizer(model_name)
        self.encoder = ExampleEncoder(self.tokenizer, data.format, data.max_seq_len, data.template,
                                      data.truncate, data.train_on_inputs)
        self.schema = encoded_schema(task)

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns: dict[str, list[Any]] = {name: [] for name in self.schema.names}
        examples, kept = [], []
        for origin, source, row, raw, error in zip(*(batch.column(c).to_pylist() for c in
                                                     ("origin", "source", "row", "raw", "error"))):
            try:
                if error:
                    reason, _, detail = error.partition(": ")
                    raise RowError(reason, detail or "rejected while reading")
                example = canonical_example(parse_record(raw), self.data.format, self.data.fields,
                                            self.data.system_prompt)
            except RowError as e:
                self._reject(columns, source, row, raw, e)
                continue
            examples.append(example)
            kept.append((origin, source, row, raw))
        if self.task == "seq_cls":
            self._add_classification(columns, examples, kept)
        else:
            self._add_causal(columns, examples, kept)
        return pa.Table.from_pydict(columns, schema=self.schema)

    def _kind(self, origin: str, ex_id: str) -> str:
        if origin == "eval":
            return "eval"
        if self.data.eval_source is not None:
            return "train"
        return "eval" if eval_side(ex_id, self.data.seed, self.data.eval_fraction) else "train"

    def _reject(self, columns: dict[str, list], source: str, row: int, raw: bytes, error: RowError) -> None:
        values = {"kind": "reject", "reason": error.reason, "detail": error.detail, "source": source, "row": row,
                  "raw": raw.decode("utf-8", "replace")[:RAW_PREVIEW_CHARS]}
        for name, column in columns.items():
            column.append(values.get(name))

    def _append(self, columns: dict[str, list], values: dict[str, Any]) -> None:
        for name, column in columns.items():
            column.append(values.get(name))

    def _add_causal(self, columns: dict[str, list], examples: list[dict], kept: list[tuple]) -> None:
        for example, (origin, source, row, raw), enc in zip(examples, kept, self.encoder.encode_causal(examples)):
            if isinstance(enc, RowError):
                self._reject(columns, source, row, raw, enc)
                continue
            ex_id = example_id(example)
            self._append(columns, {
                "kind": self._kind(origin, ex_id), "source": source, "row": row, "example_id": ex_id,
                "input_ids": enc.input_ids, "labels": enc.labels, "prompt_len": enc.prompt_len,
                "reference": reference_text(example), "truncated": enc.truncated,
                "num_tokens": len(enc.input_ids), "num_trained": sum(lab != IGNORE_INDEX for lab in enc.labels)})

    def _add_classification(self, columns: dict[str, list], examples: list[dict], kept: list[tuple]) -> None:
        ids, truncated = self.encoder.encode_classification([ex["text"] for ex in examples])
        for example, (origin, source, row, raw), tokens, cut in zip(examples, kept, ids, truncated):
            if cut and not self.data.truncate:
                self._reject(columns, source, row, raw, RowError(
                    "too_long", f"{len(tokens)} tokens > max_seq_len {self.data.max_seq_len} "
                                "(data.truncate is off)"))
                continue
            ex_id = example_id(example)
            self._append(columns, {
                "kind": self._kind(origin, ex_id), "source": source, "row": row, "example_id": ex_id,
                "input_ids": tokens, "label_name": example["label"], "text": example["text"],
                "truncated": cut, "num_tokens": len(tokens)})

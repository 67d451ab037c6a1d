"""`data.format: token_classification`: a record in, words with IOB2 tags and their token ids out.

Three input shapes, told apart by their fields (names mapped through `data.fields`):

- text with character spans (spaCy, Label Studio, Doccano exports):
  `{"text": "...", "entities": [{"start": 16, "end": 20, "label": "restaurant_name"}]}`;
- words with tags (Hugging Face `datasets`, most NER corpora): `{"tokens": [...], "tags": [...]}`,
  tags as strings or as class ids (a `ClassLabel`: `data.labels` then lists the names in id order);
  `ner_tags` is read when there is no `tags`;
- CoNLL column files, which the reader turns into the words-with-tags shape (`read_records`).

Tags are converted from `data.tag_scheme` (iob2, iob1, bioes) to IOB2. Rejected, with a reason code:
`span_out_of_range` (outside the text, or start >= end), `overlapping_spans`, `span_misaligned` (a
span that starts or ends inside a word), `length_mismatch` (tokens and tags), `bad_tag` (not O/B-/I-
of the scheme, or a class id outside `data.labels`), `unknown_tag` (a type `data.labels` lacks).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workflows.prepare.formats import RowError
from workflows.token_tags import (
    join_words,
    misaligned_span,
    spans_to_word_tags,
    split_words,
    to_iob2,
    types_of,
)

TOKEN_REJECT_REASONS = ("span_out_of_range", "overlapping_spans", "span_misaligned", "length_mismatch",
                        "bad_tag", "unknown_tag")
TOKEN_FIELDS = {"text": "text", "entities": "entities", "tokens": "tokens", "tags": "tags"}


def _column(record: Mapping[str, Any], fields: Mapping[str, str], role: str) -> str | None:
    column = fields.get(role, TOKEN_FIELDS[role])
    if column in record:
        return column
    if role == "tags" and "tags" not in fields and "ner_tags" in record:
        return "ner_tags"
    return None


def _from_spans(record: Mapping[str, Any], text_col: str, ent_col: str | None) -> dict[str, Any]:
    text, raw = record[text_col], record.get(ent_col) if ent_col else []
    if not isinstance(text, str):
        raise RowError("wrong_type", f"{text_col!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise RowError("empty_field", f"{text_col!r} is empty")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise RowError("wrong_type", f"{ent_col!r} must be a list of {{start, end, label}}")
    spans = []
    for i, e in enumerate(raw):
        if not isinstance(e, dict) or not all(k in e for k in ("start", "end", "label")):
            raise RowError("wrong_type", f"{ent_col}[{i}] must be an object with start, end and label")
        start, end, label = e["start"], e["end"], e["label"]
        if not (isinstance(start, int) and isinstance(end, int) and isinstance(label, str) and label):
            raise RowError("wrong_type", f"{ent_col}[{i}]: start and end must be integers, label a non-empty string")
        if not 0 <= start < end <= len(text):
            raise RowError("span_out_of_range", f"{ent_col}[{i}] = {start}:{end} is empty or outside the text "
                                                f"({len(text)} characters)")
        spans.append((start, end, label))
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise RowError("overlapping_spans", f"{ent_col}: {a[0]}:{a[1]} ({a[2]}) overlaps {b[0]}:{b[1]} ({b[2]})")
    words = split_words(text)
    bad = misaligned_span(words, spans)
    if bad is not None:
        raise RowError("span_misaligned", f"{ent_col}: {bad[0]}:{bad[1]} ({bad[2]}) = {text[bad[0]:bad[1]]!r} starts "
                                          "or ends inside a word")
    return {"text": text, "words": words, "tags": spans_to_word_tags(words, spans)}


def _tag_names(tags: list[Any], tag_col: str, labels: Sequence[str] | None) -> list[str]:
    names = []
    for i, tag in enumerate(tags):
        if isinstance(tag, bool) or not isinstance(tag, (str, int)):
            raise RowError("wrong_type", f"{tag_col}[{i}] must be a string or a class id")
        if isinstance(tag, int):
            if not labels or not 0 <= tag < len(labels):
                raise RowError("bad_tag", f"{tag_col}[{i}] = {tag} is a class id; data.labels must list the "
                                          f"tag names in id order ({len(labels or [])} given)")
            tag = labels[tag]
        names.append(tag)
    return names


def _from_words(record: Mapping[str, Any], tok_col: str, tag_col: str, labels: Sequence[str] | None,
                scheme: str) -> dict[str, Any]:
    tokens, tags = record[tok_col], record[tag_col]
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t and not t.isspace() for t in tokens):
        raise RowError("wrong_type", f"{tok_col!r} must be a list of non-empty strings")
    if not isinstance(tags, list):
        raise RowError("wrong_type", f"{tag_col!r} must be a list")
    if not tokens:
        raise RowError("empty_field", f"{tok_col!r} is empty")
    if len(tokens) != len(tags):
        raise RowError("length_mismatch", f"{len(tokens)} {tok_col} but {len(tags)} {tag_col}")
    names = _tag_names(tags, tag_col, labels)
    try:
        iob2 = to_iob2(names, scheme)
    except ValueError as e:
        raise RowError("bad_tag", f"{tag_col}: {e} (data.tag_scheme {scheme})") from None
    text, words = join_words([t.strip() for t in tokens])
    return {"text": text, "words": words, "tags": iob2}


def canonical_token_example(record: Mapping[str, Any], fields: Mapping[str, str], labels: Sequence[str] | None,
                            scheme: str = "iob2") -> dict[str, Any]:
    """`{"text", "words": [(start, end)], "tags": [IOB2 per word]}` or RowError (module doc)."""
    text_col, tok_col = _column(record, fields, "text"), _column(record, fields, "tokens")
    if text_col is not None:
        example = _from_spans(record, text_col, _column(record, fields, "entities"))
    elif tok_col is not None:
        tag_col = _column(record, fields, "tags")
        if tag_col is None:
            raise RowError("missing_field", f"no {fields.get('tags', 'tags')!r} field beside {tok_col!r}")
        example = _from_words(record, tok_col, tag_col, labels, scheme)
    else:
        raise RowError("missing_field", f"neither {fields.get('text', 'text')!r} (with character spans) nor "
                                        f"{fields.get('tokens', 'tokens')!r} (with tags) in the record "
                                        f"(it has {sorted(record)[:8]})")
    if labels:
        allowed = set(types_of(labels))
        unknown = next((t[2:] for t in example["tags"] if t != "O" and t[2:] not in allowed), None)
        if unknown is not None:
            raise RowError("unknown_tag", f"entity type {unknown!r} is not in data.labels")
    return example


@dataclass
class EncodedTokens:
    """One row's token ids and, per token, the index of the word it belongs to (-1: special)."""

    input_ids: list[int]
    word_ids: list[int]
    truncated: bool = False


def encode_words(tokenizer: Any, examples: Sequence[Mapping[str, Any]]) -> list[EncodedTokens]:
    """Tokenize each example's text once (batched) and map tokens to words by character offsets."""
    enc = tokenizer([ex["text"] for ex in examples], return_offsets_mapping=True, return_attention_mask=False)
    out = []
    for ex, ids, offsets in zip(examples, enc["input_ids"], enc["offset_mapping"]):
        starts = [s for s, _ in ex["words"]]
        word_ids = []
        for lo, hi in offsets:
            w = bisect.bisect_right(starts, max(hi - 1, lo)) - 1 if hi > lo else -1
            word_ids.append(w if w >= 0 and ex["words"][w][1] > lo else -1)
        out.append(EncodedTokens(list(ids), word_ids))
    return out


def truncate_tokens(enc: EncodedTokens, max_len: int) -> EncodedTokens:
    """At most `max_len` tokens, keeping the last (special) token, as classification rows do."""
    if len(enc.input_ids) <= max_len:
        return enc
    return EncodedTokens(enc.input_ids[: max_len - 1] + enc.input_ids[-1:],
                         enc.word_ids[: max_len - 1] + [-1], True)

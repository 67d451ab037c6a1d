"""Token classification's tags, words and entities (pure Python; prepare, evaluate and predict share it).

- **Words.** Text given with character spans is cut into words by `WORD_PATTERN` (runs of word
  characters, and each other non-space character alone); rows given as words keep theirs, joined by
  one space. Entities, scores and predictions are per word, as CoNLL and `seqeval` count them.
- **Tags.** IOB2 inside (`O`, `B-TYPE`, `I-TYPE`); `to_iob2` converts IOB1 and BIOES.
- **Entities.** `entities(tags)`: seqeval's strict IOB2 chunks: a `B-X` and the `I-X` that follow it.
  An `I-X` that no `B-X` (or `I-X`) of the same type precedes starts nothing, so a model must predict
  a well-formed entity to score it.
- **Alignment**, as Hugging Face's `run_ner`: `token_labels` gives the first sub-token of each word
  its word's tag id, and other sub-tokens and special tokens -100 (`label_all_tokens`: other
  sub-tokens get the word's tag, with B- turned into I-).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

IGNORE_INDEX = -100
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
SCHEMES = ("iob2", "iob1", "bioes")

Span = tuple[int, int, str]  # (start, end) in characters or words, end exclusive; entity type


def split_words(text: str) -> list[tuple[int, int]]:
    """Character (start, end) of each word of `text`."""
    return [(m.start(), m.end()) for m in WORD_PATTERN.finditer(text)]


def join_words(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The words joined by single spaces, and each word's character (start, end) in that text."""
    offsets, pos = [], 0
    for w in words:
        offsets.append((pos, pos + len(w)))
        pos += len(w) + 1
    return " ".join(words), offsets


def split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") for "B-PER", ("O", "") for "O"; raises ValueError on anything else."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"tag {tag!r} is not O or <B|I|E|S>-<type>")
    return prefix, kind


def to_iob2(tags: Sequence[str], scheme: str = "iob2") -> list[str]:
    """IOB2 tags from `scheme` ("iob2", "iob1": I- may start an entity, B- only splits two adjacent
    ones; "bioes": S- single, E- end). Raises ValueError on a tag the scheme does not have."""
    out, prev = [], "O"
    for tag in tags:
        prefix, kind = split_tag(tag)
        if scheme != "bioes" and prefix in ("E", "S"):
            raise ValueError(f"tag {tag!r}: E-/S- tags belong to BIOES, not {scheme.upper()}")
        if prefix == "O":
            new = "O"
        elif scheme == "iob1" and prefix == "I":
            new = f"I-{kind}" if prev != "O" and split_tag(prev)[1] == kind else f"B-{kind}"
        elif scheme == "bioes":
            new = f"B-{kind}" if prefix in ("B", "S") else f"I-{kind}"
        else:
            new = f"{prefix}-{kind}"
        out.append(new)
        prev = new
    return out


def entities(tags: Sequence[str]) -> list[Span]:
    """Strict IOB2 entities (start word, end word exclusive, type), in order (see the module doc)."""
    found: list[Span] = []
    start, kind = None, ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, t = ("O", "") if tag == "O" else (tag[0], tag[2:])
        if start is not None and not (prefix == "I" and t == kind):
            found.append((start, i, kind))
            start = None
        if prefix == "B":
            start, kind = i, t
    return found


def spans_to_word_tags(words: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[str]:
    """IOB2 tags of the words from character spans that start and end on word boundaries (the
    caller checked that: `misaligned_span`) and do not overlap."""
    starts = {s: i for i, (s, _) in enumerate(words)}
    ends = {e: i for i, (_, e) in enumerate(words)}
    tags = ["O"] * len(words)
    for start, end, kind in spans:
        first, last = starts[start], ends[end]
        tags[first] = f"B-{kind}"
        for i in range(first + 1, last + 1):
            tags[i] = f"I-{kind}"
    return tags


def misaligned_span(words: Sequence[tuple[int, int]], spans: Sequence[Span]) -> Span | None:
    """The first span that starts or ends inside a word (or covers no word), else None."""
    starts, ends = {s for s, _ in words}, {e for _, e in words}
    return next((s for s in spans if s[0] not in starts or s[1] not in ends), None)


def word_tags_to_spans(words: Sequence[tuple[int, int]], tags: Sequence[str]) -> list[Span]:
    """Character spans of the strict entities of `tags` (the inverse of `spans_to_word_tags`)."""
    return [(words[a][0], words[b - 1][1], kind) for a, b, kind in entities(tags)]


def tag_vocabulary(types: Sequence[str]) -> list[str]:
    """The IOB2 tag names of entity types (index = class id): O, then B-/I- per type, sorted."""
    return ["O"] + [f"{p}-{t}" for t in sorted(set(types)) for p in ("B", "I")]


def types_of(labels: Sequence[str]) -> list[str]:
    """Entity types from `data.labels`, which lists types (PER) or tags (O, B-PER, I-PER, ...)."""
    kinds = []
    for label in labels:
        try:
            prefix, kind = split_tag(label)
        except ValueError:
            prefix, kind = "", label
        if prefix != "O" and kind not in kinds:
            kinds.append(kind)
    return kinds


def token_labels(word_ids: Sequence[int], word_tag_ids: Sequence[int], inside_of: Sequence[int],
                 label_all_tokens: bool = False) -> list[int]:
    """Per token: the tag id of its word on the word's first sub-token, -100 elsewhere (specials:
    word id -1). `inside_of[tag id]` is the id of the I- tag of the same type (O for O)."""
    labels, prev = [], -1
    for w in word_ids:
        if w < 0:
            labels.append(IGNORE_INDEX)
        elif w != prev:
            labels.append(word_tag_ids[w])
        else:
            labels.append(inside_of[word_tag_ids[w]] if label_all_tokens else IGNORE_INDEX)
        prev = w
    return labels


def inside_ids(vocabulary: Sequence[str]) -> list[int]:
    index = {t: i for i, t in enumerate(vocabulary)}
    return [index.get("I-" + t[2:], i) if t.startswith("B-") else i for i, t in enumerate(vocabulary)]


def first_subtokens(word_ids: Sequence[int]) -> list[int]:
    """Token positions of each word's first sub-token, in word order."""
    firsts, prev = [], -1
    for t, w in enumerate(word_ids):
        if w >= 0 and w != prev:
            firsts.append(t)
        prev = w
    return firsts

"""data.format token_classification: input shapes, tag schemes, reject reasons, the CoNLL reader and
the run_ner alignment of word tags to sub-tokens (pure Python, no Ray)."""

from __future__ import annotations

import io
import json
import random

import pytest

from workflows.models import load_tokenizer
from workflows.prepare.formats import RowError
from workflows.prepare.read_records import conll_records
from workflows.prepare.token_format import canonical_token_example, encode_words, truncate_tokens
from workflows.token_tags import (
    entities,
    first_subtokens,
    inside_ids,
    spans_to_word_tags,
    split_words,
    tag_vocabulary,
    to_iob2,
    token_labels,
    word_tags_to_spans,
)

TEXT = "restaurants | Could you book a table at Nopa for 2 at 7 pm?"


def spans_of(text: str, *pieces: tuple[str, str]) -> list[dict]:
    return [{"start": text.index(p), "end": text.index(p) + len(p), "label": label} for p, label in pieces]


def test_text_with_character_spans_becomes_word_tags():
    ex = canonical_token_example({"text": TEXT, "entities": spans_of(TEXT, ("Nopa", "restaurant_name"),
                                                                     ("7 pm", "time"))}, {}, None)
    words = [TEXT[s:e] for s, e in ex["words"]]
    assert list(zip(words, ex["tags"]))[8:] == [("Nopa", "B-restaurant_name"), ("for", "O"), ("2", "O"),
                                                ("at", "O"), ("7", "B-time"), ("pm", "I-time"), ("?", "O")]
    assert words[:2] == ["restaurants", "|"] and ex["tags"][:2] == ["O", "O"]


def test_tokens_with_string_tags_keep_their_words_joined_by_spaces():
    ex = canonical_token_example({"tokens": ["EU", "rejects", "German", "call"],
                                  "tags": ["B-ORG", "O", "B-MISC", "O"]}, {}, None)
    assert ex["text"] == "EU rejects German call"
    assert word_tags_to_spans(ex["words"], ex["tags"]) == [(0, 2, "ORG"), (11, 17, "MISC")]


def test_class_id_tags_read_their_names_from_data_labels_like_a_hf_classlabel():
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    ex = canonical_token_example({"tokens": ["Ada", "Lovelace", "in", "London"], "ner_tags": [1, 2, 0, 3]}, {}, names)
    assert ex["tags"] == ["B-PER", "I-PER", "O", "B-LOC"]


def test_field_names_map_through_data_fields():
    record = {"sentence": TEXT, "slots": spans_of(TEXT, ("Nopa", "restaurant_name"))}
    ex = canonical_token_example(record, {"text": "sentence", "entities": "slots"}, None)
    assert "B-restaurant_name" in ex["tags"]
    ex = canonical_token_example({"words": ["a", "b"], "labels": ["B-X", "I-X"]}, {"tokens": "words", "tags": "labels"},
                                 None)
    assert ex["tags"] == ["B-X", "I-X"]


@pytest.mark.parametrize("scheme, tags, expected", [
    ("iob1", ["I-PER", "I-PER", "B-PER", "O", "I-LOC"], ["B-PER", "I-PER", "B-PER", "O", "B-LOC"]),
    ("bioes", ["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "S-LOC"], ["B-PER", "B-LOC", "I-LOC", "I-LOC", "O", "B-LOC"]),
    ("iob2", ["B-PER", "I-PER", "O"], ["B-PER", "I-PER", "O"]),
])
def test_iob1_and_bioes_tags_are_converted_to_iob2(scheme, tags, expected):
    assert to_iob2(tags, scheme) == expected
    ex = canonical_token_example({"tokens": [f"w{i}" for i in range(len(tags))], "tags": tags}, {}, None, scheme)
    assert ex["tags"] == expected


@pytest.mark.parametrize("record, labels, reason", [
    ({"text": "book Nopa", "entities": [{"start": 5, "end": 12, "label": "r"}]}, None, "span_out_of_range"),
    ({"text": "book Nopa", "entities": [{"start": 5, "end": 5, "label": "r"}]}, None, "span_out_of_range"),
    ({"text": "book Nopa now", "entities": [{"start": 5, "end": 13, "label": "r"},
                                           {"start": 10, "end": 13, "label": "t"}]}, None, "overlapping_spans"),
    ({"text": "book Nopa", "entities": [{"start": 6, "end": 9, "label": "r"}]}, None, "span_misaligned"),
    ({"text": "book Nopa", "entities": [{"start": 5, "end": 8, "label": "r"}]}, None, "span_misaligned"),
    ({"tokens": ["a", "b"], "tags": ["O"]}, None, "length_mismatch"),
    ({"tokens": ["a", "b"], "tags": ["O", "X-PER"]}, None, "bad_tag"),
    ({"tokens": ["a", "b"], "tags": ["O", "E-PER"]}, None, "bad_tag"),  # BIOES tag in IOB2 data
    ({"tokens": ["a", "b"], "tags": [0, 7]}, ["O", "B-PER", "I-PER"], "bad_tag"),
    ({"tokens": ["a", "b"], "tags": ["O", "B-ORG"]}, ["PER", "LOC"], "unknown_tag"),
    ({"text": "book Nopa", "entities": [{"start": 5, "end": 9, "label": "r"}]}, ["time"], "unknown_tag"),
    ({"sentence": "no text field"}, None, "missing_field"),
])
def test_each_bad_row_is_rejected_with_its_reason_code(record, labels, reason):
    with pytest.raises(RowError) as e:
        canonical_token_example(record, {}, labels)
    assert e.value.reason == reason


def test_conll_reader_yields_one_record_per_sentence_skipping_docstart():
    text = ("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n"
            "Blackburn NNP I-NP I-PER\n\nlonely\n")
    records = list(conll_records(io.BytesIO(text.encode()), "x.conll"))
    assert [(row, json.loads(raw), err) for row, raw, err in records[:2]] == [
        (3, {"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}, None),
        (7, {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}, None)]
    assert records[2][0] == 10 and records[2][2].startswith("length_mismatch")


def test_first_sub_token_of_each_word_carries_its_tag_and_the_rest_get_minus_100():
    tok = load_tokenizer("minilm-l6")
    ex = canonical_token_example({"tokens": ["Lovelace", "visited", "Hayward"], "tags": ["B-PER", "O", "B-LOC"]},
                                 {}, None)
    enc = encode_words(tok, [ex])[0]
    vocab = tag_vocabulary(["LOC", "PER"])
    tag_ids = [vocab.index(t) for t in ex["tags"]]
    labels = token_labels(enc.word_ids, tag_ids, inside_ids(vocab))
    pieces = tok.convert_ids_to_tokens(enc.input_ids)
    assert len(pieces) > 5  # the names split into several sub-tokens
    assert [lab for lab in labels if lab != -100] == tag_ids
    assert [pieces[t] for t in first_subtokens(enc.word_ids)] == [tok.tokenize(w)[0] for w in
                                                                  ["Lovelace", "visited", "Hayward"]]
    assert labels[0] == labels[-1] == -100  # [CLS], [SEP]
    every = token_labels(enc.word_ids, tag_ids, inside_ids(vocab), label_all_tokens=True)
    inside_per = [every[t] for t, w in enumerate(enc.word_ids) if w == 0][1:]
    assert inside_per and set(inside_per) == {vocab.index("I-PER")}


def test_truncation_keeps_the_final_special_token_and_marks_the_row():
    tok = load_tokenizer("minilm-l6")
    ex = canonical_token_example({"text": " ".join(["word"] * 40)}, {}, None)
    enc = truncate_tokens(encode_words(tok, [ex])[0], 16)
    assert enc.truncated and len(enc.input_ids) == 16 and enc.input_ids[-1] == tok.sep_token_id
    assert enc.word_ids[-1] == -1


def _random_row(rng: random.Random) -> tuple[str, list[tuple[int, int, str]]]:
    vocab = ["Nopa", "7", "pm", "San", "Jose", "$", "51", ".", "book", "a", "table", "at", "O'Neil", "café", "2:30"]
    words = [rng.choice(vocab) for _ in range(rng.randint(1, 25))]
    text = " ".join(words)
    offsets = split_words(text)
    spans, i = [], 0
    while i < len(offsets):
        if rng.random() < 0.3:
            j = min(len(offsets), i + rng.randint(1, 3))
            spans.append((offsets[i][0], offsets[j - 1][1], rng.choice(["time", "city", "restaurant_name"])))
            i = j + rng.randint(0, 2)
        else:
            i += 1
    return text, spans


def test_spans_to_tags_to_spans_round_trips_for_every_untruncated_row():
    rng = random.Random(0)
    tok = load_tokenizer("minilm-l6")
    rows = [_random_row(rng) for _ in range(500)]
    examples = [canonical_token_example({"text": t, "entities": [{"start": a, "end": b, "label": c} for a, b, c in s]},
                                        {}, None) for t, s in rows]
    vocab = tag_vocabulary(["time", "city", "restaurant_name"])
    for (_text, spans), ex, enc in zip(rows, examples, encode_words(tok, examples)):
        assert word_tags_to_spans(ex["words"], ex["tags"]) == spans
        # through the tokens: the first sub-token labels give back the word tags, hence the spans
        labels = token_labels(enc.word_ids, [vocab.index(t) for t in ex["tags"]], inside_ids(vocab))
        back = [vocab[lab] for lab in labels if lab != -100]
        assert back == ex["tags"]
        assert word_tags_to_spans(ex["words"], back) == spans


def test_strict_entities_need_a_b_tag_and_one_type():
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-PER"]) == [(0, 2, "PER"), (4, 5, "LOC")]
    assert spans_to_word_tags([(0, 2), (3, 5)], [(0, 5, "X")]) == ["B-X", "I-X"]

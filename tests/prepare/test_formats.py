"""Prompt formats, label masking and packing on a real tokenizer (SmolLM2's, via tiny-llama)."""

from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest

from workflows.models import load_tokenizer
from workflows.prepare.formats import IGNORE_INDEX, ExampleEncoder, RowError, canonical_example
from workflows.prepare.packing import first_fit_decreasing, pack_table
from workflows.prepare.stats import label_vocabulary

SIMPLE_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}assistant:\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


def trained_text(tok, enc):
    return tok.decode([lab for lab in enc.labels if lab != IGNORE_INDEX])


def encode_one(tok, fmt, record, **kwargs):
    example = canonical_example(record, fmt, kwargs.pop("fields", {}))
    (enc,) = ExampleEncoder(tok, fmt, kwargs.pop("max_seq_len", 256), **kwargs).encode_causal([example])
    return enc


def test_plain_instruction_trains_only_the_output_and_one_eos(tok):
    enc = encode_one(tok, "instruction", {"instruction": "Add 2 and 3.", "input": "numbers", "output": "5"},
                     template="plain")
    assert trained_text(tok, enc) == "5" + tok.eos_token
    assert tok.decode(enc.input_ids[: enc.prompt_len]).endswith("### Response:\n")
    assert "### Input:\nnumbers" in tok.decode(enc.input_ids)


def test_field_mapping_reads_any_column_names(tok):
    enc = encode_one(tok, "instruction", {"question": "Why?", "answer": "Because."},
                     fields={"instruction": "question", "output": "answer"})
    assert trained_text(tok, enc) == "Because." + tok.eos_token


def test_completion_and_text_formats_end_with_eos_once(tok):
    enc = encode_one(tok, "completion", {"prompt": "The sky is", "completion": " blue."})
    assert trained_text(tok, enc) == " blue." + tok.eos_token
    enc = encode_one(tok, "text", {"text": "Just text."})
    assert trained_text(tok, enc) == "Just text." + tok.eos_token and enc.prompt_len == 0


def test_train_on_inputs_trains_the_prompt_too(tok):
    enc = encode_one(tok, "instruction", {"instruction": "Say hi.", "output": "hi"}, train_on_inputs=True)
    assert all(lab == tok_id for lab, tok_id in zip(enc.labels, enc.input_ids))


def test_template_without_end_of_turn_token_gets_eos_appended(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = SIMPLE_TEMPLATE
    enc = encode_one(tok, "chat", {"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello there"}]})
    assert trained_text(tok, enc) == "Hello there" + tok.eos_token


def test_a_token_merged_across_the_prompt_seam_is_trained(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = SIMPLE_TEMPLATE.replace(":\n", ": ")  # "assistant: " + "Hello" -> " Hello"
    enc = encode_one(tok, "chat", {"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello there"}]})
    assert trained_text(tok, enc) == " Hello there" + tok.eos_token


def test_template_that_rewrites_content_is_a_template_mismatch(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = SIMPLE_TEMPLATE.replace("m['content']", "m['content'] | upper")
    enc = encode_one(tok, "chat", {"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "hello"}]})
    assert isinstance(enc, RowError) and enc.reason == "template_mismatch"


def test_chat_template_required_but_missing_is_a_clear_error(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ExampleEncoder(tok, "chat", 128, template="chat")
    assert not ExampleEncoder(tok, "chat", 128, template="auto").use_chat_template


def test_system_prompt_is_prepended_and_never_trained(tok):
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    (enc,) = ExampleEncoder(tok, "chat", 256).encode_causal([canonical_example(record, "chat", {}, "Be brief.")])
    assert "Be brief." in tok.decode(enc.input_ids)
    assert trained_text(tok, enc) == "Yo" + tok.eos_token


def test_truncation_cuts_to_max_len_and_is_flagged(tok):
    record = {"instruction": "Repeat.", "output": "word " * 100}
    enc = encode_one(tok, "instruction", record, max_seq_len=64)
    assert enc.truncated and len(enc.input_ids) == len(enc.labels) == 64
    off = encode_one(tok, "instruction", record, max_seq_len=64, truncate=False)
    assert isinstance(off, RowError) and off.reason == "too_long" and "max_seq_len 64" in off.detail


def test_prompt_longer_than_max_len_is_rejected_even_with_truncation(tok):
    enc = encode_one(tok, "instruction", {"instruction": "word " * 200, "output": "ok"}, max_seq_len=32)
    assert isinstance(enc, RowError) and enc.reason == "too_long"


@pytest.mark.parametrize(("record", "reason"), [
    ({"instruction": "x"}, "missing_field"),
    ({"instruction": "x", "output": "   "}, "empty_field"),
    ({"instruction": ["x"], "output": "y"}, "wrong_type"),
])
def test_invalid_instruction_records_name_the_field(record, reason):
    with pytest.raises(RowError) as err:
        canonical_example(record, "instruction", {})
    assert err.value.reason == reason


def test_classification_labels_may_be_ints_but_not_bools():
    assert canonical_example({"text": "t", "label": 3}, "classification", {})["label"] == "3"
    with pytest.raises(RowError, match="wrong_type"):
        canonical_example({"text": "t", "label": True}, "classification", {})


def test_label_vocabulary_orders_integers_numerically_then_names():
    assert label_vocabulary({"10": 1, "2": 1, "b": 1, "a": 1}) == ["2", "10", "a", "b"]


def test_first_fit_decreasing_respects_capacity_and_keeps_every_example():
    lengths = np.array([5, 3, 8, 2, 7, 1, 4])
    bins = first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 10 for b in bins)
    assert len(bins) == int(np.ceil(lengths.sum() / 10))


def test_pack_table_masks_each_examples_first_label():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                      "labels": pa.array(ids, pa.list_(pa.int32()))})
    packed = pack_table(table, 6).to_pylist()
    assert sum(r["num_examples"] for r in packed) == 3
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)
        assert sum(lab != IGNORE_INDEX for lab in row["labels"]) == len(row["input_ids"]) - len(starts)


def test_label_vocabulary_takes_superscript_digits_as_names_and_breaks_integer_ties_by_text():
    assert label_vocabulary({"²": 1, "1": 1, "01": 1, "-3": 1}) == ["-3", "01", "1", "²"]
    assert label_vocabulary({"01": 1, "1": 1}) == label_vocabulary({"1": 1, "01": 1})


class CountingTemplate:
    """The tokenizer, counting (and bounding) the chat-template renders."""

    def __init__(self, tok, limit: int):
        self._tok, self.limit, self.renders = tok, limit, 0

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        self.renders += 1
        assert self.renders <= self.limit, "rendered the prefixes of turns that cannot reach the model"
        return self._tok.apply_chat_template(*args, **kwargs)


def test_a_chat_row_of_thousands_of_turns_renders_only_the_turns_within_max_seq_len(tok):
    turns = [{"role": r, "content": f"turn {i}"} for i in range(2500) for r in ("user", "assistant")]
    counting = CountingTemplate(tok, limit=2 * 128 + 2)  # at most 128 turns within 128 tokens
    (enc,) = ExampleEncoder(counting, "chat", 128).encode_causal([canonical_example({"messages": turns}, "chat", {})])
    assert enc.truncated and len(enc.input_ids) == 128
    assert "turn 0" in trained_text(tok, enc)


def test_a_chat_row_too_long_to_fit_is_rejected_without_rendering_when_truncation_is_off(tok):
    turns = [{"role": r, "content": "x"} for _ in range(500) for r in ("user", "assistant")]
    counting = CountingTemplate(tok, limit=0)
    (enc,) = ExampleEncoder(counting, "chat", 32, truncate=False).encode_causal(
        [canonical_example({"messages": turns}, "chat", {})])
    assert isinstance(enc, RowError) and enc.reason == "too_long"

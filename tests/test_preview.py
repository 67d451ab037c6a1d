"""`workflows.preview`: the loss-mask preview, on real tokenizers (SmolLM2's chat template, MiniLM)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.config import config_from_dict
from workflows.dag import plan
from workflows.models import load_tokenizer
from workflows.prepare.formats import ExampleEncoder, canonical_example
from workflows.prepare.packing import pack_table
from workflows.preview import BOUNDARY, preview

REPO = Path(__file__).resolve().parents[1]
END = "<|im_end|>"
ROWS = [{"instruction": "Name a colour.", "output": "Blue."},
        {"instruction": "What is 2 + 2?", "output": "It is 4."},
        {"instruction": "Say hello.", "output": "Hello!"}]
CHAT = {"messages": [{"role": "user", "content": "Hi there."},
                     {"role": "assistant", "content": "Hello, how can I help?"},
                     {"role": "user", "content": "Tell me a joke."},
                     {"role": "assistant", "content": "Why did the chicken cross the road?"}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_config(tmp_path: Path, source: Path, fmt: str, model: str = "tiny-llama", **data):
    return config_from_dict({
        "model": {"name": model, "task": "seq_cls" if fmt == "classification" else "causal_lm"},
        "data": {"source": str(source), "format": fmt, "max_seq_len": 256, **data},
        "cluster": {"work_dir": str(tmp_path / "work"), "runs_dir": str(tmp_path / "runs")},
        "registry": {"root": str(tmp_path / "registry")}})


def run_preview(config, **kwargs) -> tuple[str, list[dict]]:
    out = io.StringIO()
    items = preview(config, out=out, **kwargs)
    return out.getvalue(), items


def bracketed(text: str) -> list[str]:
    """The marked spans of the examples (the header, which explains the marks, left out)."""
    body = text.split("\n=== ", 1)[1] if "\n=== " in text else text
    return re.findall(r"\[\[(.*?)\]\]", body, flags=re.S)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def test_instruction_marks_only_the_answer_and_end_of_turn(tmp_path, tokenizer):
    config = make_config(tmp_path, write_jsonl(tmp_path / "rows.jsonl", ROWS), "instruction")
    text, items = run_preview(config, n=2, color=False)
    assert [item["row"] for item in items] == [1, 2]
    assert all(item["mode"] == "inputs" and not item["packed"] for item in items)
    assert items[0]["template"] == "chat" and "template chat" in text and "not packed yet" in text
    assert bracketed(text) == [ROWS[0]["output"] + END, ROWS[1]["output"] + END]
    encoder = ExampleEncoder(tokenizer, "instruction", 256)
    for item, row in zip(items, ROWS):
        enc = encoder.encode_causal([canonical_example(row, "instruction", {})])[0]
        assert item["num_tokens"] == len(enc.input_ids)
        assert item["num_trained"] == sum(lab != -100 for lab in enc.labels)
        segments = item["examples"][0]["segments"]
        assert "".join(s["text"] for s in segments) == tokenizer.decode(enc.input_ids, skip_special_tokens=False)
        prompt = "".join(s["text"] for s in segments if not s["trained"])
        assert "<|im_start|>user\n" + row["instruction"] in prompt and "<|im_start|>assistant\n" in prompt
        assert f"{item['num_tokens']} tokens, {item['num_trained']} trained" in text
    assert ROWS[2]["output"] not in text  # n=2


def test_chat_marks_every_assistant_turn_and_no_user_turn(tmp_path):
    bad = {"messages": [{"role": "user", "content": "no answer"}]}  # rejected: no assistant turn
    config = make_config(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [bad, CHAT]), "chat")
    text, items = run_preview(config, n=1, color=False)
    assert len(items) == 1 and items[0]["row"] == 2
    assert "skipped record 1: no_assistant_turn" in text
    assistant = [m["content"] for m in CHAT["messages"] if m["role"] == "assistant"]
    assert bracketed(text) == [a + END for a in assistant]
    for user in (m["content"] for m in CHAT["messages"] if m["role"] == "user"):
        assert user in text and not any(user in span for span in bracketed(text))


def test_color_uses_ansi_escapes_instead_of_brackets(tmp_path):
    config = make_config(tmp_path, write_jsonl(tmp_path / "rows.jsonl", ROWS), "instruction")
    text, _ = run_preview(config, n=1, color=True)
    assert f"\x1b[1;32m{ROWS[0]['output']}{END}\x1b[0m" in text and not bracketed(text)
    text, _ = run_preview(config, n=1)  # not a terminal: brackets by default
    assert "\x1b[" not in text and bracketed(text) == [ROWS[0]["output"] + END]


def fabricate_prepare_output(config, tokenizer) -> Path:
    """A committed prepare directory where `plan(config)` looks for it: one packed train shard with
    the first two examples in one row, and a second shard that is not Parquet at all."""
    encoder = ExampleEncoder(tokenizer, "instruction", 256)
    encoded = encoder.encode_causal([canonical_example(r, "instruction", {}) for r in ROWS[:2]])
    table = pa.table({"input_ids": pa.array([e.input_ids for e in encoded], pa.list_(pa.int32())),
                      "labels": pa.array([e.labels for e in encoded], pa.list_(pa.int32()))})
    packed = pack_table(table, 256)
    assert packed.num_rows == 1 and packed.column("num_examples").to_pylist() == [2]
    root = plan(config)["prepare"].dir
    (root / "train").mkdir(parents=True)
    (root / "eval").mkdir()
    pq.write_table(packed, root / "train" / "part-00000.parquet")
    (root / "train" / "part-00001.parquet").write_bytes(b"not parquet: never opened by the preview")
    manifest = {"task": "causal_lm", "format": "instruction", "packed": True, "max_seq_len": 256,
                "template": "chat", "model_name": "tiny-llama",
                "tokenizer": {"name": "tiny-llama", "pad_token_id": tokenizer.pad_token_id,
                              "eos_token_id": tokenizer.eos_token_id},
                "shards": {"train": ["train/part-00000.parquet", "train/part-00001.parquet"], "eval": []}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "_SUCCESS").write_text("{}")
    assert plan(config)["prepare"].status == "hit"
    return root


def test_prepared_output_shows_packing_boundaries_from_the_first_shard_only(tmp_path, tokenizer):
    config = make_config(tmp_path, write_jsonl(tmp_path / "rows.jsonl", ROWS), "instruction")
    root = fabricate_prepare_output(config, tokenizer)
    text, items = run_preview(config, n=2, color=False)
    assert len(items) == 1
    item = items[0]
    assert item["mode"] == "prepared" and item["packed"] and item["source"] == str(root / "train/part-00000.parquet")
    assert "1 of 2 train shards" in text and "2 packed examples" in text
    assert text.count(BOUNDARY) == 1 and len(item["examples"]) == 2 and item["hidden_examples"] == 0
    first, second = text.split(BOUNDARY)
    assert bracketed(first) == [ROWS[0]["output"] + END] and bracketed(second) == [ROWS[1]["output"] + END]
    assert item["num_tokens"] == sum(e["num_tokens"] for e in item["examples"])
    assert item["num_trained"] == sum(e["num_trained"] for e in item["examples"])
    # n=1: the row's second example is counted but not shown
    text, items = run_preview(config, n=1, color=False)
    assert len(items[0]["examples"]) == 1 and items[0]["hidden_examples"] == 1
    assert "1 more packed example(s)" in text and ROWS[1]["output"] not in text


def test_classification_shows_label_names_and_marks_nothing(tmp_path):
    source = tmp_path / "intents.csv"
    source.write_text("text,label\nmy card was declined,card_declined\nwhere is my card,card_arrival\n")
    config = make_config(tmp_path, source, "classification", model="tiny-bert")
    text, items = run_preview(config, n=2, color=False)
    assert [(i["label"], i["row"], i["num_trained"]) for i in items] == [("card_declined", 2, None),
                                                                         ("card_arrival", 3, None)]
    assert "label 'card_declined'" in text and "label 'card_arrival'" in text
    assert "[[" not in text and "]]" not in text and "[CLS] my card was declined [SEP]" in text
    assert items[0]["num_tokens"] == len(load_tokenizer("tiny-bert")("my card was declined")["input_ids"])


def test_preview_never_imports_ray(tmp_path, tokenizer):
    """Both paths (prepared output, raw inputs) in a fresh interpreter: Ray is not even imported."""
    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    raws = [{"model": {"name": "tiny-llama"}, "data": {"source": str(source), "format": "instruction",
                                                       "max_seq_len": 256},
             "cluster": {"work_dir": str(tmp_path / work), "runs_dir": str(tmp_path / "runs")},
             "registry": {"root": str(tmp_path / "registry")}} for work in ("prepared", "raw")]
    fabricate_prepare_output(config_from_dict(raws[0]), tokenizer)
    code = ("import io, sys\nfrom workflows.config import config_from_dict\nfrom workflows.preview import preview\n"
            f"modes = [preview(config_from_dict(raw), n=2, out=io.StringIO())[0]['mode'] for raw in {raws!r}]\n"
            "assert modes == ['prepared', 'inputs'], modes\n"
            "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=os.environ.copy(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

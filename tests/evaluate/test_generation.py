"""Greedy generation, answer matching, and `generate` / `predict` as a library and through the CLI."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_evaluate_stage import make_adapter

from lora_core import load_adapter
from workflows.evaluate.generation import (
    chat_prompt_ids,
    exact_match,
    generate,
    greedy_generate,
    normalized_match,
    predict,
)
from workflows.models import load_base
from workflows.registry.references import resolve_adapter
from workflows.registry.sqlite import Registry

REPO = Path(__file__).resolve().parents[2]


# -- answer matching ----------------------------------------------------------------------------

def _gsm8k_answers(example_data: Path, n: int = 50) -> list[str]:
    lines = gzip.open(example_data / "gsm8k" / "test.jsonl.gz", "rt").read().splitlines()[:n]
    return [json.loads(line)["answer"] for line in lines]


def test_gsm8k_references_match_themselves_and_not_a_different_final_number(example_data):
    for answer in _gsm8k_answers(example_data):
        final = answer.rsplit("####", 1)[1].strip()
        assert normalized_match(answer, answer, "gsm8k")
        assert normalized_match(f"So the answer is {final}.", answer, "gsm8k")
        wrong = str(int(final.replace(",", "")) + 1)
        assert not normalized_match(f"#### {wrong}", answer, "gsm8k")


@pytest.mark.parametrize("prediction", ["#### 1,234", "The total is $1234.", "1234.0", "we get 5 then 1234"])
def test_gsm8k_normalisation_ignores_commas_dollars_and_trailing_zero(prediction):
    assert normalized_match(prediction, "12 * 100 = 1200, plus 34\n#### 1234", "gsm8k")


def test_json_match_compares_values_not_text():
    ref = '{"name": "Ann", "age": 31}'
    assert normalized_match('{"age":31,"name":"Ann"}', ref, "json")
    assert normalized_match('Here you go: {"age": 31, "name": "Ann"} hope it helps', ref, "json")
    assert not normalized_match('{"age": 32, "name": "Ann"}', ref, "json")
    assert not normalized_match("no json here", ref, "json")


def test_exact_match_is_strict_but_normalised_exact_collapses_whitespace():
    assert exact_match("  Paris\n", "Paris")
    assert not exact_match("the  capital", "the capital")
    assert normalized_match("the  capital\n", "the capital", "exact")


# -- greedy generation on a tiny model ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama():
    return load_base("tiny-llama")


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_llama):
    model, tok = tiny_llama
    prompts = [tok(t)["input_ids"] for t in ("Hi", "Natalia sold clips to 48 of her friends in April.", "2+2=")]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(0 < len(out) <= 6 for out in batched)


def test_generation_stops_at_eos(tiny_llama):
    model, tok = tiny_llama
    prompt = tok("Weng earns $12 an hour")["input_ids"]
    free = greedy_generate(model, tok, [prompt], max_new_tokens=5)[0]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [free[2]]  # make the third generated token an EOS
    try:
        stopped = greedy_generate(model, tok, [prompt], max_new_tokens=5)[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert stopped == free[: free.index(free[2])]


def test_generate_streams_exactly_the_text_it_returns(tmp_path):
    adapter = make_adapter("tiny-llama", tmp_path / "a", seed=5, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    pieces: list[str] = []
    streamed = generate("tiny-llama", adapter, ["Tell me a story"], max_new_tokens=8, on_token=pieces.append)
    plain = generate("tiny-llama", adapter, ["Tell me a story"], max_new_tokens=8)
    assert streamed == plain and "".join(pieces) == plain[0] and len(pieces) > 1


def test_generate_takes_a_registry_reference_and_the_base_named_by_the_adapter(tmp_path, tiny_llama):
    adapter = make_adapter("tiny-llama", tmp_path / "a", seed=6, r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    registry = Registry(tmp_path / "registry")
    registry.promote("demo", registry.register(adapter, "demo"), "champion", reason="test")
    resolved = resolve_adapter("demo@champion", tmp_path / "registry")
    assert resolved.ref == "demo:1"
    got = generate(None, resolved.location, ["What is 2+2?"], max_new_tokens=5, dtype="float32")

    model, tok = load_base("tiny-llama")
    load_adapter(model, adapter)
    ids = greedy_generate(model, tok, [chat_prompt_ids(tok, "What is 2+2?")], max_new_tokens=5)[0]
    assert got == [tok.decode(ids, skip_special_tokens=True)]
    base_only = generate("tiny-llama", None, ["What is 2+2?"], max_new_tokens=5, dtype="float32")
    assert base_only != got  # the adapter changes what the model says


# -- predict on a tiny BERT ---------------------------------------------------------------------

LABELS = ["card_arrival", "card_linking", "exchange_rate"]


def _cls_adapter(path: Path, seed: int = 7) -> Path:
    out = make_adapter("tiny-bert", path, seed=seed, task="seq_cls", num_labels=len(LABELS), r=8, alpha=16,
                       target_modules=["query", "value"], task_type="SEQ_CLS")
    meta = json.loads((out / "loraflow.json").read_text())
    (out / "loraflow.json").write_text(json.dumps({**meta, "label_names": LABELS}))  # what the train stage stores
    return out


def test_predict_uses_the_label_names_stored_with_the_adapter(tmp_path):
    adapter = _cls_adapter(tmp_path / "cls")
    texts = ["Where is my new card?", "How do I link my card?", "What rate do you use for euros?"]
    results = predict("tiny-bert", adapter, texts, dtype="float32")  # the adapter records no dtype: auto
    model, tok = load_base("tiny-bert", task="seq_cls", num_labels=len(LABELS))
    load_adapter(model, adapter)
    for text, r in zip(texts, results):
        with torch.inference_mode():
            probs = model(**tok(text, return_tensors="pt")).logits[0].softmax(-1)
        assert (r["text"], r["label"], r["label_id"]) == (text, LABELS[int(probs.argmax())], int(probs.argmax()))
        assert r["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_predict_without_label_names_says_where_they_were_looked_for(tmp_path):
    adapter = make_adapter("tiny-bert", tmp_path / "cls", seed=8, task="seq_cls", num_labels=3, r=8, alpha=16,
                           target_modules=["query", "value"], task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"loraflow.json has no label_names"):
        predict("tiny-bert", adapter, ["hello"])


# -- the CLI on the real models -----------------------------------------------------------------

def _cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOAD REPORT" not in proc.stderr and "Loading weights" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_cli_generate_streams_the_smollm2_adapters_answer(tmp_path):
    adapter = make_adapter("smollm2-135m", tmp_path / "smol", seed=9, r=8, alpha=16,
                           target_modules=["q_proj", "v_proj"])
    registry = Registry(tmp_path / "registry")
    registry.promote("smol", registry.register(adapter, "smol"), "champion", reason="test")
    prompt = "Natalia sold 48 clips in April and half as many in May. How many in total?"
    out = _cli("generate", "--model", "smollm2-135m", "--adapter", "smol@champion", "--root", str(registry.root),
               "--max-new-tokens", "12", prompt)
    assert out.strip() == generate("smollm2-135m", adapter, [prompt], max_new_tokens=12)[0].strip()


@pytest.mark.slow
def test_cli_predict_labels_texts_with_a_minilm_adapter(tmp_path):
    adapter = make_adapter("minilm-l6", tmp_path / "mini", seed=10, task="seq_cls", num_labels=len(LABELS), r=8,
                           alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    meta = json.loads((adapter / "loraflow.json").read_text())
    (adapter / "loraflow.json").write_text(json.dumps({**meta, "label_names": LABELS}))
    texts = ["my card has not arrived", "what is the exchange rate"]
    out = json.loads(_cli("predict", "--model", "minilm-l6", "--adapter", str(adapter), "--json", *texts))
    expected = predict("minilm-l6", adapter, texts)
    assert [r["label"] for r in out] == [r["label"] for r in expected]
    assert [r["score"] for r in out] == pytest.approx([r["score"] for r in expected], abs=1e-5)


# -- the dtype generate / predict load the base in (issue 20: never an fp32 copy of a large base by default) --

def test_the_base_loads_in_the_dtype_the_adapter_was_trained_with_else_auto_and_dtype_wins():
    from workflows.evaluate.generation import load_dtype

    trained_bf16 = {"config": {"model": {"name": "x", "dtype": "bfloat16"}}}
    assert load_dtype(trained_bf16) == "bfloat16"
    assert load_dtype({"config": {"model": {"name": "x"}}}) == "auto"  # recorded nothing
    assert load_dtype({}) == "auto"  # no adapter
    assert load_dtype(trained_bf16, "float16") == "float16"  # --dtype


def test_predict_loads_the_base_in_the_requested_dtype(tmp_path, monkeypatch):
    import workflows.evaluate.generation as generation

    seen = []
    real = generation.load_base
    monkeypatch.setattr(generation, "load_base", lambda *a, **k: seen.append(k["dtype"]) or real(*a, **k))
    adapter = _cls_adapter(tmp_path / "cls")
    results = predict("tiny-bert", adapter, ["my card has not arrived"], dtype="bfloat16")
    assert seen == ["bfloat16"] and len(results) == 1

"""The evaluate stage on a real Ray cluster, real tiny models and real adapters, checked against a
single-process reference computed here, one example at a time, with freshly loaded models."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from lora_core import LoraConfig, adapter_parameters, apply_lora, load_adapter, save_adapter
from workflows.adapters import AdapterFiles, PoolingMismatchError
from workflows.config import config_from_dict
from workflows.evaluate.generation import normalized_match
from workflows.evaluate.scorer import ScorerSpec
from workflows.evaluate.stage import BUCKET_BATCHES, RowCountError, call_rows, run_evaluate, split_by_model
from workflows.models import load_base, load_tokenizer
from workflows.prepared import PreparedData, PreparedDataError
from workflows.registry.references import champion_for
from workflows.registry.sqlite import Registry

SHARD_SIZES = (9, 7, 7)  # 23 rows: not a multiple of the batch size (4) nor of the actor count (2)
GEN_PROMPTS, GEN_TOKENS = 3, 4


def make_adapter(model_name: str, path: Path, seed: int, task: str = "causal_lm", num_labels: int | None = None,
                 **lora) -> Path:
    """A saved lora_core adapter with random (non-zero) A and B, so every model scores differently."""
    model, _ = load_base(model_name, task=task, num_labels=num_labels)
    apply_lora(model, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_adapter(model, path, base_identity={"name": model_name})


def _example_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_prepared(root: Path, rows: list[dict], schema: pa.Schema, manifest: dict) -> PreparedData:
    """A prepare-stage directory in the docs/artifacts.md layout, written by hand."""
    (root / "eval").mkdir(parents=True)
    shards, start = [], 0
    for i, size in enumerate(SHARD_SIZES):
        rel = f"eval/part-{i:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[start:start + size], schema=schema), root / rel)
        shards.append(rel)
        start += size
    manifest = {**manifest, "shards": {"train": [], "eval": shards}, "packed": False}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "_SUCCESS").write_text("{}")
    return PreparedData.load(root)


def causal_prepared(root: Path, gsm8k: Path) -> PreparedData:
    tok = load_tokenizer("tiny-llama")
    rows = []
    for line in gzip.open(gsm8k, "rt").read().splitlines()[: sum(SHARD_SIZES)]:
        ex = json.loads(line)
        prompt = tok(ex["question"], add_special_tokens=False)["input_ids"][:24]
        answer = tok(" " + ex["answer"], add_special_tokens=False)["input_ids"][:12] + [tok.eos_token_id]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer,
                     "position_ids": list(range(len(prompt) + len(answer))), "num_examples": 1,
                     "example_id": _example_id(ex["question"]), "prompt_len": len(prompt), "reference": ex["answer"]})
    ints = pa.list_(pa.int32())
    schema = pa.schema([("input_ids", ints), ("labels", ints), ("position_ids", ints), ("num_examples", pa.int32()),
                        ("example_id", pa.string()), ("prompt_len", pa.int32()), ("reference", pa.string())])
    manifest = {"task": "causal_lm", "format": "instruction", "max_seq_len": 64, "model_name": "tiny-llama",
                "tokenizer": {"name": "tiny-llama", "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}}
    return _write_prepared(root, rows, schema, manifest)


@pytest.fixture(scope="module")
def causal_run(ray_session, tmp_path_factory, example_data):
    """One evaluation with 2 actors scoring base, new and a champion of another rank and targets."""
    tmp = tmp_path_factory.mktemp("eval_causal")
    prepared = causal_prepared(tmp / "prepared", example_data / "gsm8k" / "test.jsonl.gz")
    new = make_adapter("tiny-llama", tmp / "new", seed=1, r=8, alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    old = make_adapter("tiny-llama", tmp / "old", seed=2, r=4, alpha=4, target_modules=["k_proj", "o_proj"])
    registry = Registry(tmp / "registry")
    registry.promote("demo", registry.register(old, "demo"), "champion", reason="test setup")
    config = config_from_dict({
        "model": {"name": "tiny-llama"}, "data": {"source": "unused.jsonl", "format": "instruction"},
        "eval": {"actors": 2, "batch_size": 4, "bootstrap_samples": 200,
                 "generation": {"num_prompts": GEN_PROMPTS, "max_new_tokens": GEN_TOKENS, "batch_size": 2,
                                "match": "gsm8k"}},
        "registry": {"root": str(tmp / "registry"), "name": "demo"}})
    champion = champion_for(config, train_fingerprint=None)
    assert champion is not None and champion.ref == "demo:1"
    result = run_evaluate(config, prepared, AdapterFiles.read(new), tmp / "evaluate", champion=champion.files())
    table = pq.read_table(result.per_example).to_pylist()
    return {"result": result, "rows": table, "prepared": prepared, "adapters": {"new": new, "champion": old}}


def _input_rows(prepared: PreparedData) -> list[dict]:
    return pq.read_table(prepared.eval_files).to_pylist()


def _fresh_model(name: str, adapter: Path | None, **kw):
    model, tok = load_base(name, **kw)
    if adapter is not None:
        load_adapter(model, adapter)
    return model, tok


@torch.inference_mode()
def _reference_causal(model, row: dict) -> tuple[float, int, int]:
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
    logits = model(input_ids=ids).logits[0, :-1]
    target = labels[1:]
    mask = target != -100
    nll = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    return float(nll), int(mask.sum()), int(((logits.argmax(-1) == target) & mask).sum())


@torch.inference_mode()
def _reference_greedy(model, tok, prompt: list[int], steps: int) -> str:
    ids = list(prompt)
    for _ in range(steps):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
    return tok.decode(ids[len(prompt):], skip_special_tokens=True)


def test_two_actors_agree_with_a_single_process_reference(causal_run):
    inputs = _input_rows(causal_run["prepared"])
    scored = {(r["model"], r["example_id"]): r for r in causal_run["rows"]}
    metrics = causal_run["result"].metrics["models"]
    for key, adapter in (("base", None), *causal_run["adapters"].items()):
        model, _ = _fresh_model("tiny-llama", adapter)
        ref = [_reference_causal(model, row) for row in inputs]
        for row, (loss_sum, tokens, correct) in zip(inputs, ref):
            got = scored[(key, row["example_id"])]
            assert (got["tokens"], got["correct_tokens"]) == (tokens, correct)
            assert got["loss_sum"] / tokens == pytest.approx(loss_sum / tokens, abs=1e-5)
        total_tokens = sum(t for _, t, _ in ref)
        assert metrics[key]["loss"] == pytest.approx(sum(s for s, _, _ in ref) / total_tokens, abs=1e-5)
        assert metrics[key]["token_accuracy"] == pytest.approx(sum(c for _, _, c in ref) / total_tokens, abs=1e-12)
    assert len({m["loss"] for m in metrics.values()}) == 3  # three genuinely different models


def test_greedy_generations_match_a_token_by_token_reference(causal_run):
    inputs = _input_rows(causal_run["prepared"])[:GEN_PROMPTS]  # the first rows of the eval split
    generated = {(r["model"], r["example_id"]): r for r in causal_run["rows"] if r["generated"]}
    assert len(generated) == 3 * GEN_PROMPTS  # the first N eval rows, for every model
    model, tok = _fresh_model("tiny-llama", causal_run["adapters"]["new"])
    for row in inputs:
        text = _reference_greedy(model, tok, row["input_ids"][: row["prompt_len"]], GEN_TOKENS)
        got = generated[("new", row["example_id"])]
        assert got["prediction"] == text
        assert got["normalized_match"] == normalized_match(text, row["reference"], "gsm8k")


def test_no_row_is_lost_or_doubled(causal_run):
    ids = sorted(r["example_id"] for r in _input_rows(causal_run["prepared"]))
    assert len(ids) == sum(SHARD_SIZES)
    for model in ("base", "new", "champion"):
        assert sorted(r["example_id"] for r in causal_run["rows"] if r["model"] == model) == ids
    assert causal_run["result"].rows == len(ids)


def test_each_example_is_scored_by_every_model_in_one_pass_with_one_base_load_per_actor(causal_run):
    by_example: dict[str, set] = {}
    for r in causal_run["rows"]:
        by_example.setdefault(r["example_id"], set()).add(r["actor"])
        assert r["base_loads"] == 1
    assert all(len(actors) == 1 for actors in by_example.values())  # base/new/champion: same actor, same batch
    actors = causal_run["result"].metrics["actors"]
    assert len(actors) == 2 and all(a["base_loads"] == 1 for a in actors.values())  # both actors did work
    assert sum(a["rows"] for a in actors.values()) == sum(SHARD_SIZES)


def test_metrics_json_reports_each_model_and_the_differences(causal_run):
    result = causal_run["result"]
    on_disk = json.loads((result.out_dir / "metrics.json").read_text())
    assert on_disk["champion_ref"] == "demo:1" and set(on_disk["models"]) == {"base", "new", "champion"}
    models, loss = on_disk["models"], on_disk["diff"]["loss"]
    assert loss["new_minus_champion"] == pytest.approx(models["new"]["loss"] - models["champion"]["loss"])
    assert loss["new_minus_base"] == pytest.approx(models["new"]["loss"] - models["base"]["loss"])
    for lo_hi, value in ((loss["ci95"], loss["new_minus_champion"]), (loss["ci95_vs_base"], loss["new_minus_base"])):
        assert lo_hi[0] < value < lo_hi[1]
    assert models["new"]["perplexity"] == pytest.approx(torch.tensor(models["new"]["loss"]).exp().item())
    assert models["new"]["generated"] == GEN_PROMPTS and "exact_match" in models["new"]
    assert (result.out_dir / "_SUCCESS").is_file()
    assert [p.name for p in result.per_example] == [f"part-{i:05d}.parquet" for i in range(len(result.per_example))]


# -- classification: one actor, one adapter, merged fast path -------------------------------------

def classification_prepared(root: Path, banking: Path) -> tuple[PreparedData, list[str]]:
    tok = load_tokenizer("tiny-bert")
    names = json.loads((banking / "categories.json").read_text())
    with gzip.open(banking / "test.csv.gz", "rt", newline="") as f:
        raw = [r for _, r in zip(range(sum(SHARD_SIZES)), csv.DictReader(f))]
    rows = [{"input_ids": tok(r["text"], truncation=True, max_length=32)["input_ids"],
             "label": names.index(r["category"]), "example_id": _example_id(r["text"]), "text": r["text"]}
            for r in raw]
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.int64()), ("example_id", pa.string()),
                        ("text", pa.string())])
    manifest = {"task": "seq_cls", "format": "classification", "max_seq_len": 32, "label_names": names,
                "model_name": "tiny-bert", "tokenizer": {"name": "tiny-bert", "pad_token_id": tok.pad_token_id}}
    return _write_prepared(root, rows, schema, manifest), names


@pytest.mark.parametrize("pooling", ["default", "mean"])
def test_classification_with_a_merged_adapter_agrees_with_the_reference(ray_session, tmp_path, example_data, pooling):
    """The reference scores one unpadded row at a time: with mean pooling, the padded eval batches
    must give the same numbers (the scorer feeds the head as training did)."""
    prepared, names = classification_prepared(tmp_path / "prepared", example_data / "banking77")
    adapter = make_adapter("tiny-bert", tmp_path / "cls", seed=3, task="seq_cls", num_labels=len(names),
                           r=8, alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    config = config_from_dict({"model": {"name": "tiny-bert", "task": "seq_cls", "pooling": pooling},
                               "data": {"source": "unused.csv", "format": "classification"},
                               "eval": {"actors": 1, "batch_size": 4, "compare_base": False, "bootstrap_samples": 0,
                                        "gpus_per_actor": 0.5}})
    metrics = run_evaluate(config, prepared, AdapterFiles.read(adapter), tmp_path / "evaluate").metrics
    assert metrics["merged"] and set(metrics["models"]) == {"new"}
    assert [a["gpus"] for a in metrics["actors"].values()] == [0.5]  # what Ray assigned the actor
    assert metrics["padding_fraction"] < 0.2  # rows sorted by length before they are batched

    model, _ = _fresh_model("tiny-bert", adapter, task="seq_cls", num_labels=len(names), pooling=pooling)
    labels, preds, losses = [], [], []
    with torch.inference_mode():
        for row in _input_rows(prepared):
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            labels.append(row["label"])
            preds.append(int(logits.argmax()))
            losses.append(float(F.cross_entropy(logits[None], torch.tensor([row["label"]]))))
    classes = set(labels) | set(preds)
    f1 = [2 * sum(p == t == c for p, t in zip(preds, labels)) / (labels.count(c) + preds.count(c)) for c in classes]
    new = metrics["models"]["new"]
    assert new["accuracy"] == pytest.approx(sum(p == t for p, t in zip(preds, labels)) / len(labels), abs=1e-12)
    assert new["macro_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-12)
    assert new["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert sum(c["support"] for c in new["per_class"].values()) == len(labels)
    assert set(new["per_class"]) == {names[c] for c in classes}


# -- row accounting -----------------------------------------------------------------------------

def _scored_table(pairs: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"example_id": [e for e, _ in pairs], "model": [m for _, m in pairs],
                     "loss_sum": [1.0] * len(pairs)})


def test_a_lost_row_fails_naming_the_example():
    table = _scored_table([("a", "new"), ("b", "new"), ("a", "base")])
    with pytest.raises(RowCountError, match=r"model 'base': 1 rows scored for 2 eval rows \(1 lost, 0 doubled; lost e.g. 'b'\)"):
        split_by_model(table, ["a", "b"], ["base", "new"])


def test_a_doubled_row_fails_naming_the_example():
    table = _scored_table([("a", "new"), ("b", "new"), ("b", "new")])
    with pytest.raises(RowCountError, match=r"1 doubled; doubled e.g. 'b'"):
        split_by_model(table, ["a", "b"], ["new"])


def test_a_call_with_generation_holds_one_generation_batch_so_ray_data_sees_progress():
    """Ray Data stops a dataset that moves no block for 30 minutes: configs/gsm8k.yaml's 50 prompts of
    256 new tokens in one 80-row call did exactly that on a busy 2-core machine."""
    spec = ScorerSpec(model_name="tiny-llama", task="causal_lm", manifest={}, adapters={}, batch_size=10)
    assert call_rows(spec, actors=1, rows=200) == 10 * BUCKET_BATCHES  # loss only: wide windows
    generating = ScorerSpec(model_name="tiny-llama", task="causal_lm", manifest={}, adapters={}, batch_size=10,
                            generate_ids=frozenset({"a", "b"}), generation_batch_size=10)
    assert call_rows(generating, actors=1, rows=200) == 10
    assert call_rows(generating, actors=4, rows=20) == 10  # never below one forward batch


def test_an_adapter_trained_with_another_pooling_is_refused_before_it_is_scored(tmp_path):
    adapter = make_adapter("tiny-bert", tmp_path / "cls", seed=4, task="seq_cls", num_labels=3, r=4, alpha=8,
                           target_modules=["query"], task_type="SEQ_CLS")
    meta = json.loads((adapter / "loraflow.json").read_text())
    (adapter / "loraflow.json").write_text(json.dumps({**meta, "config": {"model": {"pooling": "mean"}}}))
    files = AdapterFiles.read(adapter, ref="intents:1")
    files.check_pooling("mean", "champion")
    with pytest.raises(PoolingMismatchError, match=r"the champion intents:1 was trained with 'mean', this config uses "
                                                   r"'default'") as e:
        files.check_pooling("default", "champion")
    assert e.value.exit_code == 2


def test_an_eval_split_without_rows_is_a_clear_error_naming_the_prepared_folder(tmp_path):
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("label", pa.int64()), ("example_id", pa.string())])
    manifest = {"task": "seq_cls", "format": "classification", "max_seq_len": 32, "label_names": ["a", "b"],
                "model_name": "tiny-bert", "tokenizer": {"name": "tiny-bert"}}
    prepared = _write_prepared(tmp_path / "prepared", [], schema, manifest)
    adapter = make_adapter("tiny-bert", tmp_path / "cls", seed=5, task="seq_cls", num_labels=2, r=4, alpha=8,
                           target_modules=["query"], task_type="SEQ_CLS")
    config = config_from_dict({"model": {"name": "tiny-bert", "task": "seq_cls"},
                               "data": {"source": "unused.csv", "format": "classification"}})
    with pytest.raises(PreparedDataError, match="the eval split has no rows") as e:
        run_evaluate(config, prepared, AdapterFiles.read(adapter), tmp_path / "evaluate")
    assert str(tmp_path / "prepared") in str(e.value) and not (tmp_path / "evaluate").exists()

"""Token classification end to end: the shipped configs/sgd_slots.yaml (MiniLM, SGD slot spans) on a
slice: prepare -> train (2 DDP workers) -> evaluate -> register, then `predict`. One module-scoped run
feeds every test here (and is the shipped config's CI smoke).

`max_seq_len` is 32, so some rows are longer: training truncates them (counted) and evaluation scores
every word of them in windows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lora_core import load_adapter
from workflows.config import load_config
from workflows.evaluate.generation import predict
from workflows.models import load_base
from workflows.pipeline import run_pipeline
from workflows.token_tags import entities, first_subtokens, split_words

pytestmark = pytest.mark.train_group

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["restaurants | Could you book a table at Nopa in San Francisco for 2 people at 7 pm?",
         "hotels | I want to check in on March 3rd and stay at the Hilton in Seattle."]


# configs/sgd_slots.yaml as shipped, cut to a slice: what changes is how much runs (rows, steps, the
# warmup inside them, bootstrap resamples) and `max_seq_len` 32, so that some rows are longer.
SLICE = ["data.max_rows=900", "data.max_eval_rows=300", "data.max_seq_len=32", "train.max_steps=60",
         "train.warmup_steps=6", "train.log_every=20", "eval.bootstrap_samples=200"]


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("token_cls")
    config = load_config(REPO / "configs" / "sgd_slots.yaml", SLICE + [
        f"registry.root={root / 'registry'}", f"cluster.work_dir={root / 'work'}", f"cluster.runs_dir={root / 'runs'}"])
    manifest = run_pipeline(config)
    stages = {s: manifest["stages"][s]["outputs"] for s in ("prepare", "train", "evaluate", "register")}
    metrics = stages["evaluate"]["metrics"]
    return {"config": config, "stages": stages, "metrics": metrics, "root": root}


def test_lora_learns_slot_spans_far_above_the_untrained_head(run):
    models, diff = run["metrics"]["models"], run["metrics"]["diff"]
    assert models["base"]["entity_f1"] < 0.05  # an untrained head: about no entity right
    assert models["new"]["entity_f1"] > 0.2  # 60 steps on 900 rows; the full config reaches 0.8 (bench/ner.py)
    assert diff["entity_f1"]["ci95_vs_base"][0] > 0.1
    assert models["new"]["per_type"] and all(0.0 <= t["f1"] <= 1.0 for t in models["new"]["per_type"].values())
    assert run["stages"]["register"]["decision"]["promote"] is True  # the gate read entity_f1


def test_every_word_of_every_eval_row_is_scored_even_past_max_seq_len(run):
    prepared = Path(run["stages"]["prepare"]["dir"])
    manifest = json.loads((prepared / "manifest.json").read_text())
    rows = pq.read_table([prepared / s for s in manifest["shards"]["eval"]]).to_pylist()
    assert max(len(r["input_ids"]) for r in rows) > 32  # whole rows, longer than max_seq_len
    assert run["metrics"]["models"]["new"]["words"] == sum(len(r["word_labels"]) for r in rows)
    assert manifest["counts"]["truncated"] > 0  # training rows were cut, and counted
    train = pq.read_table([prepared / s for s in manifest["shards"]["train"]]).column("input_ids").to_pylist()
    assert max(len(x) for x in train) == 32


def test_adapter_saves_the_token_classifier_like_peft_and_ddp_reduces_only_adapter_and_head(run):
    adapter = Path(run["stages"]["train"]["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and "classifier" in config["modules_to_save"]
    m = run["stages"]["train"]["metrics"]
    names = json.loads((adapter / "loraflow.json").read_text())["label_names"]
    head_bytes = (384 * len(names) + len(names)) * 4  # the classifier's fp32 weight and bias
    assert m["allreduce_bytes_per_step_distinct"] == [m["adapter_param_bytes"]]
    # r=16 on query, key, value and the three dense layers of 6 layers of 384 (intermediate 1536), fp32
    lora_bytes = 6 * 16 * (4 * (384 + 384) + 2 * (384 + 1536)) * 4
    assert m["adapter_param_bytes"] == lora_bytes + head_bytes


def _argmax_entities(model, tokenizer, text: str, names: list[str]) -> list[tuple[str, int, int]]:
    words = split_words(text)
    enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"]).logits[0].numpy()
    word_ids = []
    for lo, hi in enc["offset_mapping"][0].tolist():
        word_ids.append(next((i for i, (s, e) in enumerate(words) if s <= lo < e), -1) if hi > lo else -1)
    tags = ["O"] * len(words)
    for t in first_subtokens(word_ids):
        tags[word_ids[t]] = names[int(np.argmax(logits[t]))]
    return [(kind, words[a][0], words[b - 1][1]) for a, b, kind in entities(tags)]


def test_predict_prints_the_entities_of_the_in_process_argmax(run):
    adapter = Path(run["stages"]["train"]["adapter"])
    names = json.loads((adapter / "loraflow.json").read_text())["label_names"]
    model, tokenizer = load_base("minilm-l6", task="token_cls", num_labels=len(names))
    load_adapter(model, adapter)
    expected = [_argmax_entities(model.eval(), tokenizer, t, names) for t in TEXTS]
    got = predict(None, adapter, TEXTS, device="cpu")
    assert [[(e["label"], e["start"], e["end"]) for e in r["entities"]] for r in got] == expected
    assert any(expected)  # the adapter finds something in these texts
    for r in got:
        assert all(r["text"][e["start"]:e["end"]] == e["text"] and 0 < e["score"] <= 1 for e in r["entities"])
    cli = subprocess.run([sys.executable, "-m", "workflows.cli", "predict", "--adapter", str(adapter), "--json",
                          *TEXTS], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout) == json.loads(json.dumps(got))

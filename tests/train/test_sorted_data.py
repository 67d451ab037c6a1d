"""Real data sets often arrive sorted (by class, source, date): that must never cost the training.

Six Banking77 intents, 48 training rows each, in a file sorted by intent, one epoch of MiniLM +
LoRA. Read in file order, every batch holds one intent and the model forgets each one at the next:
measured 0.32 accuracy on the 240 test rows (chance 0.17). Shuffled by the prepare stage and
reshuffled per epoch by the trainer: 0.70.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import lora_core
from workflows.config import config_from_dict
from workflows.models import load_base
from workflows.prepare.stage import run_prepare
from workflows.registry.sqlite import Registry
from workflows.train.stage import run_train

pytestmark = pytest.mark.train_group

INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "cash_withdrawal_charge",
           "passcode_forgotten"]


def sorted_slice(src: Path, dst: Path, per_intent: int) -> None:
    with gzip.open(src, "rt", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in INTENTS]
    with open(dst, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "category"])
        writer.writeheader()
        for intent in INTENTS:  # sorted by intent, as Banking77's own train.csv is
            writer.writerows([{"text": r["text"], "category": intent} for r in rows if r["category"] == intent][:per_intent])


@pytest.fixture(scope="module")
def trained(ray_session, example_data, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sorted")
    sorted_slice(example_data / "banking77" / "train.csv.gz", tmp_path / "train.csv", 48)
    sorted_slice(example_data / "banking77" / "test.csv.gz", tmp_path / "test.csv", 40)
    config = config_from_dict({
        "model": {"name": "minilm-l6", "task": "seq_cls"},
        "data": {"source": str(tmp_path / "train.csv"), "eval_source": str(tmp_path / "test.csv"),
                 "format": "classification", "fields": {"label": "category"}, "max_seq_len": 64},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        # The accuracy below is measured here on all 240 test rows; the trainer's own eval loss (at
        # the start and the end, unused here) reads one batch per worker.
        "train": {"num_workers": 2, "batch_size": 8, "epochs": 1, "lr": 5e-3, "warmup_steps": 0,
                  "checkpoint_every": None, "eval_every": None, "eval_batches": 1, "max_failures": 0}})
    prepared = run_prepare(config, str(tmp_path / "prepared"))
    result = run_train(config, prepared, tmp_path / "train", storage_path=tmp_path / "ray_train", run_name="sorted-a0")
    return {"prepared": prepared, "result": result, "tmp": tmp_path}


@pytest.mark.slow
def test_a_class_sorted_file_trains_as_well_as_a_shuffled_one(trained):
    prepared, result = trained["prepared"], trained["result"]
    labels = [lab for f in prepared.train_files for lab in pq.read_table(f, columns=["label"]).column("label").to_pylist()]
    runs = [len(list(g)) for _, g in itertools.groupby(labels)]
    assert max(runs) < 10, runs  # written in a seeded random order, not in the file's

    model, _ = load_base("minilm-l6", task="seq_cls", num_labels=len(INTENTS))
    lora_core.load_adapter(model, result.adapter_dir)
    rows = [r for f in prepared.eval_files for r in pq.read_table(f).to_pylist()]
    by_length: dict[int, list[dict]] = {}
    for r in rows:  # rows of one length form one batch: no padding, the logits of each row alone
        by_length.setdefault(len(r["input_ids"]), []).append(r)
    with torch.inference_mode():
        correct = sum(int((model(input_ids=torch.tensor([r["input_ids"] for r in batch])).logits.argmax(-1)
                           == torch.tensor([r["label"] for r in batch])).sum()) for batch in by_length.values())
    assert len(rows) == 240 and correct / len(rows) >= 0.5, correct / len(rows)
    assert result.metrics["padding_fraction"] < 0.2  # train batches grouped by length


@pytest.mark.slow
def test_predict_names_the_intent_with_the_labels_the_train_stage_stored(trained):
    """`loraflow predict` on the registered adapter the pipeline's own train stage wrote."""
    adapter = trained["result"].adapter_dir
    assert json.loads((adapter / "loraflow.json").read_text())["label_names"] == sorted(INTENTS)
    registry = Registry(trained["tmp"] / "registry")
    registry.promote("intents", registry.register(adapter, "intents"), "champion", reason="test")
    text = "my card has still not arrived"
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "predict", "--model", "minilm-l6", "--adapter",
                           "intents@champion", "--root", str(registry.root), "--json", text],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out,) = json.loads(proc.stdout)
    # The name and probability of the class the adapter scores highest, computed here without the CLI.
    model, tokenizer = load_base("minilm-l6", task="seq_cls", num_labels=len(INTENTS))
    lora_core.load_adapter(model, adapter)
    with torch.inference_mode():
        probs = model(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
    assert out["label"] == sorted(INTENTS)[int(probs.argmax())], (out, probs)
    assert out["score"] == pytest.approx(float(probs.max()), abs=1e-4)

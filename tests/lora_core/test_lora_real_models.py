"""LoRA on the real offline models: SmolLM2-135M on GSM8K text, MiniLM classifying Banking77.

Each behaviour is checked on one short training run shared by the tests of its module fixture.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import random
from collections import Counter

import pytest
import torch

from lora_core import LoraConfig, adapter_parameters, apply_lora, disable_adapter
from lora_core.inject import lora_layers
from workflows.models import load_base

pytestmark = pytest.mark.slow


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def smollm2_run(example_data):
    """Three AdamW steps of LoRA (r=8, all seven projections, dropout 0.05) on four GSM8K rows."""
    torch.manual_seed(0)
    model, tokenizer = load_base("smollm2-135m")
    with gzip.open(example_data / "gsm8k" / "train.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(4), f)]
    batch = tokenizer([f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows], return_tensors="pt",
                      padding=True, truncation=True, max_length=64)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    base_before = {n: tensor_digest(p) for n, p in model.named_parameters() if not p.requires_grad}
    b_before = {n: layer.lora_B.weight.detach().clone() for n, layer in lora_layers(model).items()}

    def eval_loss() -> float:
        with torch.no_grad():
            return model.eval()(**batch, labels=labels).loss.item()

    loss_before = eval_loss()
    optimizer = torch.optim.AdamW(adapter_parameters(model).values(), lr=2e-3)
    model.train()
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return dict(model=model, batch=batch, labels=labels, loss_before=loss_before, loss_after=eval_loss(),
                base_before=base_before, b_before=b_before)


def test_a_few_lora_steps_lower_the_loss_on_gsm8k_text(smollm2_run):
    assert smollm2_run["loss_after"] < smollm2_run["loss_before"] - 0.2


def test_training_changes_every_lora_b(smollm2_run):
    model = smollm2_run["model"]
    unchanged = [n for n, layer in lora_layers(model).items()
                 if torch.equal(layer.lora_B.weight, smollm2_run["b_before"][n])]
    assert len(lora_layers(model)) == 30 * 7 and unchanged == []


def test_training_leaves_every_base_weight_bitwise_unchanged(smollm2_run):
    model = smollm2_run["model"]
    after = {n: tensor_digest(p) for n, p in model.named_parameters() if not p.requires_grad}
    assert after.keys() == smollm2_run["base_before"].keys() and len(after) > 200
    assert after == smollm2_run["base_before"]


def test_disabling_the_trained_adapter_restores_the_base_loss(smollm2_run):
    model, batch, labels = smollm2_run["model"].eval(), smollm2_run["batch"], smollm2_run["labels"]
    with torch.no_grad(), disable_adapter(model):
        loss = model(**batch, labels=labels).loss.item()
    assert loss == pytest.approx(smollm2_run["loss_before"], abs=1e-5)


def _banking77_slice(path, classes: list[str], per_class: int | None) -> list[tuple[str, int]]:
    with gzip.open(path, "rt", newline="") as f:
        rows = [(r["text"], classes.index(r["category"])) for r in csv.DictReader(f) if r["category"] in classes]
    random.Random(0).shuffle(rows)
    picked, counts = [], Counter()
    for text, label in rows:
        if per_class is None or counts[label] < per_class:
            picked.append((text, label))
            counts[label] += 1
    return picked


def test_minilm_lora_with_trainable_classifier_beats_chance_on_banking77(example_data):
    """8 intents (chance 12.5%), 16 training rows each, 3 epochs: the seed's BERT-with-classifier."""
    root = example_data / "banking77"
    classes = json.loads((root / "categories.json").read_text())[:8]
    train = _banking77_slice(root / "train.csv.gz", classes, per_class=16)
    test = _banking77_slice(root / "test.csv.gz", classes, per_class=None)
    torch.manual_seed(0)
    model, tokenizer = load_base("minilm-l6", task="seq_cls", num_labels=len(classes))
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.05))  # query/value + classifier copy
    assert "classifier.modules_to_save.weight" in adapter_parameters(model)

    def encode(rows):
        return tokenizer([t for t, _ in rows], return_tensors="pt", padding=True), torch.tensor([y for _, y in rows])

    optimizer = torch.optim.AdamW(adapter_parameters(model).values(), lr=3e-3)
    model.train()
    for _ in range(3):
        for i in range(0, len(train), 16):
            inputs, y = encode(train[i:i + 16])
            model(**inputs, labels=y).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        inputs, y = encode(test)
        accuracy = (model(**inputs).logits.argmax(-1) == y).float().mean().item()
    assert len(test) > 200
    assert accuracy > 0.5  # 4x chance

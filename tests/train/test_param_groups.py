"""`train.head_lr`: the modules trained in full get their own lr (no Ray)."""

from __future__ import annotations

import lora_core
from workflows.models import load_base
from workflows.train.worker import param_groups


def test_head_lr_puts_the_classifier_in_a_group_of_its_own():
    model, _ = load_base("tiny-bert", task="token_cls", num_labels=5)
    model = lora_core.apply_lora(model, lora_core.LoraConfig(r=2, alpha=4, target_modules=["query", "value"]))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    (one,) = param_groups(model, 1e-3, None)
    assert {id(p) for p in one["params"]} == trainable
    lora, head = param_groups(model, 1e-3, 1e-2)
    assert head["lr"] == 1e-2 and "lr" not in lora
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("classifier" in names[id(p)] for p in head["params"]) and len(head["params"]) == 2
    assert {id(p) for p in lora["params"] + head["params"]} == trainable

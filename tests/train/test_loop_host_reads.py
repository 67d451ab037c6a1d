"""The step loop never waits for the device between reports (issue 20): no `.item()`, `float()`,
`int()` or `.tolist()` of a tensor in workflows' code per micro-batch or per step; the metrics
window is read once, at a report. No Ray cluster: the loop's `step` on one CPU worker."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lora_core
from workflows.collate import CausalCollator
from workflows.config import TrainSection
from workflows.models import load_base
from workflows.train.ddp_comm import CommStats
from workflows.train.loop import StepLoop

WORKFLOWS = str(Path(__file__).resolve().parents[2] / "workflows")
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """Calls of a tensor read made by workflows' own code (torch's internals are not counted)."""
    calls: list[str] = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(WORKFLOWS):
                calls.append(f"{_name} at {sys._getframe(1).f_code.co_name}")
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


def _loop() -> StepLoop:
    model, tok = load_base("tiny-llama")
    lora_core.apply_lora(model, lora_core.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    cfg = SimpleNamespace(train=TrainSection(precision="fp32", grad_accum=2), manifest={"task": "causal_lm"})
    return StepLoop(cfg, model, model, optimizer, scheduler, CommStats(), torch.device("cpu"), rank=0, world=1)


def _group(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    collate = CausalCollator(pad_token_id=0, packed=False, loss_positions=True)
    rows = [torch.randint(1, 500, (n,), generator=g).numpy() for n in (12, 9)]
    labels = [r.copy() for r in rows]
    for lab in labels:
        lab[:4] = -100  # a prompt
    return [collate({"input_ids": rows, "labels": labels}) for _ in range(2)]


def test_steps_never_read_the_device_and_the_report_reads_it_once(host_reads):
    loop = _loop()
    for step in range(3):
        grad_norm = loop.step(_group(step), step)
    assert host_reads == []  # 3 steps x 2 micro-batches, not one sync
    assert isinstance(grad_norm, torch.Tensor)
    metrics = loop.window.close()
    assert [c.split(" ")[0] for c in host_reads] == ["tolist"]
    assert metrics["train_loss"] > 0 and loop.window.steps == 0
    assert metrics["step_time_s"] > 0 and metrics["tokens_per_s"] > 0


def test_the_window_times_training_steps_not_what_a_report_does_between_them():
    loop = _loop()
    loop.step(_group(0), 0)
    first = loop.window.close()
    loop.window.start -= 1000.0  # as if a report's evaluation and checkpoint took 1000 s ...
    loop.window.restart()  # ... which the loop's report ends with
    loop.step(_group(1), 1)
    second = loop.window.close()
    assert second["step_time_s"] < 100 and first["step_time_s"] < 100

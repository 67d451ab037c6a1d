"""What a training worker measures between two reports, and how rank 0 logs it.

`MetricsWindow` accumulates per-rank sums (NLL, label tokens, tokens) since the last report; at a
report they are all-reduced, so the loss is the mean over every rank's label tokens and tokens/s
counts every rank. The sums live on the worker's device: an NCCL group reduces only device tensors,
and adding to them never waits for the device; `close` is the one read, at a report.

The window's clock runs from `restart` (after the previous report's evaluation, checkpoint and
`ray.train.report`) to `close` (whose read waits for the queued steps): training steps only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


class MetricsWindow:
    """Sums since the last report: (nll, label tokens, token positions, real tokens) of this rank, on
    `device`. Positions count padding; real tokens do not (unpacked rows: the attention mask)."""

    def __init__(self, device: torch.device, world: int):
        self.world = world
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.steps = 0
        self.start = time.perf_counter()

    def add(self, nll_sum: torch.Tensor, label_tokens: torch.Tensor | int, batch: dict[str, torch.Tensor]) -> None:
        self.sums[0] += nll_sum.detach().double()
        self.sums[1] += label_tokens
        self.sums[2] += batch["input_ids"].numel()
        self.sums[3] += batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()

    def close(self) -> dict[str, float | None]:
        """Reduce over ranks, return `train_loss`, `tokens_per_s`, `step_time_s` and zero the sums;
        the clock stops here (`restart` starts it again once the report is done)."""
        sums = self.sums.clone()
        if self.world > 1:
            dist.all_reduce(sums)
        nll, labels, tokens, real = sums.tolist()  # waits for the steps queued on the device
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"train_loss": nll / labels if labels > 0 else None,
               "tokens_per_s": tokens / elapsed,  # all ranks, padding included
               "padding_fraction": 1 - real / tokens if tokens else 0.0,
               "step_time_s": elapsed / max(1, self.steps)}
        self.sums.zero_()
        self.steps = 0
        return out

    def restart(self) -> None:
        """Start timing training steps again (after a report's evaluation, checkpoint and barrier)."""
        self.start = time.perf_counter()


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def progress_line(m: dict[str, Any], total: int, prefix: str = "[train]") -> str:
    """One line per report: step, losses, lr, throughput and the time left at this pace."""
    per_step = m["elapsed_s"] / max(1, m["steps_this_run"])
    eta = per_step * (total - m["step"])
    loss = f"{m['train_loss']:.4f}" if m["train_loss"] is not None else "-"
    ev = f" eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""
    return (f"{prefix} step {m['step']}/{total} loss {loss}{ev} lr {m['lr']:.2e} "
            f"{m['tokens_per_s']:.0f} tok/s eta {int(eta // 60)}m{int(eta % 60):02d}s")


def gather(value: Any, world: int) -> list[Any]:
    """`value` from every rank, in rank order."""
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out

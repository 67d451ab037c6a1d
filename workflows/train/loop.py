"""The step loop of one training worker: micro-batches, accumulation, reports, checkpoints.

One optimizer step is `grad_accum` micro-batches; only the last one all-reduces (the others run
under `no_sync()`). Every label token weighs the same on every rank:

    N = all_reduce(label tokens of this step's micro-batches)       # global count
    loss_r = sum of token NLL on rank r * world / N                  # DDP averages over ranks
    => gradient = sum over every rank's tokens of d(NLL) / N

Metrics are reported every `log_every` steps and checkpoints every `checkpoint_every` steps (both
at the last step); `ray.train.report` is a barrier costing ~0.1-2 s, so never per step.

No host sync between reports: label counts, losses and the gradient norm stay device tensors (a
`.item()` per micro-batch would stall a GPU's queue every time) and are read when a line is logged.
Throughput (`tokens_per_s`, `step_time_s`) times the training steps alone; evaluation, checkpoint
saving and `ray.train.report` are timed apart (`eval_s`, `checkpoint_s`, `report_s`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import Checkpoint
from torch import nn

from workflows.collate import collator_for, label_token_nll
from workflows.devices import native_bf16
from workflows.heads import TASK_SPECS
from workflows.train.batches import micro_batches
from workflows.train.checkpoint import TrainState, save_checkpoint, step_seed
from workflows.train.ddp_comm import CommStats
from workflows.train.metrics import MetricsWindow, append_jsonl, progress_line


class StepLoop:
    """Runs the optimizer steps of one worker from a `TrainState` to `cfg.total_steps`."""

    def __init__(self, cfg: Any, ddp: nn.Module, model: nn.Module, optimizer, scheduler, stats: CommStats,
                 device: torch.device, rank: int, world: int, on_checkpoint: Callable[[], None] | None = None,
                 scaler: torch.amp.GradScaler | None = None):
        self.cfg, self.tc = cfg, cfg.train
        self.ddp, self.model, self.optimizer, self.scheduler = ddp, model, optimizer, scheduler
        self.stats, self.device, self.rank, self.world = stats, device, rank, world
        self.on_checkpoint, self.scaler = on_checkpoint, scaler
        self.causal = cfg.manifest["task"] == "causal_lm"
        self.per_token = TASK_SPECS[cfg.manifest["task"]].per_token_labels
        self.autocast_dtype = autocast_dtype(self.tc.precision, device)
        # transformers 5 causal LMs compute logits only at the positions asked for (`logits_to_keep`).
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.allreduce_per_step: set[int] = set()
        self.last_metrics: dict[str, Any] = {}
        self.window = MetricsWindow(device, world)
        self._run_start = time.perf_counter()
        self._steps_this_run = 0
        self._report_s = self._checkpoint_s = 0.0
        self._eval_cache: list[dict[str, torch.Tensor]] | None = None

    # -- data ------------------------------------------------------------------------------
    def _batches(self, state: TrainState) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Groups of `grad_accum` micro-batches from the saved data position onwards."""
        shard = ray.train.get_dataset_shard("train")
        collate = collator_for(self.cfg.manifest, "train", loss_positions=True)
        grouped = self.tc.group_by_length if self.tc.group_by_length != "auto" else not self.cfg.manifest["packed"]
        while True:
            batches = micro_batches(shard, collate, self.tc.batch_size, self.device, self.tc.seed, state.epoch,
                                    self.tc.shuffle_buffer_rows, grouped)
            batches = itertools.islice(batches, state.batches_in_epoch, None)
            yielded = False
            for group in _groups(batches, self.tc.grad_accum):
                yielded = True
                state.batches_in_epoch += len(group)
                yield group
            if not yielded and state.batches_in_epoch == 0:
                raise RuntimeError("this worker's train shard is empty: fewer train rows than workers?")
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    # -- one step --------------------------------------------------------------------------
    def _loss_terms(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(sum of per-token/per-row loss, number of loss terms: a device tensor, never read here)."""
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "loss_positions", "loss_targets")}
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            if not self.causal:
                logits = model(**inputs).logits
            elif self.keeps_logits:  # (B, K, V): only where a label is scored
                logits = model(**inputs, use_cache=False, logits_to_keep=batch["loss_positions"]).logits
            else:
                logits = model(**inputs, use_cache=False).logits
                logits = logits.take_along_dim(batch["loss_positions"][..., None], dim=1)
        if self.causal:
            targets = batch["loss_targets"]
            return label_token_nll(logits, targets), (targets != -100).sum()
        if self.per_token:  # token_cls: one label per token, -100 where none
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            return loss, (labels != -100).sum()
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()

    def _label_tokens(self, group: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        if self.causal:
            count = sum((b["labels"][:, 1:] != -100).sum() for b in group)
        elif self.per_token:
            count = sum((b["labels"] != -100).sum() for b in group)
        else:
            count = sum(b["labels"].numel() for b in group)
        return torch.as_tensor(count, dtype=torch.float64, device=self.device).reshape(1)

    def step(self, group: list[dict[str, torch.Tensor]], step: int) -> torch.Tensor:
        """One optimizer step; returns the gradient norm as a device tensor (read when logged)."""
        torch.manual_seed(step_seed(self.tc.seed, self.rank, step))
        total = self._label_tokens(group)
        if self.world > 1:
            dist.all_reduce(total)  # global label tokens: every token weighs the same on every rank
        weight = (self.world / total.clamp(min=1.0)).float().squeeze()  # stays on the device
        before = self.stats.allreduce_bytes
        for i, batch in enumerate(group):
            sync = i == len(group) - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss_sum, n = self._loss_terms(self.ddp, batch)
                loss = loss_sum * weight
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            self.window.add(loss_sum, n, batch)
        if self.scaler:  # fp16: true gradients before clipping; a step with inf/nan ones is skipped
            self.scaler.unscale_(self.optimizer)
        max_norm = self.tc.max_grad_norm if self.tc.max_grad_norm is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window.steps += 1
        if self.world > 1:
            self.allreduce_per_step.add(self.stats.allreduce_bytes - before)
        return grad_norm

    # -- the loop --------------------------------------------------------------------------
    def run(self, state: TrainState) -> None:
        total, tc = self.cfg.total_steps, self.tc
        self._run_start = time.perf_counter()
        self.window.restart()  # the initial evaluation is not training time
        if state.step >= total:
            self.last_metrics = self._metrics(state, grad_norm=None, do_eval=self.cfg.has_eval)
            return
        for group in self._batches(state):
            grad_norm = self.step(group, state.step)
            state.step += 1
            self._steps_this_run += 1
            last = state.step == total
            log = last or state.step % tc.log_every == 0
            ckpt = last or bool(tc.checkpoint_every) and state.step % tc.checkpoint_every == 0
            do_eval = self.cfg.has_eval and (last or bool(tc.eval_every) and state.step % tc.eval_every == 0)
            if log or ckpt or do_eval:
                self._report(state, grad_norm, do_eval, ckpt)
            if last:
                return

    def _report(self, state: TrainState, grad_norm: torch.Tensor | None, do_eval: bool, ckpt: bool) -> None:
        metrics = self._metrics(state, grad_norm, do_eval)
        self.last_metrics = metrics
        if self.rank == 0:
            append_jsonl(Path(self.cfg.run_dir) / "metrics.jsonl", metrics)
            print(progress_line(metrics, self.cfg.total_steps, self.cfg.progress_prefix), flush=True)
        start, self._checkpoint_s = time.perf_counter(), 0.0
        if not ckpt:
            ray.train.report(metrics)
        else:
            # Every rank calls report (it is a barrier); the adapter is identical on every rank, so
            # rank 0 alone writes it. Ray copies the directory to storage before report returns.
            with tempfile.TemporaryDirectory(prefix="loraflow-ckpt-") as tmp:
                checkpoint = None
                if self.rank == 0:
                    saving = time.perf_counter()
                    save_checkpoint(Path(tmp), self.model, self.optimizer, self.scheduler, state, self.scaler)
                    self._checkpoint_s = time.perf_counter() - saving
                    checkpoint = Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
            if self.rank == 0 and self.on_checkpoint is not None:
                self.on_checkpoint()
        self._report_s = time.perf_counter() - start - self._checkpoint_s  # logged with the next report
        self.window.restart()

    def _metrics(self, state: TrainState, grad_norm: torch.Tensor | None, do_eval: bool) -> dict[str, Any]:
        per_step = sorted(self.allreduce_per_step)
        metrics = {
            "step": state.step, "epoch": state.epoch, **self.window.close(),  # the host reads, here
            "lr": self.scheduler.get_last_lr()[0], "grad_norm": None if grad_norm is None else float(grad_norm),
            "allreduce_bytes_per_step": per_step[-1] if per_step else 0,
            "allreduce_bytes_per_step_distinct": per_step,
            "elapsed_s": time.perf_counter() - self._run_start, "steps_this_run": self._steps_this_run,
        }
        if self.scaler:
            metrics["loss_scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":
            metrics["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        # The previous report's checkpoint saving and ray.train.report (this one's are still to come).
        metrics["checkpoint_s"], metrics["report_s"] = self._checkpoint_s, self._report_s
        if do_eval:
            start = time.perf_counter()
            if self.cfg.validator is None:
                metrics["eval_loss"] = self.eval_loss()
            else:  # A trial: the ranks score the validation rows (this run's eval rows, `PreparedData.
                # for_trials`) between them; rank 0 gets the metrics, their loss as eval_loss too.
                metrics.update(self.cfg.validator(self.model, self.rank, self.world))
                self.model.train()
            metrics["eval_s"] = time.perf_counter() - start
        return metrics

    def eval_loss(self) -> float:
        """Mean loss per label token (per row for classification) over the eval split.

        Every worker holds the whole (unsplit) eval set and scores batches i with i % world == rank,
        up to `eval_batches` each; sums are all-reduced, so no row is dropped or counted twice.
        The same batches are scored at every evaluation, so the curve compares like with like.
        Eval bypasses DDP (no reducer, no hooks).
        """
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.model.eval()
        with torch.no_grad():
            for batch in self._eval_batches():
                loss_sum, n = self._loss_terms(self.model, batch)
                sums[0] += loss_sum.double()
                sums[1] += n
        self.model.train()
        if self.world > 1:
            dist.all_reduce(sums)
        loss, n = sums.tolist()
        return loss / n if n > 0 else float("nan")

    def _eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's eval batches, read once and kept (at most `eval_batches` small batches):
        re-reading the Parquet files at every evaluation costs seconds of Ray Data start-up."""
        if self._eval_cache is None:
            shard = ray.train.get_dataset_shard("eval")
            batches = shard.iter_torch_batches(batch_size=self.tc.batch_size, device=self.device,
                                               collate_fn=RayCollate(collator_for(self.cfg.manifest, "eval", loss_positions=True)))
            mine = (b for i, b in enumerate(batches) if i % self.world == self.rank)
            self._eval_cache = list(itertools.islice(mine, self.tc.eval_batches))
        return self._eval_cache


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.precision` on `device`; None: no autocast (fp32)."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if native_bf16(str(device)) else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class RayCollate(NumpyBatchCollateFn):
    """A `workflows.collate` collator as Ray Data's collate function: Ray hands it numpy batches."""

    def __init__(self, collate: Callable[[dict[str, Any]], dict[str, torch.Tensor]]):
        self.collate = collate

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.collate(batch)


def _groups(items: Iterable, n: int) -> Iterator[list]:
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group

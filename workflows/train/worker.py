"""`train_loop_per_worker`: one Ray Train worker of a DDP LoRA fine-tune.

Lives in an importable module on purpose: Ray pickles a function from `__main__` by value, and
with torch.distributed in scope that fails (`cannot pickle 'ConfigModuleInstance'`).

Per worker: load the base, add LoRA (base frozen *before* DDP wraps it, so DDP buckets only adapter
and `modules_to_save` gradients), tell DDP not to broadcast the frozen state, count what is
all-reduced and broadcast, then run optimizer steps of `grad_accum` micro-batches each:

    N = all_reduce(label tokens of this step's micro-batches)       # global count, 8 bytes
    loss_r = sum of token NLL on rank r * world / N                  # DDP averages over ranks
    => gradient = sum over every rank's tokens of d(NLL) / N         # each token weighs the same

The first micro-batches run under `no_sync()` so only the last one all-reduces. Metrics are
reported every `log_every` steps and checkpoints every `checkpoint_every` steps (both at the last
step); `ray.train.report` is a barrier costing ~0.1-2 s, so never per step.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import Checkpoint
from torch import nn

import lora_core
from workflows.collate import causal_token_nll, collator_for
from workflows.models import load_base
from workflows.train.checkpoint import (
    TrainState,
    load_checkpoint,
    save_checkpoint,
    step_seed,
    tensors_digest,
    trainable_tensors,
)
from workflows.train.ddp_comm import CommStats, count_broadcasts, ignore_frozen_state, register_counting_hook


@dataclass
class WorkerConfig:
    """What the driver hands every worker (it travels through Ray)."""

    model: dict[str, Any]  # config.model section
    lora: dict[str, Any]  # config.lora section
    train: dict[str, Any]  # config.train section
    manifest: dict[str, Any]  # the prepared data's manifest.json
    run_dir: str  # <storage_path>/<run_name>: metrics.jsonl and final/ go here
    total_steps: int
    num_labels: int | None = None  # classification heads
    init_adapter: str | None = None  # resolved local path of a warm-start adapter
    base_identity: dict[str, Any] | None = None  # workflows.models.base_identity(); "path" goes to PEFT
    lineage: dict[str, Any] | None = None  # loraflow.json extras (data digest, config, ...)
    has_eval: bool = False
    stop_after_step: int | None = None  # tests/benchmarks: simulate an interruption after this step
    on_checkpoint: Callable[[], None] | None = None  # rank 0, after each reported checkpoint


class StopTraining(RuntimeError):
    """Raised by every worker after `stop_after_step` to simulate an interrupted run."""


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    cfg = WorkerConfig(**config)
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc["threads_per_worker"] or max(1, int(tc["cpus_per_worker"])))
    device = ray.train.torch.get_device()

    model = build_model(cfg)
    summary = lora_core.trainable_summary(model)
    base_digest = tensors_digest(_frozen_tensors(model))

    stats = CommStats()
    ignore_frozen_state(model)
    with count_broadcasts(stats):
        ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    register_counting_hook(ddp, stats, tc["grad_compression"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(tc["schedule"], tc["warmup_steps"], cfg.total_steps))

    state = TrainState(seed=tc["seed"], world_size=world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), model, optimizer, scheduler)
        if state.world_size != world:
            raise RuntimeError(f"checkpoint was written by {state.world_size} workers, this run has {world}: "
                               "the data position would not match; keep train.num_workers or use a new run")
        _log(rank, f"[train] resumed from step {state.step} (epoch {state.epoch}, "
                   f"batch {state.batches_in_epoch})")
    loop = _Loop(cfg, ddp, model, optimizer, scheduler, stats, device, rank, world)
    if cfg.has_eval and state.eval_loss_initial is None:
        state.eval_loss_initial = loop.eval_loss()
    resumed_from = state.step
    loop.run(state)

    final = {
        **loop.last_metrics,
        "steps": state.step,
        "resumed_from_step": resumed_from,
        "eval_loss_initial": state.eval_loss_initial,
        "adapter_param_bytes": summary["adapter_param_bytes"],
        "base_param_bytes": summary["base_param_bytes"],
        "trainable_params": summary["trainable_params"],
        "broadcast_bytes": stats.broadcast_bytes,
        "world_size": world,
        "adapter_sha256_per_rank": _gather(tensors_digest(trainable_tensors(model)), world),
        "base_sha256_before_per_rank": _gather(base_digest, world),
        "base_sha256_after_per_rank": _gather(tensors_digest(_frozen_tensors(model)), world),
    }
    if rank == 0:
        _save_final(cfg, model, final)
    return final


def build_model(cfg: WorkerConfig) -> nn.Module:
    """Base + LoRA with only adapter (and modules_to_save) parameters trainable.

    Seeded before LoRA is added so every rank starts from the same adapter (DDP broadcasts it
    from rank 0 anyway; the frozen base is identical because every rank loads the same files).
    """
    torch.manual_seed(cfg.train["seed"])
    model, _ = load_base(cfg.model["name"], task=cfg.model["task"], num_labels=cfg.num_labels,
                         dtype=cfg.model["dtype"], revision=cfg.model.get("revision"))
    if cfg.init_adapter:  # warm start: the saved adapter brings its own LoRA config
        model = lora_core.load_adapter(model, cfg.init_adapter, trainable=True)
    else:
        lora_config = lora_core.LoraConfig(**cfg.lora, base_model_name_or_path=(cfg.base_identity or {}).get("path"))
        lora_core.apply_lora(model, lora_config)  # freezes the base; adapters are fp32
    if cfg.train["gradient_checkpointing"]:
        # Non-reentrant: reentrant checkpointing re-runs forward in backward and breaks DDP with LoRA.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak lr at step s: linear warmup over `warmup` steps, then decay to 0."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return factor


class _Loop:
    """The step loop of one worker: micro-batches, accumulation, logging, checkpoints."""

    def __init__(self, cfg, ddp, model, optimizer, scheduler, stats, device, rank, world):
        self.cfg, self.tc = cfg, cfg.train
        self.ddp, self.model, self.optimizer, self.scheduler = ddp, model, optimizer, scheduler
        self.stats, self.device, self.rank, self.world = stats, device, rank, world
        self.causal = cfg.manifest["task"] == "causal_lm"
        self.autocast = bool(self.tc["bf16"] if self.tc["bf16"] is not None else device.type == "cuda")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.allreduce_per_step: set[int] = set()
        self.last_metrics: dict[str, Any] = {}
        self._window = torch.zeros(3, dtype=torch.float64)  # nll sum, label tokens, tokens (this rank)
        self._window_start = time.perf_counter()
        self._run_start = time.perf_counter()
        self._steps_this_run = 0
        self._window_steps = 0
        self._eval_cache: list[dict[str, torch.Tensor]] | None = None

    # -- data ------------------------------------------------------------------------------
    def _batches(self, state: TrainState) -> Iterator[list[dict[str, torch.Tensor]]]:
        """Groups of `grad_accum` micro-batches from the saved data position onwards."""
        shard = ray.train.get_dataset_shard("train")
        collate = collator_for(self.cfg.manifest, "train")
        while True:
            batches = shard.iter_torch_batches(batch_size=self.tc["batch_size"], collate_fn=collate,
                                               device=self.device)
            batches = _skip(batches, state.batches_in_epoch)
            yielded = False
            for group in _groups(batches, self.tc["grad_accum"]):
                yielded = True
                state.batches_in_epoch += len(group)
                yield group
            if not yielded and state.batches_in_epoch == 0:
                raise RuntimeError("this worker's train shard is empty: fewer train rows than workers?")
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    # -- one step --------------------------------------------------------------------------
    def _loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of per-token/per-row loss, number of loss terms) for one micro-batch."""
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.ddp(**inputs, use_cache=False).logits if self.causal else self.ddp(**inputs).logits
        if self.causal:
            nll, mask = causal_token_nll(logits, labels)
            return nll.sum(), int(mask.sum())
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()

    def _count(self, group) -> float:
        if self.causal:
            return float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in group))
        return float(sum(b["labels"].numel() for b in group))

    def step(self, group: list[dict[str, torch.Tensor]], step: int) -> float:
        torch.manual_seed(step_seed(self.tc["seed"], self.rank, step))
        total = torch.tensor([self._count(group)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(total)  # global label tokens: every token weighs the same on every rank
        total = max(float(total), 1.0)
        before = self.stats.allreduce_bytes
        for i, batch in enumerate(group):
            sync = i == len(group) - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                loss_sum, n = self._loss_terms(batch)
                (loss_sum * self.world / total).backward()
            self._window += torch.tensor([float(loss_sum.detach()), n, batch["input_ids"].numel()],
                                         dtype=torch.float64)
        max_norm = self.tc["max_grad_norm"] if self.tc["max_grad_norm"] is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            self.allreduce_per_step.add(self.stats.allreduce_bytes - before)
        return grad_norm

    # -- the loop --------------------------------------------------------------------------
    def run(self, state: TrainState) -> None:
        total, tc = self.cfg.total_steps, self.tc
        self._window_start = self._run_start = time.perf_counter()
        if state.step >= total:
            self.last_metrics = self._metrics(state, grad_norm=None, do_eval=self.cfg.has_eval)
            return
        for group in self._batches(state):
            grad_norm = self.step(group, state.step)
            state.step += 1
            self._steps_this_run += 1
            self._window_steps += 1
            last = state.step == total
            log = last or state.step % tc["log_every"] == 0
            ckpt = last or bool(tc["checkpoint_every"]) and state.step % tc["checkpoint_every"] == 0
            do_eval = self.cfg.has_eval and (last or bool(tc["eval_every"]) and state.step % tc["eval_every"] == 0)
            if log or ckpt or do_eval:
                self._report(state, grad_norm, do_eval, ckpt)
            if self.cfg.stop_after_step is not None and state.step >= self.cfg.stop_after_step and not last:
                if ckpt:
                    # report() returns once the checkpoint is uploaded, not once the controller has
                    # registered it: raising at once races that (a loaded machine lost the checkpoint
                    # and the "resumed" run started from scratch). Wait for the registration first.
                    ray.train.get_all_reported_checkpoints()
                raise StopTraining(f"stopped after step {state.step} (stop_after_step)")
            if last:
                return

    def _report(self, state: TrainState, grad_norm: float, do_eval: bool, ckpt: bool) -> None:
        metrics = self._metrics(state, grad_norm, do_eval)
        self.last_metrics = metrics
        if self.rank == 0:
            _append_jsonl(Path(self.cfg.run_dir) / "metrics.jsonl", metrics)
            _log(self.rank, _progress_line(metrics, self.cfg.total_steps))
        if not ckpt:
            ray.train.report(metrics)
            return
        # Every rank calls report (it is a barrier); the adapter is identical on every rank, so
        # rank 0 alone writes it. Ray copies the directory to storage before report returns.
        with tempfile.TemporaryDirectory(prefix="loraflow-ckpt-") as tmp:
            checkpoint = None
            if self.rank == 0:
                save_checkpoint(Path(tmp), self.model, self.optimizer, self.scheduler, state)
                checkpoint = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if self.rank == 0 and self.cfg.on_checkpoint is not None:
            self.cfg.on_checkpoint()

    def _metrics(self, state: TrainState, grad_norm: float | None, do_eval: bool) -> dict[str, Any]:
        window = self._window.clone()
        if self.world > 1:
            dist.all_reduce(window)
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        per_step = sorted(self.allreduce_per_step)
        metrics = {
            "step": state.step,
            "epoch": state.epoch,
            "train_loss": float(window[0] / window[1]) if window[1] > 0 else None,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": float(window[2]) / elapsed,  # all ranks, padding included
            "step_time_s": elapsed / max(1, self._window_steps),
            "allreduce_bytes_per_step": per_step[-1] if per_step else 0,
            "allreduce_bytes_per_step_distinct": per_step,
            "elapsed_s": now - self._run_start,
            "steps_this_run": self._steps_this_run,
        }
        if self.device.type == "cuda":
            metrics["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        if do_eval:
            metrics["eval_loss"] = self.eval_loss()
        self._window.zero_()
        self._window_steps = 0
        self._window_start = time.perf_counter()
        return metrics

    def eval_loss(self) -> float:
        """Mean loss per label token (per row for classification) over the eval split.

        Every worker holds the whole (unsplit) eval set and scores batches i with i % world == rank,
        up to `eval_batches` each; sums are all-reduced, so no row is dropped or counted twice.
        The same batches are scored at every evaluation, so the curve compares like with like.
        """
        sums = torch.zeros(2, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad():
            for batch in self._eval_batches():
                loss_sum, n = self._loss_terms_unwrapped(batch)
                sums += torch.tensor([float(loss_sum), n], dtype=torch.float64)
        self.model.train()
        if self.world > 1:
            dist.all_reduce(sums)
        return float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")

    def _eval_batches(self) -> list[dict[str, torch.Tensor]]:
        """This rank's eval batches, read once and kept (at most `eval_batches` small batches):
        re-reading the Parquet files at every evaluation costs seconds of Ray Data start-up."""
        if self._eval_cache is None:
            shard = ray.train.get_dataset_shard("eval")
            batches = shard.iter_torch_batches(batch_size=self.tc["batch_size"], device=self.device,
                                               collate_fn=collator_for(self.cfg.manifest, "eval"))
            mine = (b for i, b in enumerate(batches) if i % self.world == self.rank)
            self._eval_cache = list(itertools.islice(mine, self.tc["eval_batches"]))
        return self._eval_cache

    def _loss_terms_unwrapped(self, batch):
        ddp, self.ddp = self.ddp, self.model  # eval bypasses DDP: no reducer, no hooks
        try:
            return self._loss_terms(batch)
        finally:
            self.ddp = ddp


def _frozen_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


def _skip(batches: Iterable, n: int) -> Iterator:
    it = iter(batches)
    for _ in range(n):
        next(it, None)
    return it


def _groups(items: Iterable, n: int) -> Iterator[list]:
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def _gather(value: str, world: int) -> list[str]:
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _progress_line(m: dict[str, Any], total: int) -> str:
    per_step = m["elapsed_s"] / max(1, m["steps_this_run"])
    eta = per_step * (total - m["step"])
    loss = f"{m['train_loss']:.4f}" if m["train_loss"] is not None else "-"
    ev = f" eval {m['eval_loss']:.4f}" if "eval_loss" in m else ""
    return (f"[train] step {m['step']}/{total} loss {loss}{ev} lr {m['lr']:.2e} "
            f"{m['tokens_per_s']:.0f} tok/s eta {int(eta // 60)}m{int(eta % 60):02d}s")


def _log(rank: int, line: str) -> None:
    if rank == 0:
        print(line, flush=True)


def _save_final(cfg: WorkerConfig, model: nn.Module, final: dict[str, Any]) -> None:
    """Rank 0: the final adapter (PEFT format) and metrics under `<run_dir>/final/`, atomically."""
    run_dir = Path(cfg.run_dir)
    tmp = run_dir / f".final-{uuid.uuid4().hex[:8]}"
    lora_core.save_adapter(model, tmp / "adapter", base_identity=cfg.base_identity,
                           extra={**(cfg.lineage or {}), "metrics": final})
    (tmp / "metrics.json").write_text(json.dumps(final, indent=2))
    shutil.rmtree(run_dir / "final", ignore_errors=True)
    os.rename(tmp, run_dir / "final")


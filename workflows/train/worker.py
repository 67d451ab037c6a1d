"""`train_loop_per_worker`: one Ray Train worker of a DDP LoRA fine-tune.

Lives in an importable module on purpose: Ray pickles a function from `__main__` by value, and
with torch.distributed in scope that fails (`cannot pickle 'ConfigModuleInstance'`).

Per worker: load the base, add LoRA (base frozen *before* DDP wraps it, so DDP buckets only adapter
and `modules_to_save` gradients), tell DDP not to broadcast the frozen state, count what is
all-reduced and broadcast, resume from Ray Train's checkpoint if there is one, then run the step
loop (`workflows.train.loop`). Rank 0 saves the final adapter in PEFT format.

The settings arrive as one typed `WorkerConfig` (`train_loop_config={"worker": ...}`).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

import lora_core
from workflows import storage
from workflows.adapters import AdapterFiles
from workflows.artifacts import atomic_dir, fingerprint
from workflows.config import ModelSection, TrainSection
from workflows.models import attention_implementation, load_base
from workflows.train.checkpoint import TrainState, load_checkpoint, tensors_digest, trainable_tensors
from workflows.train.ddp_comm import CommStats, count_broadcasts, ignore_frozen_state, register_counting_hook
from workflows.train.loop import StepLoop, autocast_dtype
from workflows.train.metrics import gather


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver hands every worker (it travels through Ray's object store)."""

    model: ModelSection
    lora: lora_core.LoraConfig  # with base_model_name_or_path set
    train: TrainSection
    manifest: dict[str, Any]  # the prepared data's manifest.json
    run_dir: str  # <storage_path>/<run_name>: metrics.jsonl and final/ go here (node-local for a store)
    total_steps: int
    num_labels: int | None = None  # classification heads
    init_adapter: AdapterFiles | None = None  # warm start: the adapter's files, never a driver path
    base_identity: dict[str, Any] | None = None  # workflows.models.base_identity()
    lineage: dict[str, Any] | None = None  # loraflow.json extras (data digest, config, ...)
    has_eval: bool = False
    # A tune trial's: called on every rank with (model, rank, world) at every periodic eval; the ranks
    # share the rows, rank 0 returns the metrics it adds to that report (the evaluate stage's, on the
    # validation split; workflows/tune/validation.py),
    # "eval_loss" among them: the validation rows are the trial's eval rows, so the loop's own eval
    # pass (and its initial one) is left out.
    validator: Callable[[nn.Module, int, int], dict[str, Any]] | None = None
    progress_prefix: str = "[train]"  # a trial's progress lines go to the run log, not the console


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The function every Ray Train worker runs; `loop_config["worker"]` is the `WorkerConfig`."""
    return run_worker(loop_config["worker"])


def param_groups(model: torch.nn.Module, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
    """The trainable parameters; with `head_lr`, the modules trained in full (`modules_to_save`: a
    classifier head) in a group of their own at that lr."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if head_lr is None:
        return [{"params": [p for _, p in params]}]
    head = [p for n, p in params if ".modules_to_save." in f".{n}"]
    rest = [p for n, p in params if ".modules_to_save." not in f".{n}"]
    return [g for g in ({"params": rest}, {"params": head, "lr": head_lr}) if g["params"]]


def run_worker(cfg: WorkerConfig, on_checkpoint: Callable[[], None] | None = None) -> dict[str, Any]:
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tc.threads_per_worker or max(1, int(tc.cpus_per_worker)))
    device = ray.train.torch.get_device()

    model = build_model(cfg, device)
    summary = lora_core.trainable_summary(model)
    stats = CommStats()
    ignore_frozen_state(model)
    unused = has_experts(model) if tc.find_unused_parameters == "auto" else tc.find_unused_parameters
    with count_broadcasts(stats):
        ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    register_counting_hook(ddp, stats, tc.grad_compression)
    optimizer = torch.optim.AdamW(param_groups(model, tc.lr, tc.head_lr), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.schedule, tc.warmup_steps, cfg.total_steps))
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype(tc.precision, device) == torch.float16 else None

    state = TrainState(seed=tc.seed, world_size=world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d), model, optimizer, scheduler, scaler)
        if state.world_size != world:
            raise RuntimeError(f"checkpoint was written by {state.world_size} workers, this run has {world}: "
                               "the data position would not match; keep train.num_workers or use a new run")
        if rank == 0:
            print(f"[train] resumed from step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})",
                  flush=True)
    loop = StepLoop(cfg, ddp, model, optimizer, scheduler, stats, device, rank, world, on_checkpoint, scaler)
    if cfg.has_eval and cfg.validator is None and state.eval_loss_initial is None:
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
        "find_unused_parameters": unused,
        "precision": str(loop.autocast_dtype or torch.float32).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,  # the kernel that ran (the run's manifest)
        "adapter_sha256_per_rank": gather(tensors_digest(trainable_tensors(model)), world),
    }
    if rank == 0:
        save_final(cfg, model, final)
    return final


def build_model(cfg: WorkerConfig, device: torch.device) -> nn.Module:
    """Base + LoRA on `device`, with only adapter (and modules_to_save) parameters trainable.

    The base is loaded in its dtype straight onto the device (no host copy of it on a GPU worker).
    Seeded before LoRA is added so every rank starts from the same adapter (DDP broadcasts it
    from rank 0 anyway; the frozen base is identical because every rank loads the same files).
    """
    torch.manual_seed(cfg.train.seed)
    attn = attention_implementation(str(device), packed=bool(cfg.manifest.get("packed")))
    model, _ = load_base(cfg.model.name, task=cfg.model.task, num_labels=cfg.num_labels, dtype=cfg.model.dtype,
                         revision=cfg.model.revision, device=str(device), pooling=cfg.model.pooling,
                         attn_implementation=attn)
    if cfg.init_adapter is not None:  # warm start: the saved adapter brings its own LoRA config
        with cfg.init_adapter.materialized() as adapter_dir:
            model = lora_core.load_adapter(model, adapter_dir, trainable=True)
    else:
        lora_core.apply_lora(model, cfg.lora)  # freezes the base; adapters are fp32
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: reentrant checkpointing re-runs forward in backward and breaks DDP with LoRA.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def has_experts(model: nn.Module) -> bool:
    """A mixture-of-experts model (Mixtral, Qwen-MoE, DeepSeek-MoE, ...), by its config."""
    config = getattr(model, "config", None)
    return any((getattr(config, key, None) or 0) > 1 for key in ("num_local_experts", "num_experts", "n_routed_experts"))


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


def save_final(cfg: WorkerConfig, model: nn.Module, final: dict[str, Any]) -> None:
    """Rank 0: the final adapter (PEFT format) and metrics under `<run_dir>/final/`, atomically."""
    with atomic_dir(Path(cfg.run_dir) / "final", replace=True) as tmp:
        lora_core.save_adapter(model, tmp / "adapter", base_identity=cfg.base_identity,
                               extra={**(cfg.lineage or {}), "metrics": final})
        (tmp / "metrics.json").write_text(json.dumps(final, indent=2))


def train_loop_to_store(loop_config: dict[str, Any]) -> dict[str, Any]:
    """The worker function when Ray Train's storage is an object store.

    The step loop writes `metrics.jsonl` and `final/` to its run directory with plain file I/O, so it
    gets a node-local folder. Rank 0 publishes `metrics.jsonl` to the run directory in the store
    after every checkpoint and whenever it stops (finished, failed or interrupted), and `final/` when
    the run finished. A worker group restarted on another node first takes the metrics logged so far
    back from the store (with a lost node: up to its last checkpoint, the point the run resumes
    from). Checkpoints go through Ray Train, which writes them to the store itself.
    """
    cfg: WorkerConfig = loop_config["worker"]
    fs, remote = loop_config["store_fs"], loop_config["store_run_dir"]
    local = Path(tempfile.gettempdir()) / "loraflow-train" / fingerprint(fs.type_name, remote)
    cfg = replace(cfg, run_dir=str(local))
    if ray.train.get_context().get_world_rank() != 0:
        return run_worker(cfg)
    local.mkdir(parents=True, exist_ok=True)
    log = local / "metrics.jsonl"
    if not log.exists() and (logged := storage.read_from(fs, f"{remote}/metrics.jsonl")) is not None:
        log.write_bytes(logged)

    def publish_metrics() -> None:
        if log.exists():
            storage.upload_file(log, fs, f"{remote}/metrics.jsonl")

    try:
        return run_worker(cfg, on_checkpoint=publish_metrics)
    finally:
        publish_metrics()
        if (local / "final").is_dir():  # the run finished: the store now holds all of it
            fs.delete_dir_contents(f"{remote}/final", missing_dir_ok=True)
            storage.upload_dir(local / "final", fs, f"{remote}/final")
            shutil.rmtree(local, ignore_errors=True)


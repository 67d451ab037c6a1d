"""Training checkpoints: the adapter and the optimizer state, never the frozen base.

A checkpoint directory (written by rank 0, registered with `ray.train.report`) holds:

- `adapter.safetensors`: every trainable tensor (LoRA A/B, `modules_to_save`) by its in-model name;
- `optimizer.pt`: `{"optimizer": AdamW state, "scheduler": LR-scheduler state, "scaler"?: fp16 loss scale}`, tensors and plain
  numbers only, read back with `torch.load(weights_only=True)` (no pickled code is ever executed);
- `state.json`: `TrainState` (step, data position, seed, world size, initial eval loss).

RNG state is not stored because it is not needed: each optimizer step reseeds from (seed, rank, step)
(`step_seed`), so dropout masks after a resume are the ones an uninterrupted run draws.
Kilobytes to megabytes for a LoRA adapter, whatever the size of the base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where training stands after `step` optimizer steps.

    Data position: `epoch` (0-based) and `batches_in_epoch`, the micro-batches this rank already
    consumed from that epoch's shard; resume skips exactly that many (order is preserved).
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    seed: int = 0
    world_size: int = 1
    eval_loss_initial: float | None = None


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for one (seed, rank, step): dropout differs per rank and per step, reproducibly."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order (equal iff bitwise equal)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, state: TrainState,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.cpu().contiguous() for n, t in trainable_tensors(model).items()}
    save_file(tensors, str(directory / ADAPTER_FILE), metadata={"format": "pt"})
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:  # fp16: the loss scale and its growth tracker, or a resume would re-learn them
        blob["scaler"] = scaler.state_dict()
    torch.save(blob, directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))


def load_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler,
                    scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Restore trainable tensors, optimizer and scheduler in place; return the saved `TrainState`.

    Refuses a checkpoint whose tensors do not match the model's trainable parameters exactly
    (another LoRA config), naming the keys and the file.
    """
    path = directory / ADAPTER_FILE
    saved = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match this model's adapter: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]} (was the LoRA config changed?)")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.copy_(saved[name])
    blob = torch.load(directory / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None:
        if "scaler" not in blob:
            raise ValueError(f"checkpoint {directory / OPTIMIZER_FILE} has no gradient-scaler state: it was "
                             "not written by an fp16 run (train.precision changed?)")
        scaler.load_state_dict(blob["scaler"])
    return TrainState(**json.loads((directory / STATE_FILE).read_text()))

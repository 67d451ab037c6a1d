"""What DDP sends over the network, counted: gradient all-reduces and the start-up broadcast.

A LoRA worker's claim is that only adapter gradients cross the network. Two places can break it:

- the gradient all-reduce: DDP buckets only parameters with `requires_grad`, so a base frozen
  *before* wrapping never enters a bucket. A comm hook sees every bucket, so counting there
  measures exactly what is all-reduced (`allreduce_hook` / `bf16_allreduce_hook`).
- the start-up broadcast: DDP's `init_sync` broadcasts every parameter and buffer from rank 0,
  frozen base included (the whole model, gigabytes for a 7B base). Every rank loads the same base
  from the same files, so `ignore_frozen_state` tells DDP to skip frozen parameters and all buffers;
  only the adapter (seeded identically anyway) is broadcast. Comm hooks cannot see broadcasts, so
  `count_broadcasts` wraps the collective DDP calls for it.

Bytes are those handed to the collective on one rank (payload, not wire traffic: a ring all-reduce
moves about 2x(n-1)/n of it per rank).
"""

# No `from __future__ import annotations`: DDP checks the hooks' annotations at registration
# (`bucket: dist.GradBucket`, returning `torch.futures.Future[torch.Tensor]`) and strings fail it.
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class CommStats:
    """Running totals for one rank. Read differences of `allreduce_bytes` to get per-step bytes."""

    allreduce_bytes: int = 0
    allreduce_calls: int = 0
    broadcast_bytes: int = 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def allreduce_hook(stats: CommStats, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default mean all-reduce, counting the bucket's bytes."""
    buffer = bucket.buffer()
    stats.allreduce_bytes += tensor_bytes([buffer])
    stats.allreduce_calls += 1
    buffer.div_(dist.get_world_size())  # divide first, as DDP does, so the sum is the mean
    return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])


def bf16_allreduce_hook(stats: CommStats, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's bf16 compression (same math as `bf16_compress_hook`), counting the compressed tensor.

    Gradients travel as bf16 (half the bytes of fp32) and are cast back into the fp32 bucket, so
    the optimizer and the adapters stay fp32. Works over gloo and NCCL.
    """
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size())
    stats.allreduce_bytes += tensor_bytes([compressed])
    stats.allreduce_calls += 1

    def decompress(fut: torch.futures.Future) -> torch.Tensor:
        return buffer.copy_(fut.value()[0])  # in place: no second fp32 copy of the bucket

    return dist.all_reduce(compressed, async_op=True).get_future().then(decompress)


HOOKS = {"none": allreduce_hook, "bf16": bf16_allreduce_hook}


def register_counting_hook(ddp_model: nn.Module, stats: CommStats, compression: str = "none") -> None:
    """Install the counting hook on a DDP-wrapped model (no-op for an unwrapped one: 1 worker)."""
    if compression not in HOOKS:
        raise ValueError(f"grad_compression must be one of {sorted(HOOKS)}, got {compression!r}")
    if isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        ddp_model.register_comm_hook(stats, HOOKS[compression])


def ignore_frozen_state(model: nn.Module) -> list[str]:
    """Tell DDP (before wrapping) to skip frozen parameters and all buffers. Returns those names.

    Invariant this relies on: every rank built the same frozen base (same files, same seed), so
    there is nothing to synchronise; buffers (rotary frequencies, position ids) are computed from
    the config. Skipping buffers also stops DDP re-broadcasting them before every forward.
    """
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    names += [n for n, _ in model.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@contextlib.contextmanager
def count_broadcasts(stats: CommStats) -> Iterator[None]:
    """Count the bytes of `dist._broadcast_coalesced` calls (DDP's parameter/buffer sync) in scope.

    DDP's `_sync_module_states` resolves `dist._broadcast_coalesced` at call time, so replacing the
    module attribute for the duration of `prepare_model` sees every start-up broadcast.
    """
    original = dist._broadcast_coalesced

    def counted(process_group, tensors, buffer_size, src=0):
        stats.broadcast_bytes += tensor_bytes(tensors)
        return original(process_group, tensors, buffer_size, src)

    dist._broadcast_coalesced = counted
    try:
        yield
    finally:
        dist._broadcast_coalesced = original

"""The LoRA "down" half, `h = dropout(x) @ A.T`, done cheaply.

Two things make PEFT's LoRA slower than it needs to be on CPU (ANCHOR_FIGURES.md): every adapted
module draws its own dropout mask (`bernoulli_` on a float tensor, then a divide and a multiply, and
the float noise is kept for backward), and every module runs its own thin `x @ A.T` matmul.

1. `lora_down` draws the mask as 16-bit integers from 64-bit random words (a quarter of the
   generator calls) and keeps a bool mask for backward instead of float noise. The drop
   probability is rounded to a multiple of 1/65536 (0.05 -> 0.0500030...), and kept activations
   are scaled by 1 / (1 - that probability), so the expectation is still exact.
2. `SiblingGroup`: modules that the model calls on the *same* input tensor (q/k/v, gate/up) compute
   `dropout(x) @ cat(A_q, A_k, A_v).T` once, on the first sibling's call, and the others take their
   slice. **The siblings therefore share one dropout mask** (PEFT draws one per module): each
   module's branch still sees standard dropout; only the masks of q/k/v (or gate/up) are no longer
   independent of each other. Gradients are exact for the computation performed.

Siblings are recognised by the input tensor's identity (and its in-place version counter), never
assumed: if a model calls them on different tensors, each computes its own `h`. The plan is the
same on every call, so non-reentrant gradient checkpointing recomputes exactly what the forward did
(the RNG state is restored by checkpoint, hence the same mask), and every A receives a gradient (DDP).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask (True = keep) with P(drop) = round(p * 65536) / 65536, and the matching scale."""
    drop_levels = min(max(round(p * _LEVELS), 1), _LEVELS - 1)
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    uniform16 = words.view(torch.int16)[:n].view(shape)  # 4 independent uniform int16 per word
    keep = uniform16 >= (drop_levels - _LEVELS // 2)
    return keep, _LEVELS / (_LEVELS - drop_levels)


class _DropoutLinear(torch.autograd.Function):
    """`F.linear(dropout(x), weight)` saving (dropped x, bool mask) rather than float noise."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = keep_mask(x.shape, p, x.device)
        dropped = (x * scale).masked_fill_(~keep, 0)
        ctx.scale = scale
        ctx.save_for_backward(dropped, keep, weight)
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        dropped, keep, weight = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h.to(weight.dtype) @ weight).mul_(ctx.scale).masked_fill_(~keep, 0)
            grad_x = grad_x.to(dropped.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_h.t().to(dropped.dtype) @ dropped).to(weight.dtype)
        return grad_x, grad_w, None


def lora_down(x: torch.Tensor, weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`dropout(x) @ weight.T` for x (T, in), weight (k, in) -> (T, k); no dropout op when p == 0."""
    if p > 0 and training and torch.is_grad_enabled():
        return _DropoutLinear.apply(x, weight, p)
    if p > 0 and training:
        keep, scale = keep_mask(x.shape, p, x.device)
        x = (x * scale).masked_fill_(~keep, 0)
    return F.linear(x, weight)


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (..., in) as (T, in) in the adapter's dtype. Under autocast the cast is skipped: the matmul
    casts anyway, and an fp32 copy of x would only cost memory (AgileRL PR #623)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if torch.is_autocast_enabled(x.device.type) else x2d.to(dtype)


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version  # inference tensors have no version counter


class SiblingGroup:
    """LoRA layers called on one shared input tensor; computes their down projections together.

    `members` are `LoraLinear`s with equal `in_features`, `r`, dropout and adapter dtype. The group
    keeps at most one pending result: a weak reference to the input, its version, the per-member
    slices `h_i` (T, r) and the members still to collect theirs. Not thread-safe across threads that
    share one module instance, but never wrong: a mismatch only means recomputation.
    """

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)
        self._pending: tuple[weakref.ref, int, tuple[torch.Tensor, ...], set[int]] | None = None

    def down(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`h` (T, r) for `member` on input `x` (..., in), T = x.numel() // in."""
        index = self.members.index(member)
        pending = self._pending
        if pending is not None:
            ref, version, slices, waiting = pending
            if ref() is x and version == _version(x) and index in waiting:
                waiting.discard(index)
                if not waiting:
                    self._pending = None
                return slices[index]
        weight = torch.cat([m.lora_A.weight for m in self.members])  # (k * r, in)
        x2d = adapter_input(x, weight.dtype)
        slices = lora_down(x2d, weight, member.dropout, member.training).split(member.r, dim=1)
        self._pending = (weakref.ref(x), _version(x), slices, set(range(len(self.members))) - {index})
        return slices[index]

    def __getstate__(self):  # pickling / deepcopy: the pending result is per-forward scratch
        return {"members": self.members, "_pending": None}

"""Sibling LoRA layers (q/k/v, gate/up) that the model calls on the same input tensor.

The first sibling called computes `dropout(x) @ cat(A_q, A_k, A_v).T` once and the others take
their slice: one thin matmul instead of three, one dropout draw instead of three, one record of
the drops kept for backward instead of three. **The siblings therefore share one dropout mask** (PEFT
draws one per module): each module's branch still sees standard dropout; only the masks of q/k/v
(or gate/up) are no longer independent of each other. Gradients are exact for the computation
performed.

Siblings are recognised by the input tensor's identity (and its in-place version counter), never
assumed: if a model calls them on different tensors (cross-attention k/v), each computes its own
`h`. The plan is the same on every call, so non-reentrant gradient checkpointing recomputes exactly
what the forward did (checkpoint restores the RNG state, hence the same mask), and every A receives
a gradient (DDP).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .ops import lora_down


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
        slices = lora_down(x, weight, member.dropout, member.training).split(member.r, dim=1)
        self._pending = (weakref.ref(x), _version(x), slices, set(range(len(self.members))) - {index})
        return slices[index]

    def __getstate__(self):  # pickling / deepcopy: the pending result is per-forward scratch
        return {"members": self.members, "_pending": None}

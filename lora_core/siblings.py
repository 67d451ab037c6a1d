"""Sibling LoRA layers (q/k/v, gate/up) that the model calls on the same input tensor.

The first sibling called computes every sibling's output in one `lora_forward`: one dropout draw
and one thin matmul `dropout(x) @ cat(A_q, A_k, A_v).T` instead of three, and one autograd node
whose backward forms x's gradient in one buffer. The others collect their output. **The siblings
therefore share one dropout mask** (PEFT draws one per module): each module's branch still sees
standard dropout; only the masks of q/k/v (or gate/up) are no longer independent of each other.
Gradients are exact for the computation performed.

Siblings are recognised by the input tensor's identity (and its in-place version counter), never
assumed: a sibling called on another tensor than the one its group computed for (cross-attention
k/v, or an input changed in place) computes its own output alone (the group's output for it is
then wasted work: one base matmul per such call), and the next call of a sibling
that has already collected starts a new round. The plan depends only on the order and inputs of
the calls, so non-reentrant gradient checkpointing recomputes exactly what the forward did
(checkpoint restores the RNG state, hence the same mask), and every A receives a gradient (DDP).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .ops import lora_forward


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version  # inference tensors have no version counter


class SiblingGroup:
    """LoRA layers called on one shared input tensor; computes their outputs together.

    `members` are `LoraLinear`s with equal `in_features`, dropout and adapter dtype. The group
    keeps at most one pending result: a weak reference to the input, its version, the members'
    outputs and the members still to collect theirs. Not thread-safe across threads that share
    one module instance, but never wrong: a mismatch only means recomputation.
    """

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)
        self._pending: tuple[weakref.ref, int, tuple[torch.Tensor, ...], set[int]] | None = None

    def forward(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`member`'s output (T, out) on input `x` (..., in), T = x.numel() // in."""
        index = self.members.index(member)
        pending = self._pending
        if pending is not None and index in pending[3]:
            ref, version, outs, waiting = pending
            if ref() is x and version == _version(x):
                waiting.discard(index)
                if not waiting:
                    self._pending = None
                return outs[index]
            return lora_forward(x, [member])[0]  # another input than its siblings': alone
        if any(m.merged or m.disabled or m.training != member.training for m in self.members):
            self._pending = None
            return lora_forward(x, [member])[0]
        outs = lora_forward(x, self.members)
        waiting = set(range(len(self.members))) - {index}
        self._pending = (weakref.ref(x), _version(x), outs, waiting) if waiting else None
        return outs[index]

    def __getstate__(self):  # pickling / deepcopy: the pending result is per-forward scratch
        return {"members": self.members, "_pending": None}

"""Optional fast path for `LoraLinear.forward`: the LoRA layers that read one input (a layer alone,
or siblings such as q/k/v) computed together in one autograd node. It computes the reference formula
of `layers.py`, with the scale 1 / (1 - p) applied to h instead of to dropout(x):

    h     = dropout(x) @ cat(A_1 .. A_k).T          x (T, in), A_i (r_i, in) -> h (T, sum r_i)
    out_i = base_i(x) + scaling_i * (h_i @ B_i.T + b_L_i)   (T, out_i), in place on base_i(x)

When it runs (`applies`): the switch is on (the default), x is on the CPU and autocast is off. That
is where it was measured to win: a SmolLM2-135M training step, fp32 or bf16 base, runs faster than on
the reference path, which runs at PEFT's speed (bench/results/lora_step.md, "Fast path vs reference
path"). Under autocast this module used to run plain ops in autocast's dtype, i.e. the reference
arithmetic, so the reference runs there; CUDA was never measured, so the reference (PEFT's
arithmetic) runs there too, and the code below is CPU-only (drop positions, not a device mask).

Switch: `set_enabled(False)` process-wide, `set_enabled(False, model)` for one model's layers,
`with use_fused(False[, model]): ...` for a block, or LORAFLOW_FUSED_LORA=0 in the environment (read
at import: processes you do not start yourself, such as Ray workers).

What it does that plain autograd does not:
- dropout draws the gaps between dropped elements (`drop_positions`: geometric, p * numel uniforms
  instead of numel) and keeps their positions as int32 for backward, not a float mask; it zeroes
  them in a copy of x and scales h (T, sum r_i), not x.
- backward keeps x, the model's own tensor, and rebuilds dropout(x) as a temporary. Where autograd
  already keeps both factors of x = a * b (a gated MLP's down_proj input), it keeps those instead
  and recomputes the product (`product_factors`).
- one node computes the base products too, so x's gradient is formed in one buffer: the LoRA part,
  then each grad_i @ W_i accumulated into it by the matmul (beta = 1). Autograd would sum k + 1
  separate (T, in) gradients in extra passes.
- the thin products of backward run in the transposed layout BLAS is fast at (the rank as the
  output's major dimension), and the scaling and the add are folded into one in-place addmm.
- siblings (`SiblingGroup`) run one dropout draw and one matmul with cat(A_q, A_k, A_v), hence
  **share one dropout mask**: each branch still sees standard dropout, but the masks of q, k and v
  are not independent of each other as they are on the reference path (and in PEFT).
Gradients are exact for the computation performed: test_lora_fused.py gradchecks the node, and
test_lora_fused_vs_reference.py holds outputs and gradients equal to the reference path's under
the same mask.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ENV_VAR = "LORAFLOW_FUSED_LORA"


def _env_switch(value: str | None) -> bool:
    """The switch as LORAFLOW_FUSED_LORA sets it: unset or 1/true/on/yes: on; 0/false/off/no: off."""
    word = (value or "1").strip().lower()
    if word not in ("1", "true", "on", "yes", "0", "false", "off", "no"):
        raise ValueError(f"{ENV_VAR}={value!r}: expected 1 (fast path on) or 0 (off)")
    return word in ("1", "true", "on", "yes")


_enabled = _env_switch(os.environ.get(ENV_VAR))


def enabled() -> bool:
    """The process-wide switch (a model's layers can still be off: `set_enabled(False, model)`)."""
    return _enabled


def set_enabled(on: bool, model: nn.Module | None = None) -> None:
    """Switch the fast path process-wide (not per thread), or for the LoRA layers of `model` only.
    A layer takes it when both are on and `applies` holds."""
    global _enabled
    if model is None:
        _enabled = bool(on)
    for layer in _lora_layers(model):
        layer.fast_path = bool(on)


@contextmanager
def use_fused(on: bool, model: nn.Module | None = None) -> Iterator[None]:
    """`set_enabled(on, model)` for the block; the previous settings come back afterwards."""
    before = [(layer, layer.fast_path) for layer in _lora_layers(model)]
    was = _enabled
    set_enabled(on, model)
    try:
        yield
    finally:
        if model is None:
            set_enabled(was)
        for layer, flag in before:
            layer.fast_path = flag


def _lora_layers(model: nn.Module | None) -> list[nn.Module]:
    from .layers import LoraLinear  # here, not at the top: layers imports this module

    return [] if model is None else [m for m in model.modules() if isinstance(m, LoraLinear)]


def applies(layer: nn.Module, x: torch.Tensor) -> bool:
    """Does `layer` (a `LoraLinear`) compute its output on `x` here rather than by the formula?"""
    return _enabled and layer.fast_path and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s output (..., out) on x (..., in), with its siblings if it has any."""
    group = layer.siblings
    out = group.forward(layer, x) if group is not None else lora_forward(x, [layer])[0]  # (T, out)
    return out.view(*x.shape[:-1], layer.out_features)


def drop_positions(n: int, p: float, generator: torch.Generator | None = None,
                   batch: int | None = None) -> torch.Tensor:
    """The sorted flat indices (int64) of the elements dropout zeroes among n, each independently
    with probability p, drawn from `generator` (default: the global CPU generator)."""
    # Gap g = floor(log(1 - u) / log(1 - p)) has P(g >= k) = (1 - p)^k: the number of kept elements
    # before the next drop. float64 uniforms make that exact to 2^-53. `batch` (gaps per draw) is
    # for tests: by default one draw covers all n but once in ~1e9 calls.
    log_keep = math.log1p(-p)
    chunks, start = [], 0
    while start < n:
        expected = (n - start) * p
        count = batch or int(expected + 6 * math.sqrt(expected) + 16)
        u = torch.rand(count, dtype=torch.float64, generator=generator)
        gaps = torch.log1p(u.neg_()).div_(log_keep).clamp_(max=n).to(torch.int64)
        positions = gaps.add_(1).cumsum_(0).add_(start - 1)
        end = int(torch.searchsorted(positions, n))
        chunks.append(positions[:end])
        if end < count:
            break
        start = int(positions[-1]) + 1
    if len(chunks) == 1:
        return chunks[0]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """The bool mask (True = keep) that the fast path's dropout draws next from the global CPU
    generator for a tensor of `shape`, and the scale 1 / (1 - p) applied to kept values."""
    keep = torch.ones(shape, dtype=torch.bool)
    keep.view(-1)[drop_positions(shape.numel(), p)] = False
    return keep, 1 / (1 - p)


def _zero_drops_(t: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    t.view(-1).index_fill_(0, drops, 0)  # t contiguous
    return t


def product_factors(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(a, b), detached, when autograd recorded x = a * b with a, b and x of one shape and dtype and
    keeps both a and b for that product's own backward (act(gate) * up, the input of a gated MLP's
    down_proj, when gate and up are trained). Keeping those instead of x saves x's bytes, and
    a * b recomputed in backward is bitwise x. () otherwise, and while saved-tensor hooks are active
    (activation checkpointing, offloading): reading a saved tensor would run their unpack hook."""
    fn = x.grad_fn
    if fn is None or fn.name() != "MulBackward0" or _saved_tensor_hooks_active():
        return ()
    try:
        factors = (fn._saved_self, fn._saved_other)
    except RuntimeError:  # a factor was modified in place since: its backward would fail anyway
        return ()
    if any(t is None or t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous() for t in factors):
        return ()
    return tuple(t.detach() for t in factors)


def _saved_tensor_hooks_active() -> bool:
    # torch has no public query for this; the private one is what saved_tensors_hooks pushes onto.
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _dropped(x: torch.Tensor, drops: torch.Tensor | None, dtype: torch.dtype, owned: bool = False) -> torch.Tensor:
    """dropout(x) without the scale, in `dtype`: x itself when nothing drops and the dtype agrees,
    otherwise a new contiguous tensor (or x changed in place when the caller `owned` it)."""
    if drops is None:
        return x.to(dtype)
    if not (owned and x.dtype == dtype and x.is_contiguous()):
        x = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format).copy_(x)
    return _zero_drops_(x, drops)


class _LoraGroup(torch.autograd.Function):
    """Every output of the LoRA layers that read one input x (T, in), in one autograd node.

    Keeps for backward x itself or the factors of x = a * b (`product_factors`), h (T, k * r), and
    the drop positions as int32 (p * 4 bytes per element of x). Backward rebuilds dropout(x).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _Plan, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_tensors = _PER_BRANCH * len(plan.branches)
        branches, factors = _branches(plan, tensors), tensors[n_tensors:]
        drops = drop_positions(x.numel(), plan.p) if plan.p > 0 else None
        lora_a = _cat_a(branches)
        h, outs = _group_outputs(x, drops, plan, branches, lora_a)
        kept = () if drops is None else (drops.int() if x.numel() < 2**31 else drops,)
        ctx.plan, ctx.x_dtype = plan, x.dtype
        ctx.save_for_backward(*(factors or (x,)), h, lora_a, *tensors[:n_tensors], *kept)
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        plan = ctx.plan
        n_sources, n_tensors = max(plan.n_factors, 1), _PER_BRANCH * len(plan.branches)
        saved = ctx.saved_tensors
        sources, (h, lora_a) = saved[:n_sources], saved[n_sources:n_sources + 2]
        branches = _branches(plan, saved[n_sources + 2:n_sources + 2 + n_tensors])
        kept = saved[n_sources + 2 + n_tensors:]
        drops = kept[0].long() if kept else None
        needs = ctx.needs_input_grad[2:]  # per branch: weight, bias, lora_A, lora_B, lora_bias
        need_a = any(needs[_PER_BRANCH * i + 2] for i in range(len(branches)))
        need_x = ctx.needs_input_grad[0]
        x = None
        if need_a or any(needs[_PER_BRANCH * i] for i in range(len(branches))):
            x = torch.mul(*sources) if plan.n_factors else sources[0]

        out_grads: list[torch.Tensor | None] = [None] * n_tensors
        grad_ht = h.new_empty(h.shape[1], h.shape[0]) if (need_a or need_x) else None  # (k * r, T)
        offset = 0
        for i, ((_, bias, _, lora_b, lora_bias), (scaling, transposed, r)) in enumerate(
                zip(branches, plan.branches)):
            g, j = grads[i], _PER_BRANCH * i
            g_lora = g.to(h.dtype)
            if grad_ht is not None:  # (r, out) @ (out, T): the fast BLAS layout for a thin result
                torch.mm(lora_b.t() * scaling, g_lora.t(), out=grad_ht[offset:offset + r])
            if needs[j + 3]:
                out_grads[j + 3] = ((h[:, offset:offset + r].t() * scaling) @ g_lora).t()
            if lora_bias is not None and needs[j + 4]:
                out_grads[j + 4] = g_lora.sum(0).mul_(scaling)
            if bias is not None and needs[j + 1]:
                out_grads[j + 1] = g.sum(0, dtype=bias.dtype)
            if needs[j]:  # a trained base weight: not LoRA's normal use, but exact
                out_grads[j] = x.t() @ g if transposed else g.t() @ x
            offset += r
        if grad_ht is not None and plan.p > 0:
            grad_ht.mul_(1 / (1 - plan.p))
        if need_a:  # first: x's gradient can then reuse the temporary's memory
            dropped = _dropped(x, drops, plan.dtype, owned=bool(plan.n_factors))
            grad_a = (grad_ht.to(dropped.dtype) @ dropped).to(lora_a.dtype)  # (k * r, in)
            del x, dropped
            for i, part in enumerate(grad_a.split([r for _, _, r in plan.branches])):
                if needs[_PER_BRANCH * i + 2]:
                    out_grads[_PER_BRANCH * i + 2] = part
        grad_x = None
        if need_x:
            grad_x = grad_ht.t() @ lora_a
            if drops is not None:
                _zero_drops_(grad_x, drops)
            grad_x = grad_x.to(ctx.x_dtype)
            for g, (weight, *_), (_, transposed, _) in zip(grads, branches, plan.branches):
                grad_x.addmm_(g.to(grad_x.dtype), weight.t() if transposed else weight)
        return (grad_x, None, *out_grads) + (None,) * plan.n_factors


class _Plan(NamedTuple):
    p: float                                    # dropout probability (0: none)
    dtype: torch.dtype                          # the LoRA branch's compute dtype (the adapter's)
    branches: tuple[tuple[float, bool, int], ...]  # per layer: scaling, transposed base weight, r
    n_factors: int                              # 2 when x's factors are kept instead of x


_PER_BRANCH = 5  # base weight, base bias, lora_A, lora_B, lora_B bias


def _branches(plan: _Plan, tensors) -> list[tuple]:
    return [tuple(tensors[_PER_BRANCH * i:_PER_BRANCH * (i + 1)]) for i in range(len(plan.branches))]


def _cat_a(branches) -> torch.Tensor:
    return branches[0][2] if len(branches) == 1 else torch.cat([b[2] for b in branches])


def _base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if bias is not None and bias.dtype != weight.dtype:  # a trained base bias, kept fp32 (inject.py)
        return _base(x, weight, None, transposed).add_(bias.to(weight.dtype))
    if transposed:  # transformers' Conv1D: weight (in, out)
        return torch.addmm(bias, x, weight) if bias is not None else x @ weight
    return F.linear(x, weight, bias)


def _group_outputs(x, drops, plan: _Plan, branches, lora_a) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """h (T, k * r) and every branch's output, as the module docstring defines them."""
    h = F.linear(_dropped(x, drops, plan.dtype), lora_a)
    if plan.p > 0:
        h.mul_(1 / (1 - plan.p))
    outs, offset = [], 0
    for (weight, bias, _, lora_b, lora_bias), (scaling, transposed, r) in zip(branches, plan.branches):
        out = _base(x, weight, bias, transposed)
        acc = out if out.dtype == h.dtype else out.to(h.dtype)  # bf16 base: sum in fp32, round once
        acc.addmm_(h[:, offset:offset + r], lora_b.t(), alpha=scaling)
        if lora_bias is not None:
            acc.add_(lora_bias, alpha=scaling)
        outs.append(acc if acc is out else acc.to(out.dtype))
        offset += r
    return h, tuple(outs)


def lora_forward(x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """The outputs (T, out_i) of LoRA `layers` (`LoraLinear`s with equal in_features, dropout and
    training mode) on one CPU input x (..., in), T = x.numel() // in; not under autocast.

    Under autograd one `_LoraGroup` node; without gradients the same arithmetic, nothing kept.
    """
    first = layers[0]
    x2d = x.reshape(-1, x.shape[-1])
    p = first.dropout if first.training else 0.0
    tensors = []
    for layer in layers:
        base = layer.base_layer
        tensors += [base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, layer.lora_B.bias]
    plan = _Plan(p, first.lora_A.weight.dtype,
                 tuple((layer.scaling, layer.fan_in_fan_out, layer.r) for layer in layers), 0)
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        factors = tuple(f.view(x2d.shape) for f in product_factors(x))
        return _LoraGroup.apply(x2d, plan._replace(n_factors=len(factors)), *tensors, *factors)
    drops = drop_positions(x2d.numel(), p) if p > 0 else None
    branches = _branches(plan, tensors)
    return _group_outputs(x2d, drops, plan, branches, _cat_a(branches))[1]


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version  # inference tensors have no version counter


class SiblingGroup:
    """Sibling LoRA layers (q/k/v, gate/up: `targets.SIBLING_NAMES`) that the model calls on the same
    input tensor. The first one called computes every member's output in one `lora_forward`; the
    others collect theirs.

    Siblings are recognised by the input tensor's identity and in-place version counter, never
    assumed: a member called on another tensor (cross-attention k/v, an input changed in place)
    computes its own output alone (the group's output for it was then wasted work), and a call of a
    member that has already collected starts a new round. The plan depends only on the order and
    inputs of the calls, so non-reentrant checkpointing recomputes exactly what the forward did (it
    restores the RNG state: the same mask), and every A receives a gradient (DDP).

    `members` are `LoraLinear`s with equal `in_features`, dropout and adapter dtype. At most one
    pending result is kept: a weak reference to the input, its version, the outputs and the members
    still to collect theirs. Not thread-safe across threads sharing one module, but never wrong: a
    mismatch only means recomputation.
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
        if any(m.merged or m.disabled or not m.fast_path or m.training != member.training for m in self.members):
            self._pending = None
            return lora_forward(x, [member])[0]
        outs = lora_forward(x, self.members)
        waiting = set(range(len(self.members))) - {index}
        self._pending = (weakref.ref(x), _version(x), outs, waiting) if waiting else None
        return outs[index]

    def __getstate__(self):  # pickling / deepcopy: the pending result is per-forward scratch
        return {"members": self.members, "_pending": None}

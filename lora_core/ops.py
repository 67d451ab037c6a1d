"""The LoRA forward of one layer, or of sibling layers that read one input, as one autograd node.

    h     = dropout(x) @ cat(A_1 .. A_k).T / (1 - p)      x (T, in), A_i (r_i, in) -> h (T, sum r_i)
    out_i = base_i(x) + scaling_i * (h_i @ B_i.T + b_L_i)  in place on the base output (T, out_i)

Why not plain autograd (what PEFT runs, ANCHOR_FIGURES.md: LoRA forward 1.5-1.7x the full one):
- CPU dropout (`bernoulli_` on a float tensor, divide, multiply) draws one random number per
  element from a serial generator and keeps a float mask for backward. `draw_drops` draws the gaps
  between dropped elements instead (geometric, p * numel float64 uniforms: 20x fewer at p = 0.05)
  and zeroes those positions in a copy of x; P(drop) is p itself and kept values are scaled by
  1 / (1 - p), applied to h (T, k), not x.
- backward keeps x, not a dropped copy: x is the model's own tensor, while a copy would cost T x in
  more and leave x's memory as a hole in the heap. Of the drops it keeps their positions as int32
  (p * 4 bytes per element, 1/20 of x's fp32 bytes at p = 0.05; no dense mask) and rebuilds
  dropout(x) as a temporary.
  Where autograd already keeps the two factors of x = a * b (gated MLPs: down_proj's input is
  act(gate) * up), the node keeps those instead of x and recomputes the product (`product_factors`).
- one node computes the base products too, so backward forms x's gradient in one buffer: the LoRA
  part first, then each `grad_i @ W_i` accumulated into it by the matmul itself (beta = 1). Plain
  autograd sums k + 1 separate (T, in) gradients (q, k, v and the LoRA branch) in extra passes.
- autograd's addmm backward forms `grad @ B` and `grad.T @ h` with the rank as the output's
  minor dimension, a BLAS layout 3-4x slower than the transposed products used here (measured:
  512x576 @ 576x8 takes 220 us, (8x576 @ 576x512).T 67 us on one core).
- the scaling and the add are folded into one in-place addmm: no separate scale and add passes,
  and no (T, out) temporary.
Gradients are exact for the computation performed (tests compare them with PEFT's and gradcheck
them, the base weight's and bias's included). Under autocast the same arithmetic runs as plain
differentiable ops in autocast's dtype, as PEFT's does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """The bool mask (True = keep) that the LoRA dropout draws next from the default generator for a
    tensor of `shape`, and the scale 1 / (1 - p) applied to kept values."""
    drops = draw_drops(shape, p, device)
    if drops.dtype == torch.bool:
        return ~drops, 1 / (1 - p)
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    keep.view(-1)[drops] = False
    return keep, 1 / (1 - p)


def draw_drops(shape: torch.Size, p: float, device: torch.device,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Which elements of a tensor of `shape` dropout zeroes, each independently with probability p.

    CPU: the sorted flat indices (int64) of the dropped elements, drawn as geometric gaps between
    drops. Elsewhere a bool mask (True = drop): a GPU draws numel uniforms cheaply, and the gaps
    would need host synchronisation.
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device, generator=generator) < p
    return _drop_positions(shape.numel(), p, generator)


def _drop_positions(n: int, p: float, generator: torch.Generator | None, batch: int | None = None) -> torch.Tensor:
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


def zero_drops_(t: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous) with the elements `drops` (from `draw_drops`) set to 0, in place."""
    if drops.dtype == torch.bool:
        return t.masked_fill_(drops, 0)
    t.view(-1).index_fill_(0, drops, 0)
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


def _default_generator(device: torch.device) -> torch.Generator | None:
    """The generator to save and redraw a dense mask from (CUDA); None: keep the drops themselves
    (CPU: sparse positions, smaller than a generator state at these sizes; other backends)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return None


def _dropped(x: torch.Tensor, drops: torch.Tensor | None, dtype: torch.dtype, owned: bool = False) -> torch.Tensor:
    """dropout(x) without the scale, in `dtype`: x itself when nothing drops and the dtype agrees,
    otherwise a new contiguous tensor (or x changed in place when the caller `owned` it)."""
    if drops is None:
        return x.to(dtype)
    if not (owned and x.dtype == dtype and x.is_contiguous()):
        x = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format).copy_(x)
    return zero_drops_(x, drops)


class _LoraGroup(torch.autograd.Function):
    """Every output of the LoRA layers that read one input x (one layer, or siblings such as
    q/k/v), as the module docstring defines them, in one autograd node.

    Keeps for backward x itself, or the factors of x = a * b (`product_factors`), h (T, k * r), and
    the drops: on CPU their positions as int32 (p * 4 bytes per element of x), elsewhere the
    generator state to redraw the mask from. Backward rebuilds dropout(x) for A's gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _Plan, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        branches = _branches(plan, tensors)
        factors = tensors[_PER_BRANCH * len(plan.branches):]
        drops, kept, ctx.rng_state = None, [], None
        if plan.p > 0:
            generator = _default_generator(x.device)
            ctx.rng_state = generator.get_state() if generator is not None else None
            drops = draw_drops(x.shape, plan.p, x.device)
            if ctx.rng_state is None:
                kept = [drops.int() if drops.dtype == torch.int64 and x.numel() < 2**31 else drops]
        lora_a = _cat_a(branches)
        h, outs = _group_outputs(x, drops, plan, branches, lora_a)
        ctx.plan, ctx.x_dtype, ctx.x_shape = plan, x.dtype, x.shape
        ctx.save_for_backward(*(factors or (x,)), h, lora_a, *tensors[:_PER_BRANCH * len(plan.branches)], *kept)
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        plan = ctx.plan
        n_sources, n_tensors = max(plan.n_factors, 1), _PER_BRANCH * len(plan.branches)
        saved = ctx.saved_tensors
        sources, (h, lora_a) = saved[:n_sources], saved[n_sources:n_sources + 2]
        tensors = saved[n_sources + 2:n_sources + 2 + n_tensors]
        kept = saved[n_sources + 2 + n_tensors:]
        branches = _branches(plan, tensors)
        needs = ctx.needs_input_grad[2:]  # per branch: weight, bias, lora_A, lora_B, lora_bias
        need_a = any(needs[_PER_BRANCH * i + 2] for i in range(len(branches)))
        need_x = ctx.needs_input_grad[0]

        drops = None
        if kept:
            drops = kept[0].long() if kept[0].dtype == torch.int32 else kept[0]
        elif plan.p > 0:  # forward's draw again, from a private generator: the global stream is untouched
            generator = torch.Generator(h.device)
            generator.set_state(ctx.rng_state)
            drops = draw_drops(ctx.x_shape, plan.p, h.device, generator)

        x = None
        if need_a or any(needs[_PER_BRANCH * i] for i in range(len(branches))):
            x = torch.mul(*sources) if plan.n_factors else sources[0]

        out_grads: list[torch.Tensor | None] = [None] * n_tensors
        grad_ht = h.new_empty(h.shape[1], h.shape[0]) if (need_a or need_x) else None  # (k * r, T)
        offset = 0
        for i, ((_, bias, _, lora_b, lora_bias), (scaling, transposed, r)) in enumerate(
                zip(branches, plan.branches)):
            g = grads[i]
            g_lora = g.to(h.dtype)
            j = _PER_BRANCH * i
            if grad_ht is not None:  # (r, out) @ (out, T): the fast BLAS layout for a thin result
                torch.mm(lora_b.t() * scaling, g_lora.t(), out=grad_ht[offset:offset + r])
            if needs[j + 3]:
                out_grads[j + 3] = ((h[:, offset:offset + r].t() * scaling) @ g_lora).t()
            if lora_bias is not None and needs[j + 4]:
                out_grads[j + 4] = g_lora.sum(0).mul_(scaling)
            if bias is not None and needs[j + 1]:
                out_grads[j + 1] = g.sum(0)
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
                zero_drops_(grad_x, drops)
            grad_x = grad_x.to(ctx.x_dtype)
            for g, (weight, *_), (_, transposed, _) in zip(grads, branches, plan.branches):
                grad_x.addmm_(g.to(grad_x.dtype), weight.t() if transposed else weight)
        return (grad_x, None, *out_grads) + (None,) * plan.n_factors


class _Plan(NamedTuple):
    p: float                                    # dropout probability (0: none)
    dtype: torch.dtype                          # the LoRA branch's compute dtype
    branches: tuple[tuple[float, bool, int], ...]  # per layer: scaling, transposed base weight, r
    n_factors: int                              # 2 when x's factors are kept instead of x


_PER_BRANCH = 5  # base weight, base bias, lora_A, lora_B, lora_B bias


def _branches(plan: _Plan, tensors) -> list[tuple]:
    return [tuple(tensors[_PER_BRANCH * i:_PER_BRANCH * (i + 1)]) for i in range(len(plan.branches))]


def _cat_a(branches) -> torch.Tensor:
    return branches[0][2] if len(branches) == 1 else torch.cat([b[2] for b in branches])


def _base(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if transposed:  # transformers' Conv1D: weight (in, out)
        return torch.addmm(bias, x, weight) if bias is not None else x @ weight
    return F.linear(x, weight, bias)


def _group_outputs(x, drops, plan: _Plan, branches, lora_a) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """h (T, k * r) and every branch's output, as `_LoraGroup` defines them."""
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


def lora_forward(x: torch.Tensor, layers: Sequence) -> tuple[torch.Tensor, ...]:
    """The outputs (T, out_i) of LoRA `layers` (`LoraLinear`s with equal in_features, dropout and
    training mode) on one input x (..., in), T = x.numel() // in.

    Under autograd: one `_LoraGroup` node. Under autocast: plain differentiable ops (the matmuls in
    autocast's dtype, as PEFT). Without gradients: the same arithmetic, nothing kept.
    """
    first = layers[0]
    x2d = x.reshape(-1, x.shape[-1])
    p = first.dropout if first.training else 0.0
    tensors = []
    for layer in layers:
        base = layer.base_layer
        tensors += [base.weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, layer.lora_B.bias]
    autocast = torch.is_autocast_enabled(x.device.type)
    plan = _Plan(p, x.dtype if autocast else first.lora_A.weight.dtype,
                 tuple((layer.scaling, layer.fan_in_fan_out, layer.r) for layer in layers), 0)
    if autocast:
        return _autocast_outputs(x2d, plan, _branches(plan, tensors))
    if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors)):
        factors = tuple(f.view(x2d.shape) for f in product_factors(x))
        return _LoraGroup.apply(x2d, plan._replace(n_factors=len(factors)), *tensors, *factors)
    drops = draw_drops(x2d.shape, p, x.device) if p > 0 else None
    branches = _branches(plan, tensors)
    return _group_outputs(x2d, drops, plan, branches, _cat_a(branches))[1]


def _autocast_outputs(x2d, plan: _Plan, branches) -> tuple[torch.Tensor, ...]:
    """`_group_outputs` as out-of-place ops: autocast casts only what an op's inputs are, so the
    in-place fp32 addmm_ onto a bf16 base output would not run there; autograd keeps the rest."""
    dropped = x2d
    if plan.p > 0:
        drops = draw_drops(x2d.shape, plan.p, x2d.device)
        dropped = (x2d.masked_fill(drops, 0) if drops.dtype == torch.bool
                   else x2d.reshape(-1).index_fill(0, drops, 0).view_as(x2d))
    h = F.linear(dropped, _cat_a(branches)) * (1 / (1 - plan.p))
    outs, offset = [], 0
    for (weight, bias, _, lora_b, lora_bias), (scaling, transposed, r) in zip(branches, plan.branches):
        outs.append(_base(x2d, weight, bias, transposed) + scaling * F.linear(h[:, offset:offset + r], lora_b, lora_bias))
        offset += r
    return tuple(outs)

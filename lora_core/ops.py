"""The two halves of the LoRA branch as autograd functions that are cheap on CPU.

    down: h   = dropout(x) @ A.T                 x (T, in), A (k, in)  -> h (T, k)
    up:   out = out + scaling * (h @ B.T + b_L)   in place on the base output (T, out)

Why not plain autograd (what PEFT runs, ANCHOR_FIGURES.md: LoRA forward 1.5-1.7x the full one):
- CPU dropout (`bernoulli_` on a float tensor, divide, multiply) keeps float noise for backward
  and spends most of its time in the random generator. `drop_mask` draws 16-bit integers from
  64-bit random words (a quarter of the generator calls); the drop probability is rounded to a
  multiple of 1/65536 (0.05 -> 0.0500030) and kept values are scaled by 1 / (1 - that probability),
  so the expectation is exact. The scale is applied to h (T, k), not x. Backward keeps no mask at
  all: it redraws it from the generator state saved in forward (a copy of a few KB), which costs
  one more draw and saves T x in bytes per dropout (~96 MB per step for SmolLM2 at 4 x 256).
- autograd's addmm backward forms `grad @ B` and `grad.T @ h` with the rank as the output's
  minor dimension, a BLAS layout 3-4x slower than the transposed products used here (measured:
  512x576 @ 576x8 takes 220 us, (8x576 @ 576x512).T 67 us on one core).
- the scaling and the add are folded into one in-place addmm: no separate scale and add passes,
  and no (T, out) temporary (autograd never keeps a linear layer's output, so overwriting it is safe).
Gradients are exact for the computation performed (tests compare them with PEFT's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask (True = keep) with P(drop) = round(p * 65536) / 65536, and the matching scale."""
    drop, scale = drop_mask(shape, p, device)
    return ~drop, scale


def drop_mask(shape: torch.Size, p: float, device: torch.device,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """A bool mask (True = drop) with P(drop) = round(p * 65536) / 65536, and 1 / P(keep)."""
    drop_levels = min(max(round(p * _LEVELS), 1), _LEVELS - 1)
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)
    uniform16 = words.view(torch.int16)[:n].view(shape)  # 4 independent uniform int16 per word
    return uniform16 < (drop_levels - _LEVELS // 2), _LEVELS / (_LEVELS - drop_levels)


def _default_generator(device: torch.device) -> torch.Generator | None:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return None  # other backends: keep the mask instead of redrawing it


class _DropoutDown(torch.autograd.Function):
    """h = (x * mask) @ A.T * scale; keeps x * mask and the generator state for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        generator = _default_generator(x.device)
        ctx.rng_state = generator.get_state() if generator is not None else None
        drop, scale = drop_mask(x.shape, p, x.device)
        dropped = x.masked_fill(drop, 0)
        ctx.p, ctx.scale = p, scale
        ctx.save_for_backward(dropped, weight, *([drop] if ctx.rng_state is None else []))
        return F.linear(dropped, weight).mul_(scale)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        dropped, weight, *kept = ctx.saved_tensors
        grad_h = grad_h.to(weight.dtype) * ctx.scale  # (T, k): cheaper to scale than x
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if kept:
                drop = kept[0]
            else:  # forward's draw again, from a private generator: the global stream is untouched
                generator = torch.Generator(dropped.device)
                generator.set_state(ctx.rng_state)
                drop, _ = drop_mask(dropped.shape, ctx.p, dropped.device, generator)
            grad_x = (grad_h @ weight).masked_fill_(drop, 0).to(dropped.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_h.t().to(dropped.dtype) @ dropped).to(weight.dtype)
        return grad_x, grad_w, None


def lora_down(x: torch.Tensor, weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`dropout(x) @ weight.T` for x (T, in), weight (k, in) -> (T, k); no dropout op when p == 0
    or in eval mode."""
    if p > 0 and training:
        if torch.is_grad_enabled():
            return _DropoutDown.apply(x, weight, p)
        drop, scale = drop_mask(x.shape, p, x.device)
        return F.linear(x.masked_fill(drop, 0), weight).mul_(scale)
    return F.linear(x, weight)


class _LoraUp(torch.autograd.Function):
    """out + scaling * (h @ B.T + bias), in place on `out` when dtypes agree."""

    @staticmethod
    def forward(ctx, out, h, weight, bias, scaling: float):
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        ctx.save_for_backward(h, weight)
        if out.dtype == h.dtype:
            ctx.mark_dirty(out)
            acc = out
        else:  # low-precision base, fp32 adapter: sum in fp32, round once (as PEFT)
            acc = out.to(h.dtype)
        acc.addmm_(h, weight.t(), alpha=scaling)
        if bias is not None:
            acc.add_(bias, alpha=scaling)
        return acc if acc is out else acc.to(out.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        g = grad.to(h.dtype)
        s = ctx.scaling
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_h = ((weight.t() * s) @ g.t()).t()   # (r, out) @ (out, T): the fast layout
        if ctx.needs_input_grad[2]:
            grad_w = ((h.t() * s) @ g).t()            # (r, T) @ (T, out), as (out, r)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g.sum(0).mul_(s)
        return grad, grad_h, grad_w, grad_b, None


def lora_up(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            scaling: float) -> torch.Tensor:
    """out (T, out) + scaling * (h (T, r) @ weight (out, r).T + bias), in out's dtype."""
    if torch.is_autocast_enabled(out.device.type):
        lora = F.linear(h, weight, bias)
        return out + scaling * lora
    return _LoraUp.apply(out, h, weight, bias, scaling)


def adapter_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (..., in) as (T, in) in the adapter's dtype. Under autocast the cast is skipped: the matmul
    casts anyway, and an fp32 copy of x would only cost memory (AgileRL PR #623)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if torch.is_autocast_enabled(x.device.type) else x2d.to(dtype)

"""The two halves of the LoRA branch as autograd functions that are cheap on CPU.

    down: h   = dropout(x) @ A.T                 x (T, in), A (k, in)  -> h (T, k)
    up:   out = out + scaling * (h @ B.T + b_L)   in place on the base output (T, out)

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
  act(gate) * up), the branch keeps those instead of x and recomputes the product (`product_factors`).
- autograd's addmm backward forms `grad @ B` and `grad.T @ h` with the rank as the output's
  minor dimension, a BLAS layout 3-4x slower than the transposed products used here (measured:
  512x576 @ 576x8 takes 220 us, (8x576 @ 576x512).T 67 us on one core).
- the scaling and the add are folded into one in-place addmm: no separate scale and add passes,
  and no (T, out) temporary (autograd never keeps a linear layer's output, so overwriting it is safe).
Gradients are exact for the computation performed (tests compare them with PEFT's and gradcheck them).
"""

from __future__ import annotations

import math

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


class _LoraDown(torch.autograd.Function):
    """h = dropout(x) @ A.T for x (T, in) in the model's dtype, computed in `dtype`.

    Keeps for backward x itself, or the factors of x = a * b (`product_factors`), and the drops:
    on CPU their positions as int32 (p * 4 bytes per element of x: 0.2 at p = 0.05), elsewhere
    the generator state to redraw the mask from. Backward rebuilds dropout(x) for A's gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, dtype: torch.dtype,
                *factors: torch.Tensor) -> torch.Tensor:
        drops, kept, ctx.rng_state = None, [], None
        if p > 0:
            generator = _default_generator(x.device)
            ctx.rng_state = generator.get_state() if generator is not None else None
            drops = draw_drops(x.shape, p, x.device)
            if ctx.rng_state is None:
                kept = [drops.int() if drops.dtype == torch.int64 and x.numel() < 2**31 else drops]
        ctx.p, ctx.dtype, ctx.x_dtype, ctx.x_shape, ctx.n_factors = p, dtype, x.dtype, x.shape, len(factors)
        ctx.save_for_backward(weight, *(factors or (x,)), *kept)
        h = F.linear(_dropped(x, drops, dtype), weight)
        return h.mul_(1 / (1 - p)) if p > 0 else h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        weight, *saved = ctx.saved_tensors
        sources, kept = saved[:max(ctx.n_factors, 1)], saved[max(ctx.n_factors, 1):]
        drops = None
        if kept:
            drops = kept[0].long() if kept[0].dtype == torch.int32 else kept[0]
        elif ctx.p > 0:  # forward's draw again, from a private generator: the global stream is untouched
            generator = torch.Generator(weight.device)
            generator.set_state(ctx.rng_state)
            drops = draw_drops(ctx.x_shape, ctx.p, weight.device, generator)
        grad_h = grad_h.to(weight.dtype)
        if ctx.p > 0:
            grad_h = grad_h * (1 / (1 - ctx.p))  # (T, k): cheaper to scale than x
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:  # first: grad_x can then reuse the temporary's memory
            if ctx.n_factors:
                x, owned = torch.mul(*sources), True
            else:
                x, owned = sources[0], False
            dropped = _dropped(x, drops, ctx.dtype, owned)
            grad_w = (grad_h.t().to(dropped.dtype) @ dropped).to(weight.dtype)
            del x, dropped
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ weight
            if drops is not None:
                zero_drops_(grad_x, drops)
            grad_x = grad_x.to(ctx.x_dtype)
        return (grad_x, grad_w, None, None) + (None,) * ctx.n_factors


def _dropped(x: torch.Tensor, drops: torch.Tensor | None, dtype: torch.dtype, owned: bool = False) -> torch.Tensor:
    """dropout(x) without the scale, in `dtype`: x itself when nothing drops and the dtype agrees,
    otherwise a new contiguous tensor (or x changed in place when the caller `owned` it)."""
    if drops is None:
        return x.to(dtype)
    if not (owned and x.dtype == dtype and x.is_contiguous()):
        x = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format).copy_(x)
    return zero_drops_(x, drops)


def lora_down(x: torch.Tensor, weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`dropout(x) @ weight.T` for x (..., in) in the model's dtype, weight (k, in) -> (T, k), computed
    in the adapter's dtype (under autocast in autocast's); no dropout op when p == 0 or in eval mode.
    An autocast forward skips the cast: the matmul casts anyway, and an fp32 copy of x would only cost
    memory (AgileRL PR #623)."""
    x2d = x.reshape(-1, x.shape[-1])
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = x.dtype if autocast else weight.dtype
    p = p if training else 0.0
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and (p > 0 or not autocast):
        return _LoraDown.apply(x2d, weight, p, dtype, *(f.view(x2d.shape) for f in product_factors(x)))
    drops = draw_drops(x2d.shape, p, x.device) if p > 0 else None
    h = F.linear(_dropped(x2d, drops, dtype), weight)
    return h.mul_(1 / (1 - p)) if p > 0 else h


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

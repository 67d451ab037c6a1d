"""lora_core.ops: the sparse dropout draw and the two custom autograd functions of the LoRA branch."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from test_lora_layers import ALL_PROJ, randomize_b, tiny_llama

from lora_core import LoraConfig, adapter_parameters, apply_lora, ops
from lora_core.inject import lora_layers
from lora_core.ops import _drop_positions, _LoraDown, _LoraUp, keep_mask, lora_down, product_factors


def test_drop_positions_are_sorted_distinct_and_in_range_at_rate_p():
    n, p = 200_000, 0.05
    positions = _drop_positions(n, p, torch.Generator().manual_seed(0))
    assert positions.dtype == torch.int64
    assert bool((positions[1:] > positions[:-1]).all()) and positions[0] >= 0 and positions[-1] < n
    assert abs(positions.numel() / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_gaps_between_drops_are_geometric():
    p = 0.2
    positions = _drop_positions(400_000, p, torch.Generator().manual_seed(1))
    gaps = torch.diff(positions) - 1  # kept elements between two drops
    for k in (0, 1, 3, 8):  # P(gap >= k) = (1 - p)^k
        assert abs((gaps >= k).double().mean().item() - (1 - p) ** k) < 0.005


def test_drops_are_drawn_again_until_the_whole_tensor_is_covered():
    n, p = 50_000, 0.1
    positions = _drop_positions(n, p, torch.Generator().manual_seed(2), batch=7)  # ~700 draws of 7 gaps
    assert bool((positions[1:] > positions[:-1]).all()) and positions[-1] < n
    assert positions[-1] > n - 100  # drops reach the end, not just the first batch
    assert abs(positions.numel() / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_keep_mask_reproduces_the_draw_from_the_same_generator_state():
    torch.manual_seed(3)
    keep, scale = keep_mask(torch.Size([40, 50]), 0.3, torch.device("cpu"))
    torch.manual_seed(3)
    positions = _drop_positions(2000, 0.3, None)
    assert torch.equal(~keep.view(-1), torch.zeros(2000, dtype=torch.bool).index_fill_(0, positions, True))
    assert scale == 1 / 0.7


def _down(p: float, seed: int = 0):
    """_LoraDown with the same drops on every call (gradcheck calls it many times)."""
    def f(x, weight, *factors):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _LoraDown.apply(x, weight, p, x.dtype, *factors)
    return f


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_down_gradcheck(p):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_down(p), (x, weight))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_down_gradcheck_keeping_the_factors_of_its_input(p):
    a = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)

    def f(a, b, weight):
        return _down(p)(a * b, weight, a.detach(), b.detach())
    assert torch.autograd.gradcheck(f, (a, b, weight))


def test_lora_down_is_the_dropout_formula_with_the_mask_reproduced():
    x = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 4, dtype=torch.float64)
    torch.manual_seed(5)
    h = _LoraDown.apply(x, weight, 0.4, torch.float64)
    got = (h, *torch.autograd.grad(h, (x, weight), g))
    torch.manual_seed(5)
    keep, scale = keep_mask(x.shape, 0.4, x.device)
    h = F.linear(x * keep * scale, weight)
    want = (h, *torch.autograd.grad(h, (x, weight), g))
    for ours, ref in zip(got, want):
        torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("bias", [False, True])
def test_lora_up_gradcheck(bias):
    out = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias else None

    def f(out, h, weight, *b):
        return _LoraUp.apply(out.clone(), h, weight, b[0] if b else None, 1.7)  # clone: it works in place
    assert torch.autograd.gradcheck(f, (out, h, weight, *([b] if bias else [])))


def test_product_factors_are_the_tensors_autograd_keeps_for_the_product():
    gate, up = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    act = F.silu(gate)
    factors = product_factors(act * up)
    assert len(factors) == 2
    assert factors[0].data_ptr() == act.data_ptr() and factors[1].data_ptr() == up.data_ptr()
    assert not any(f.requires_grad for f in factors)


def test_no_product_factors_unless_autograd_keeps_both():
    gate, up = torch.randn(4, 6), torch.randn(4, 6, requires_grad=True)
    assert product_factors(F.silu(gate) * up) == ()     # act needs no gradient: up is not kept
    assert product_factors(up + up) == ()                # not a product
    assert product_factors(up * torch.randn(6)) == ()    # broadcast factor
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # checkpointing-like
        assert product_factors(up * up) == ()


def test_lora_down_does_not_keep_a_product_input_alive():
    a, b = torch.randn(8, 6, requires_grad=True), torch.randn(8, 6, requires_grad=True)
    weight = torch.randn(2, 6, requires_grad=True)
    x = a * b
    alive = weakref.ref(x)
    h = lora_down(x, weight, 0.2, training=True)
    del x
    gc.collect()
    assert alive() is None
    h.sum().backward()
    assert a.grad is not None and weight.grad is not None


def test_keeping_the_factors_changes_no_gradient_bit(monkeypatch):
    ids = torch.randint(0, 96, (2, 16))

    def run():
        model = apply_lora(tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=ALL_PROJ)).train()
        torch.manual_seed(1)
        for layer in lora_layers(model).values():
            randomize_b(layer)
        torch.manual_seed(3)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in adapter_parameters(model).items()}

    found = []
    monkeypatch.setattr(ops, "product_factors", lambda x: found.append(product_factors(x)) or found[-1])
    with_factors = run()
    assert sum(len(f) == 2 for f in found) == 2  # down_proj of both layers kept act(gate) and up
    monkeypatch.setattr(ops, "product_factors", lambda x: ())
    without = run()
    for name in with_factors:
        assert torch.equal(with_factors[name], without[name]), name


def test_lora_down_keeps_a_bf16_input_in_bf16_and_computes_in_fp32():
    x = torch.randn(7, 9).bfloat16().requires_grad_(True)
    weight = torch.randn(4, 9, requires_grad=True)
    saved = []
    torch.manual_seed(6)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = _LoraDown.apply(x, weight, 0.3, torch.float32)
    assert h.dtype == torch.float32 and not [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
    g = torch.randn(7, 4)
    got = (h, *torch.autograd.grad(h, (x, weight), g))
    torch.manual_seed(6)
    keep, scale = keep_mask(x.shape, 0.3, x.device)
    h = F.linear(x.float() * keep * scale, weight)
    want = (h, *torch.autograd.grad(h, (x, weight), g))
    for ours, ref in zip(got, want):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_dropout_on_an_empty_batch_draws_nothing_and_trains_nothing():
    x = torch.randn(0, 5, requires_grad=True)
    weight = torch.randn(2, 5, requires_grad=True)
    h = lora_down(x, weight, 0.1, training=True)
    h.sum().backward()
    assert h.shape == (0, 2) and torch.equal(weight.grad, torch.zeros(2, 5))

"""lora_core.ops: the sparse dropout draw and the LoRA group op (one layer or siblings on one input)."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from test_lora_layers import ALL_PROJ, randomize_b, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_core import LoraConfig, adapter_parameters, apply_lora, ops
from lora_core.inject import lora_layers
from lora_core.layers import LoraLinear
from lora_core.ops import _drop_positions, _LoraGroup, keep_mask, lora_forward, product_factors


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


def _layers(outs=(4, 3), ranks=(2, 3), transposed=False, lora_bias=True, p=0.0, dtype=torch.float64):
    """LoRA layers on one input width (5), every tensor trainable and B non-zero, for the group op."""
    torch.manual_seed(0)
    layers = []
    for out, r in zip(outs, ranks):
        base = Conv1D(out, 5) if transposed else nn.Linear(5, out)
        layer = LoraLinear(base, r=r, alpha=3.0, dropout=p, lora_bias=lora_bias).to(dtype)
        randomize_b(layer)
        layers.append(layer.requires_grad_(True))
    return layers


def _group_fn(layers, p: float, seed: int = 0):
    """(f, tensors): f(x, *tensors) is every layer's output via _LoraGroup, with the same drops on
    every call (gradcheck calls it many times)."""
    tensors = [t for layer in layers for t in (layer.base_layer.weight, layer.base_layer.bias, layer.lora_A.weight,
                                               layer.lora_B.weight, layer.lora_B.bias)]
    present = [i for i, t in enumerate(tensors) if t is not None]
    plan = ops._Plan(p, torch.float64, tuple((la.scaling, la.fan_in_fan_out, la.r) for la in layers), 0)

    def f(x, *args, factors=()):
        full = list(tensors)
        for i, t in zip(present, args):
            full[i] = t
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _LoraGroup.apply(x, plan._replace(n_factors=len(factors)), *full, *factors)
    return f, [tensors[i] for i in present]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("members", [1, 3])
def test_group_gradcheck(p, transposed, members):
    """Every input's gradient, the base weight's and bias's included, for one layer or three siblings
    of different widths and ranks, Linear or Conv1D, with and without dropout."""
    layers = _layers(outs=(4, 3, 2)[:members], ranks=(2, 3, 1)[:members], transposed=transposed, p=p)
    f, tensors = _group_fn(layers, p)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, *tensors))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_group_gradcheck_keeping_the_factors_of_its_input(p):
    f, tensors = _group_fn(_layers(p=p), p)
    a = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def g(a, b, *tensors):
        return f(a * b, *tensors, factors=(a.detach(), b.detach()))
    assert torch.autograd.gradcheck(g, (a, b, *tensors))


def test_group_is_the_lora_formula_with_one_mask_reproduced():
    layers = _layers(outs=(4, 3), ranks=(2, 3), p=0.4)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)]
    params = [t for layer in layers for t in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_B.bias)]
    torch.manual_seed(5)
    outs = lora_forward(x, layers)
    got = (*outs, *torch.autograd.grad(outs, (x, *params), grads))
    torch.manual_seed(5)
    keep, scale = keep_mask(x.shape, 0.4, x.device)  # one mask for both siblings
    outs = [F.linear(x, la.base_layer.weight, la.base_layer.bias)
            + la.scaling * (F.linear(F.linear(x * keep * scale, la.lora_A.weight), la.lora_B.weight) + la.lora_B.bias)
            for la in layers]
    want = (*outs, *torch.autograd.grad(outs, (x, *params), grads))
    for ours, ref in zip(got, want, strict=True):
        torch.testing.assert_close(ours, ref)


def test_siblings_outputs_come_from_one_autograd_node():
    """x's gradient is formed once for the group, not summed by autograd from one node per layer."""
    layers = _layers(outs=(4, 3, 2), ranks=(2, 2, 2), p=0.1, dtype=torch.float32)
    x = torch.randn(6, 5, requires_grad=True)
    outs = lora_forward(x, layers)
    assert len({o.grad_fn for o in outs}) == 1 and type(outs[0].grad_fn).__name__ == "_LoraGroupBackward"


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


def test_a_group_does_not_keep_a_product_input_alive():
    layers = _layers(p=0.2, dtype=torch.float32)
    a, b = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5, requires_grad=True)
    x = a * b
    alive = weakref.ref(x)
    outs = lora_forward(x, layers)
    del x
    gc.collect()
    assert alive() is None
    sum(o.sum() for o in outs).backward()
    assert a.grad is not None and all(la.lora_A.weight.grad is not None for la in layers)


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


def test_a_bf16_base_keeps_its_input_in_bf16_and_computes_the_branch_in_fp32():
    layer = _layers(outs=(4,), ranks=(3,), p=0.3, dtype=torch.float32)[0]
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(7, 5).bfloat16().requires_grad_(True)
    saved = []
    torch.manual_seed(6)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lora_forward(x, [layer])[0]
    assert out.dtype == torch.bfloat16
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()]  # no fp32 copy of x
    g = torch.randn(7, 4).bfloat16()
    params = (layer.lora_A.weight, layer.lora_B.weight)
    got = (out, *torch.autograd.grad(out, (x, *params), g))
    torch.manual_seed(6)
    keep, scale = keep_mask(x.shape, 0.3, x.device)
    base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    lora = F.linear(F.linear(x.float() * keep * scale, params[0]), params[1]) + layer.lora_B.bias
    out = (base.float() + layer.scaling * lora).bfloat16()  # summed in fp32, rounded once
    want = (out, *torch.autograd.grad(out, (x, *params), g))
    for ours, ref in zip(got, want, strict=True):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


def test_under_autocast_the_branch_runs_in_autocast_dtype_and_trains():
    layers = _layers(outs=(4, 3), ranks=(2, 2), p=0.2, dtype=torch.float32)
    x = torch.randn(6, 5, requires_grad=True)
    torch.manual_seed(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = lora_forward(x, layers)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().sum() for o in outs).backward()
    torch.manual_seed(7)
    keep, scale = keep_mask(x.shape, 0.2, x.device)
    for out, la in zip(outs, layers):
        assert la.lora_A.weight.grad is not None and la.lora_B.weight.grad.abs().sum() > 0
        want = (F.linear(x, la.base_layer.weight, la.base_layer.bias)
                + la.scaling * (F.linear(F.linear(x * keep * scale, la.lora_A.weight), la.lora_B.weight) + la.lora_B.bias))
        torch.testing.assert_close(out.float(), want.detach(), rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_dropout_on_an_empty_batch_draws_nothing_and_trains_nothing():
    layer = _layers(outs=(2,), ranks=(2,), p=0.1, dtype=torch.float32)[0]
    x = torch.randn(0, 5, requires_grad=True)
    out = lora_forward(x, [layer])[0]
    out.sum().backward()
    assert out.shape == (0, 2) and torch.equal(layer.lora_A.weight.grad, torch.zeros(2, 5))

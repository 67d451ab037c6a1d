"""lora_core.fused, the fast path: the sparse dropout draw, the LoRA group op (one layer or siblings on
one input) and sibling groups. Its equality with the reference forward: test_lora_fused_vs_reference.py."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from test_lora_layers import ALL_PROJ, linear, llama_with_lora, loss_and_grads, randomize_b, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_core import LoraConfig, adapter_parameters, apply_lora, fused, use_fused
from lora_core.fused import SiblingGroup, _LoraGroup, drop_positions, keep_mask, lora_forward, product_factors
from lora_core.inject import lora_layers
from lora_core.layers import LoraLinear


@pytest.fixture(autouse=True)
def fast_path_on():
    """Every test here is about the fast path: on, whatever LORAFLOW_FUSED_LORA says."""
    with use_fused(True):
        yield


def test_drop_positions_are_sorted_distinct_and_in_range_at_rate_p():
    n, p = 200_000, 0.05
    positions = drop_positions(n, p, torch.Generator().manual_seed(0))
    assert positions.dtype == torch.int64
    assert bool((positions[1:] > positions[:-1]).all()) and positions[0] >= 0 and positions[-1] < n
    assert abs(positions.numel() / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_gaps_between_drops_are_geometric():
    p = 0.2
    positions = drop_positions(400_000, p, torch.Generator().manual_seed(1))
    gaps = torch.diff(positions) - 1  # kept elements between two drops
    for k in (0, 1, 3, 8):  # P(gap >= k) = (1 - p)^k
        assert abs((gaps >= k).double().mean().item() - (1 - p) ** k) < 0.005


def test_drops_are_drawn_again_until_the_whole_tensor_is_covered():
    n, p = 50_000, 0.1
    positions = drop_positions(n, p, torch.Generator().manual_seed(2), batch=7)  # ~700 draws of 7 gaps
    assert bool((positions[1:] > positions[:-1]).all()) and positions[-1] < n
    assert positions[-1] > n - 100  # drops reach the end, not just the first batch
    assert abs(positions.numel() / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_keep_mask_reproduces_the_draw_from_the_same_generator_state():
    torch.manual_seed(3)
    keep, scale = keep_mask(torch.Size([40, 50]), 0.3)
    torch.manual_seed(3)
    positions = drop_positions(2000, 0.3, None)
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
    plan = fused._Plan(p, torch.float64, tuple((la.scaling, la.fan_in_fan_out, la.r) for la in layers), 0)

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
    keep, scale = keep_mask(x.shape, 0.4)  # one mask for both siblings
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
    monkeypatch.setattr(fused, "product_factors", lambda x: found.append(product_factors(x)) or found[-1])
    with_factors = run()
    assert sum(len(f) == 2 for f in found) == 2  # down_proj of both layers kept act(gate) and up
    monkeypatch.setattr(fused, "product_factors", lambda x: ())
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
    keep, scale = keep_mask(x.shape, 0.3)
    base = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
    lora = F.linear(F.linear(x.float() * keep * scale, params[0]), params[1]) + layer.lora_B.bias
    out = (base.float() + layer.scaling * lora).bfloat16()  # summed in fp32, rounded once
    want = (out, *torch.autograd.grad(out, (x, *params), g))
    for ours, ref in zip(got, want, strict=True):
        assert ours.dtype == ref.dtype
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


def test_dropout_on_an_empty_batch_draws_nothing_and_trains_nothing():
    layer = _layers(outs=(2,), ranks=(2,), p=0.1, dtype=torch.float32)[0]
    x = torch.randn(0, 5, requires_grad=True)
    out = lora_forward(x, [layer])[0]
    out.sum().backward()
    assert out.shape == (0, 2) and torch.equal(layer.lora_A.weight.grad, torch.zeros(2, 5))


def test_dropout_mask_drops_p_and_scales_to_keep_the_expectation():
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([400, 1000]), 0.05)
    drop_rate = 1 - keep.float().mean().item()
    assert abs(drop_rate - 0.05) < 0.002
    assert abs(scale * keep.float().mean().item() - 1) < 0.003
    assert abs(scale - 1 / (1 - 0.05)) < 1e-4


def test_dropout_gradients_are_exact_for_the_mask_drawn():
    layer = LoraLinear(linear("linear"), r=4, alpha=8, dropout=0.3).train()
    randomize_b(layer)
    x = torch.randn(5, 12, requires_grad=True)
    torch.manual_seed(7)
    layer(x).square().sum().backward()
    ours = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())

    x_ref = x.detach().clone().requires_grad_(True)
    a = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    keep, scale = keep_mask(x.shape, 0.3)
    dropped = x_ref * keep * scale
    out = layer.base_layer(x_ref) + 2.0 * (dropped @ a.t() @ b.t())
    out.square().sum().backward()
    for got, want in zip(ours, (x_ref.grad, a.grad, b.grad)):
        # the reference scales x, lora_core scales h: equal up to rounding of the largest terms
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_dropout_keeps_x_and_the_drop_positions_not_a_mask_and_leaves_the_random_stream_alone():
    layer = LoraLinear(linear("linear"), r=4, alpha=8, dropout=0.3).train()
    randomize_b(layer)
    x = torch.randn(50, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a dropped copy
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and not [t for t in saved if t.dtype == torch.bool]
    positions = [t for t in saved if t.dtype == torch.int32]
    assert len(positions) == 1 and positions[0].numel() < 0.5 * x.numel()
    state = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_q_k_v_and_gate_up_form_sibling_groups():
    model = llama_with_lora(0.0)
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    assert isinstance(attn.q_proj.siblings, SiblingGroup)
    assert attn.q_proj.siblings is attn.k_proj.siblings is attn.v_proj.siblings
    assert mlp.gate_proj.siblings is mlp.up_proj.siblings is not attn.q_proj.siblings
    assert attn.o_proj.siblings is None and mlp.down_proj.siblings is None


def test_fused_siblings_give_the_same_loss_and_gradients_as_separate_layers():
    ids = torch.randint(0, 96, (2, 16))
    grouped_loss, grouped = loss_and_grads(llama_with_lora(0.0).train(), ids)
    separate_loss, separate = loss_and_grads(llama_with_lora(0.0, siblings=False).train(), ids)
    torch.testing.assert_close(grouped_loss, separate_loss)
    assert grouped.keys() == separate.keys()
    for name in grouped:
        torch.testing.assert_close(grouped[name], separate[name], msg=name)


def test_siblings_share_one_dropout_mask():
    model = llama_with_lora(0.5).train()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():  # identical k and v adapters: equal LoRA branches iff the masks are equal
        attn.v_proj.lora_A.weight.copy_(attn.k_proj.lora_A.weight)
        attn.v_proj.lora_B.weight.copy_(attn.k_proj.lora_B.weight)
        attn.v_proj.base_layer.weight.copy_(attn.k_proj.base_layer.weight)
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(attn.k_proj(x), attn.v_proj(x))
    attn.k_proj.siblings = attn.v_proj.siblings = None  # separate layers draw separate masks
    assert not torch.allclose(attn.k_proj(x), attn.v_proj(x))


def test_siblings_called_on_different_inputs_compute_each_their_own():
    model = llama_with_lora(0.0).eval()
    attn = model.model.layers[0].self_attn
    x1, x2 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    grouped = (attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x1))
    for layer in (attn.q_proj, attn.k_proj, attn.v_proj):
        layer.siblings = None
    separate = (attn.q_proj(x1), attn.k_proj(x2), attn.v_proj(x1))
    for got, want in zip(grouped, separate):
        torch.testing.assert_close(got, want)


def test_siblings_notice_an_input_modified_in_place_between_calls():
    model = llama_with_lora(0.0).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32)
    attn.q_proj(x)
    x.mul_(3)
    k_after_change = attn.k_proj(x)
    attn.k_proj.siblings = None
    torch.testing.assert_close(k_after_change, attn.k_proj(x))

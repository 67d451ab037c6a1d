"""LoraLinear: the math, dtypes, merging, dropout, checkpointing, on the reference forward and on
the fast path (`path` fixture); what only the fast path does is in test_lora_fused.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from lora_core import LoraConfig, adapter_parameters, apply_lora, use_fused
from lora_core.inject import lora_layers
from lora_core.layers import AdapterModule, LoraLinear


def linear(kind: str, in_f: int = 12, out_f: int = 20, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f) if kind == "linear" else Conv1D(out_f, in_f)
    nn.init.normal_(layer.bias)
    return layer.to(dtype).requires_grad_(False)


def randomize_b(layer: LoraLinear) -> None:
    with torch.no_grad():
        nn.init.normal_(layer.lora_B.weight)
        if layer.lora_B.bias is not None:
            nn.init.normal_(layer.lora_B.bias)


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in) whatever the layer stores."""
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg)


ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(params=["reference", "fused"])
def path(request):
    """The test runs on the reference forward and again on fused.py's fast path."""
    with use_fused(request.param == "fused"):
        yield request.param


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fresh_adapter_is_a_noop(kind, path):
    base = linear(kind)
    x = torch.randn(3, 5, 12)
    expected = base(x)
    layer = LoraLinear(base, r=4, alpha=8)
    assert torch.equal(layer.lora_B.weight, torch.zeros(20, 4))
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rslora,lora_bias", [(False, False), (True, True)])
def test_forward_is_base_plus_scaled_low_rank_update(kind, rslora, lora_bias, path):
    layer = LoraLinear(linear(kind), r=4, alpha=6, use_rslora=rslora, lora_bias=lora_bias)
    randomize_b(layer)
    x = torch.randn(2, 7, 12)
    scaling = 6 / math.sqrt(4) if rslora else 6 / 4
    delta = x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
    if lora_bias:
        delta = delta + layer.lora_B.bias
    expected = F.linear(x, dense_weight(layer.base_layer), layer.base_layer.bias) + scaling * delta
    assert layer.scaling == scaling
    assert layer.lora_A.weight.shape == (4, 12) and layer.lora_B.weight.shape == (20, 4)
    torch.testing.assert_close(layer(x), expected)


def test_gaussian_init_draws_a_with_std_one_over_r():
    layer = LoraLinear(linear("linear", in_f=256, out_f=8), r=16, alpha=16, init="gaussian")
    assert abs(layer.lora_A.weight.std().item() - 1 / 16) < 0.01
    assert not layer.lora_B.weight.any()


def test_kaiming_init_bounds_a_by_one_over_sqrt_fan_in():
    layer = LoraLinear(linear("linear", in_f=64), r=8, alpha=8)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound
    assert layer.lora_A.weight.abs().max() > 0.8 * bound


def test_only_linear_and_conv1d_can_be_wrapped():
    with pytest.raises(TypeError, match="Embedding"):
        LoraLinear(nn.Embedding(4, 4), r=2, alpha=2)


def test_layer_exposes_its_adapter_parameters_structurally():
    layer = LoraLinear(linear("linear"), r=2, alpha=2, lora_bias=True)
    assert isinstance(layer, AdapterModule)
    assert set(layer.adapter_params()) == {"lora_A.weight", "lora_B.weight", "lora_B.bias"}
    assert all(p is dict(layer.named_parameters())[k] for k, p in layer.adapter_params().items())


def test_bf16_base_keeps_fp32_adapter_and_returns_base_dtype(path):
    base16 = linear("linear", dtype=torch.bfloat16)
    layer = LoraLinear(base16, r=4, alpha=8, lora_bias=True)
    randomize_b(layer)
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    out = layer(x)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert out.dtype == torch.bfloat16
    # The sum is formed in fp32 and rounded once: equal to the fp32 reference rounded to bf16.
    lora = (x.float() @ layer.lora_A.weight.t() @ layer.lora_B.weight.t() + layer.lora_B.bias) * 2.0
    reference = (base16(x).float() + lora).to(torch.bfloat16)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_bf16_base_gets_fp32_adapter_gradients(path):
    layer = LoraLinear(linear("linear", dtype=torch.bfloat16), r=4, alpha=8)
    randomize_b(layer)
    layer(torch.randn(4, 12, dtype=torch.bfloat16)).float().square().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_A.weight.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_under_autocast_the_input_is_not_cast_to_fp32_and_the_output_is_the_formulas(base_dtype):
    """An fp32 copy of x would only be cast back by autocast (q, k and v each made one)."""
    layer = LoraLinear(linear("linear", dtype=base_dtype), r=4, alpha=8, lora_bias=True)
    randomize_b(layer)
    seen = []
    layer.lora_A.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert seen == [torch.bfloat16]
    exact = (layer.base_layer(x.to(base_dtype)).float()
             + 2.0 * (x.float() @ layer.lora_A.weight.t() @ layer.lora_B.weight.t() + layer.lora_B.bias))
    torch.testing.assert_close(out.float(), exact, atol=0.05, rtol=0.02)  # bf16 tolerance


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merged_layer_computes_the_same_function_and_unmerge_restores_the_base(kind, path):
    layer = LoraLinear(linear(kind), r=4, alpha=8, lora_bias=True)
    randomize_b(layer)
    x = torch.randn(3, 12)
    before_w, before_b = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    expected = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(layer.base_layer.weight, before_w)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias, before_b, rtol=0, atol=1e-6)


def test_merge_into_bf16_computes_the_delta_in_fp32_and_casts_once():
    base16 = linear("linear", dtype=torch.bfloat16)
    original = base16.weight.clone()
    layer = LoraLinear(base16, r=4, alpha=8)
    randomize_b(layer)
    delta = (layer.lora_B.weight @ layer.lora_A.weight) * 2.0
    layer.merge()
    assert torch.equal(layer.base_layer.weight, (original.float() + delta).to(torch.bfloat16))


def test_merge_refuses_non_finite_weights_and_leaves_the_base_alone():
    layer = LoraLinear(linear("linear"), r=2, alpha=2)
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)


def test_merge_is_never_implicit_in_train_or_eval():
    layer = LoraLinear(linear("linear"), r=2, alpha=2)
    randomize_b(layer)
    before = layer.base_layer.weight.clone()
    layer.eval()
    layer.train()
    assert not layer.merged and torch.equal(layer.base_layer.weight, before)


def test_zero_dropout_draws_no_random_numbers_in_training(path):
    layer = LoraLinear(linear("linear"), r=2, alpha=2, dropout=0.0).train()
    x = torch.randn(3, 12, requires_grad=True)
    state = torch.get_rng_state()
    layer(x).sum().backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_dropout_applies_only_in_training_and_only_to_the_lora_branch(path):
    layer = LoraLinear(linear("linear"), r=4, alpha=8, dropout=0.5)
    randomize_b(layer)
    x = torch.randn(64, 12)
    no_dropout = LoraLinear(linear("linear"), r=4, alpha=8)
    no_dropout.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer.eval()(x), no_dropout(x))
    trained = layer.train()(x)
    assert not torch.allclose(trained, no_dropout(x))
    with torch.no_grad():
        layer.lora_B.weight.zero_()  # LoRA branch off: dropout must not touch the base path
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def llama_with_lora(dropout: float, siblings: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """tiny_llama with LoRA on ALL_PROJ, B random; `siblings=False`: q/k/v and gate/up ungrouped."""
    model = apply_lora(tiny_llama(seed), LoraConfig(r=4, alpha=8, dropout=dropout, target_modules=ALL_PROJ))
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        randomize_b(layer)
        if not siblings:
            layer.siblings = None
    return model


def loss_and_grads(model: nn.Module, ids: torch.Tensor, seed: int = 3):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter_parameters(model).items()}


def test_the_dropout_module_is_plain_dropout_or_nothing():
    assert isinstance(LoraLinear(linear("linear"), r=2, alpha=2, dropout=0.1).lora_dropout, nn.Dropout)
    assert isinstance(LoraLinear(linear("linear"), r=2, alpha=2, dropout=0.0).lora_dropout, nn.Identity)


def test_non_reentrant_checkpointing_reproduces_loss_and_gradients_with_dropout(path):
    ids = torch.randint(0, 96, (2, 16))
    plain_loss, plain = loss_and_grads(llama_with_lora(0.1).train(), ids)
    model = llama_with_lora(0.1).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    ckpt_loss, ckpt = loss_and_grads(model, ids)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing really ran
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)

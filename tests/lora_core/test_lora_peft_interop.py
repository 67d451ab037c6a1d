"""Interop with the real PEFT 0.21: same files, same logits both ways, same gradients.

Every adapter here has a non-zero B (and a changed head where there is one): with B = 0 a wrong
key would load "successfully" and still give the base model's logits.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lora_core import LoraConfig, adapter_parameters, apply_lora, load_adapter, save_adapter, use_fused


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    elif kind == "bert-token":  # token classification: the head is trained in full (modules_to_save)
        model = BertForTokenClassification(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4, num_labels=5))
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=2, num_attention_heads=4, num_labels=3))
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb(params) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for param in params:
            param.add_(torch.randn_like(param) * 0.2)


CASES = {
    "llama-qv": ("llama", LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear-rslora-lora-bias": ("llama", LoraConfig(r=4, alpha=8, target_modules="all-linear",
                                                              use_rslora=True, lora_bias=True)),
    "llama-regex-exclude": ("llama", LoraConfig(r=2, alpha=4, target_modules=r".*\.(k_proj|up_proj|o_proj)",
                                                exclude_modules=["layers.1.mlp.up_proj"])),
    "llama-layers-gaussian": ("llama", LoraConfig(r=4, alpha=4, target_modules=["q_proj", "down_proj"],
                                                  layers_to_transform=[1], init="gaussian")),
    "gpt2-conv1d-lora-only-bias": ("gpt2", LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"],
                                                      bias="lora_only")),
    "bert-classifier": ("bert", LoraConfig(r=4, alpha=8, target_modules=["query", "key", "value"])),
    "bert-token-classifier": ("bert-token", LoraConfig(r=4, alpha=8, target_modules=["query", "value", "dense"])),
}


@pytest.fixture(params=sorted(CASES))
def ours_saved(request, tmp_path):
    kind, config = CASES[request.param]
    model = apply_lora(tiny(kind), config).eval()
    perturb(adapter_parameters(model).values())
    return kind, model, save_adapter(model, tmp_path / "ours")


def test_peft_loads_our_adapter_with_the_same_logits(ours_saved):
    kind, model, path = ours_saved
    assert not torch.allclose(logits(model), logits(tiny(kind)), atol=1e-3)  # the adapter does something
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(tiny(kind), str(path)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]  # PEFT only warns
    assert (logits(peft_model) - logits(model)).abs().max() < 1e-4


def test_we_load_peft_adapters_with_the_same_logits(ours_saved, tmp_path):
    kind, _, path = ours_saved
    peft_model = peft.PeftModel.from_pretrained(tiny(kind), str(path), is_trainable=True)
    perturb(p for p in peft_model.parameters() if p.requires_grad)  # weights PEFT alone produced
    peft_model.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "loraflow.json").exists()
    ours = load_adapter(tiny(kind), tmp_path / "peft").eval()
    assert (logits(ours) - logits(peft_model.eval())).abs().max() < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_we_save_exactly_the_keys_and_shapes_peft_saves(case, tmp_path):
    kind, config = CASES[case]
    save_adapter(apply_lora(tiny(kind), config), tmp_path / "ours")
    peft_config = peft.LoraConfig.from_pretrained(str(tmp_path / "ours"))
    peft.get_peft_model(tiny(kind), peft_config).save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("fast_path", [True, False])
def test_gradients_equal_peft_gradients_without_dropout(fast_path):
    """The reference forward, and the fast path's fused siblings and in-place addmm, change no gradient."""
    config = LoraConfig(r=4, alpha=8, target_modules="all-linear", lora_bias=True)
    ours = apply_lora(tiny("llama"), config).train()
    perturb(adapter_parameters(ours).values())
    theirs = peft.get_peft_model(tiny("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True, task_type="CAUSAL_LM")).train()
    theirs.load_state_dict({f"base_model.model.{k}".replace(".lora_A.", ".lora_A.default.")
                           .replace(".lora_B.", ".lora_B.default."): v
                            for k, v in ours.state_dict().items()})
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    with use_fused(fast_path):
        for model in (ours, theirs):
            model(input_ids=ids, labels=ids).loss.backward()
    peft_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    our_grads = adapter_parameters(ours)
    assert len(peft_grads) == len(our_grads)
    for name, param in our_grads.items():
        key = f"base_model.model.{name}".replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        torch.testing.assert_close(param.grad, peft_grads[key], rtol=1e-5, atol=1e-6, msg=name)

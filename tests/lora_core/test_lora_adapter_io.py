"""Adapter directories: PEFT's layout, atomic saves, strict and verified loads, vLLM servability."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lora_core.adapter_io as adapter_io
from lora_core import (
    LoraConfig,
    adapter_parameters,
    adapter_state_dict,
    apply_lora,
    check_servable,
    load_adapter,
    save_adapter,
)
from lora_core.adapter_io import AdapterLoadError
from lora_core.layers import LoraLinear


def tiny(kind: str, seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    return BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=3))


def trained(model: nn.Module) -> nn.Module:
    """Non-zero B and a changed head: a zero B would hide key mix-ups."""
    with torch.no_grad():
        for param in adapter_parameters(model).values():
            param.normal_(0, 0.2)
    return model.eval()


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def llama_adapter(tmp_path):
    model = trained(apply_lora(tiny("llama"), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])))
    return model, save_adapter(model, tmp_path / "adapter", base_identity={"name": "tiny-llama"})


def test_directory_holds_peft_config_weights_and_lineage(llama_adapter):
    _, path = llama_adapter
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "loraflow.json"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["q_proj", "v_proj"])
    for key in ("lora_dropout", "bias", "use_rslora", "lora_bias", "fan_in_fan_out", "modules_to_save",
                "base_model_name_or_path", "inference_mode", "layers_to_transform", "use_dora"):
        assert key in config


def test_weights_use_peft_keys_shapes_and_metadata(llama_adapter):
    _, path = llama_adapter
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 32)
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == (32, 4)
    assert shapes["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] == (16, 4)
    assert len(shapes) == 2 * 2 * 2


def test_lineage_records_the_weights_sha256_and_base_identity(llama_adapter):
    _, path = llama_adapter
    lineage = json.loads((path / "loraflow.json").read_text())
    assert lineage["weights_sha256"] == adapter_io.sha256_file(path / "adapter_model.safetensors")
    assert lineage["base_model"] == {"name": "tiny-llama"}
    assert lineage["library"] == "loraflow" and lineage["library_version"]


def test_extra_lineage_is_kept_but_cannot_overwrite_the_checksum(tmp_path, llama_adapter):
    model, _ = llama_adapter
    path = save_adapter(model, tmp_path / "x", extra={"data_digest": "abc"})
    assert json.loads((path / "loraflow.json").read_text())["data_digest"] == "abc"
    with pytest.raises(ValueError, match="weights_sha256"):
        save_adapter(model, tmp_path / "y", extra={"weights_sha256": "0" * 64})


def test_loading_gives_the_same_logits_and_a_frozen_adapter(llama_adapter):
    model, path = llama_adapter
    loaded = load_adapter(tiny("llama"), path)
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_loading_trainable_unfreezes_exactly_the_adapter(llama_adapter):
    _, path = llama_adapter
    loaded = load_adapter(tiny("llama"), path, trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(adapter_parameters(loaded))


def test_adapter_state_dict_is_what_the_file_holds(llama_adapter):
    model, path = llama_adapter
    on_disk = load_file(path / "adapter_model.safetensors")
    in_memory = adapter_state_dict(model)
    assert on_disk.keys() == in_memory.keys()
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)


def test_seq_cls_head_is_saved_under_its_own_path(tmp_path):
    model = trained(apply_lora(tiny("bert"), LoraConfig(r=4)))
    path = save_adapter(model, tmp_path / "a")
    keys = load_file(path / "adapter_model.safetensors").keys()
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    loaded = load_adapter(tiny("bert"), path).eval()
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_lora_only_bias_is_saved_as_base_layer_bias(tmp_path):
    model = trained(apply_lora(tiny("gpt2"), LoraConfig(r=4, bias="lora_only", lora_bias=True)))
    keys = load_file(save_adapter(model, tmp_path / "a") / "adapter_model.safetensors").keys()
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in keys
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.bias" in keys


def test_saving_over_an_existing_adapter_replaces_it_whole(tmp_path, llama_adapter):
    model, path = llama_adapter
    (path / "stale.txt").write_text("old")
    save_adapter(model, path)
    assert not (path / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dirs left behind


def test_a_failed_save_leaves_no_directory(tmp_path, llama_adapter, monkeypatch):
    model, _ = llama_adapter

    def broken_save(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]


def _rewrite_weights(path, change):
    weights = load_file(path / "adapter_model.safetensors")
    change(weights)
    save_file(weights, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "loraflow.json").unlink()  # as a PEFT-written adapter: no checksum to catch the edit


def test_missing_key_is_named_with_the_file(llama_adapter):
    _, path = llama_adapter
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    _rewrite_weights(path, lambda w: w.pop(key))
    with pytest.raises(AdapterLoadError, match=f"adapter_model.safetensors: missing key {key}"):
        load_adapter(tiny("llama"), path)


def test_unexpected_key_is_named_with_the_file(llama_adapter):
    _, path = llama_adapter
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    _rewrite_weights(path, lambda w: w.update({key: torch.zeros(4, 32)}))
    with pytest.raises(AdapterLoadError, match=f"adapter_model.safetensors: unexpected key {key}"):
        load_adapter(tiny("llama"), path)


def test_wrong_shape_is_named_with_both_shapes(llama_adapter):
    _, path = llama_adapter
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    _rewrite_weights(path, lambda w: w.update({key: torch.zeros(5, 32)}))
    with pytest.raises(AdapterLoadError, match=rf"{key} has shape \(5, 32\), the model expects \(4, 32\)"):
        load_adapter(tiny("llama"), path)


def test_a_flipped_byte_fails_the_checksum(llama_adapter):
    _, path = llama_adapter
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterLoadError, match="sha256 .* does not match"):
        load_adapter(tiny("llama"), path)


def test_an_adapter_for_another_architecture_is_refused(tmp_path):
    gpt2 = trained(apply_lora(tiny("gpt2"), LoraConfig(r=4)))
    path = save_adapter(gpt2, tmp_path / "gpt2")
    with pytest.raises(AdapterLoadError, match="does not fit this LlamaForCausalLM.*c_attn"):
        load_adapter(tiny("llama"), path)


def test_an_adapter_for_another_width_is_refused_by_shape(llama_adapter):
    _, path = llama_adapter
    with pytest.raises(AdapterLoadError, match="has shape"):
        load_adapter(tiny("llama", hidden=48), path)


def test_a_failed_load_leaves_the_base_model_untouched(llama_adapter):
    _, path = llama_adapter
    _rewrite_weights(path, lambda w: w.popitem())
    base = tiny("llama")
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterLoadError):
        load_adapter(base, path)
    assert not any(isinstance(m, LoraLinear) for m in base.modules()) and not hasattr(base, "lora_state")
    assert base.state_dict().keys() == reference.keys()
    assert all(torch.equal(base.state_dict()[k], reference[k]) for k in reference)


def test_a_pickled_adapter_is_never_loaded(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(LoraConfig(target_modules=["q_proj"]).to_peft_dict()))
    (tmp_path / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(AdapterLoadError, match="adapter_model.bin, a pickle"):
        load_adapter(tiny("llama"), tmp_path)


def test_config_asking_for_dora_is_refused(llama_adapter):
    _, path = llama_adapter
    config_path = path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    with pytest.raises(AdapterLoadError, match="adapter_config.json: use_dora=True"):
        load_adapter(tiny("llama"), path)


def test_plain_lora_adapter_is_servable(llama_adapter):
    _, path = llama_adapter
    assert check_servable(path) == (True, [])


def test_a_rank_above_the_default_is_servable_with_a_larger_max_lora_rank(tmp_path):
    path = save_adapter(apply_lora(tiny("llama"), LoraConfig(r=24, target_modules=["q_proj"])), tmp_path / "a")
    ok, reasons = check_servable(path)
    assert not ok and "--max-lora-rank 32" in reasons[0]
    assert check_servable(path, max_lora_rank=32) == (True, [])


@pytest.mark.parametrize("kind,config,reason", [
    ("llama", LoraConfig(r=32, target_modules=["q_proj"]), "r=32 is greater than max_lora_rank 16"),
    ("llama", LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ("gpt2", LoraConfig(r=8, target_modules=["c_attn"], bias="lora_only"), "non-LoRA tensor"),
])
def test_adapters_vllm_would_reject_are_reported_with_a_reason(tmp_path, kind, config, reason):
    path = save_adapter(apply_lora(tiny(kind), config), tmp_path / "a")
    ok, reasons = check_servable(path)
    assert not ok and any(reason in r for r in reasons)

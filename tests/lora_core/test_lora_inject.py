"""apply_lora / remove_lora / disable_adapter / merge: PEFT's target rules, trainability, heads, biases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from lora_core import (
    LoraConfig,
    adapter_parameters,
    apply_lora,
    disable_adapter,
    merge_adapter,
    remove_lora,
    trainable_summary,
    unmerge_adapter,
)
from lora_core.inject import lora_layers
from lora_core.layers import LoraLinear, ModulesToSave


def tiny(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    return BertForSequenceClassification(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=3))


def targeted(model: nn.Module) -> list[str]:
    return sorted(lora_layers(model))


def randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B.weight, std=0.2)
        for name, param in adapter_parameters(model).items():
            if ".modules_to_save." in f".{name}":
                param.add_(0.5)


REPO = Path(__file__).resolve().parents[2]
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))


def test_list_entry_matches_the_exact_name_or_a_dotted_suffix():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules=["self_attn.q_proj", "model.layers.2.mlp.up_proj"]))
    assert targeted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                               "model.layers.2.mlp.up_proj", "model.layers.2.self_attn.q_proj"]


def test_list_entry_does_not_match_a_partial_segment():
    with pytest.raises(ValueError, match="no module matches"):
        apply_lora(tiny("llama"), LoraConfig(target_modules=["_proj"]))


def test_string_target_is_a_full_match_regex():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules=r".*\.1\.self_attn\.(k|v)_proj"))
    assert targeted(model) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


def test_all_linear_skips_the_lm_head():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules="all-linear"))
    assert len(targeted(model)) == 3 * 7 and "lm_head" not in targeted(model)
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lora_state.config.target_modules == targeted(model)  # saved as full names, as PEFT does


def test_all_linear_covers_gpt2_conv1d_layers():
    model = apply_lora(tiny("gpt2"), LoraConfig(target_modules="all-linear"))
    assert {n.rsplit(".", 1)[-1] for n in targeted(model)} == {"c_attn", "c_proj", "c_fc"}
    assert model.lora_state.config.fan_in_fan_out


def test_exclude_modules_wins_over_targets():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules=["q_proj", "v_proj"],
                                                 exclude_modules=["layers.0.self_attn.v_proj"]))
    assert "model.layers.0.self_attn.v_proj" not in targeted(model)
    assert "model.layers.1.self_attn.v_proj" in targeted(model)


def test_layers_to_transform_keeps_only_the_listed_layer_indices():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules=["q_proj"], layers_to_transform=[0, 2]))
    assert targeted(model) == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_layers_to_transform_with_a_regex_target_is_refused():
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=1)


@pytest.mark.parametrize("kind,leaves", [("llama", {"q_proj", "v_proj"}), ("gpt2", {"c_attn"}),
                                         ("bert", {"query", "value"})])
def test_default_targets_follow_the_architecture(kind, leaves):
    model = apply_lora(tiny(kind), LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n in targeted(model)} == leaves


def test_unknown_architecture_without_targets_names_its_linear_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no default LoRA target modules.*0, 2"):
        apply_lora(model, LoraConfig())


def test_nothing_matched_lists_module_names_the_model_has():
    with pytest.raises(ValueError, match="q_proj.*gate_proj") as err:
        apply_lora(tiny("llama"), LoraConfig(target_modules=["c_attn"]))
    assert "c_attn" in str(err.value)


def test_a_matched_module_that_is_not_linear_is_refused():
    with pytest.raises(ValueError, match="model.layers.0.mlp.*LlamaMLP"):
        apply_lora(tiny("llama"), LoraConfig(target_modules=["mlp"]))


def test_applying_twice_is_refused():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(target_modules=["v_proj"]))


def test_only_adapter_parameters_require_grad():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules="all-linear", lora_bias=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))
    assert trainable and all(".lora_A." in f".{n}" or ".lora_B." in f".{n}" for n in trainable)
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())


def test_trainable_summary_counts_adapter_and_base():
    model = apply_lora(tiny("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    summary = trainable_summary(model)
    assert summary["trainable_params"] == 3 * 4 * (32 + 32)
    assert summary["adapter_param_bytes"] == 4 * summary["trainable_params"]
    assert summary["total_params"] == sum(p.numel() for p in model.parameters())
    assert summary["lora_modules"] == 3


def test_sequence_classification_trains_a_copy_of_the_classifier():
    model = apply_lora(tiny("bert"), LoraConfig(r=4))
    assert model.lora_state.config.task_type == "SEQ_CLS"
    assert model.lora_state.config.modules_to_save == ["classifier", "score"]
    assert isinstance(model.classifier, ModulesToSave)
    trainable = set(adapter_parameters(model))
    assert {"classifier.modules_to_save.weight", "classifier.modules_to_save.bias"} <= trainable
    assert not model.classifier.original_module.weight.requires_grad


def test_modules_to_save_are_never_lora_targets():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules="all-linear", modules_to_save=["down_proj"]))
    assert not any(n.endswith("down_proj") for n in targeted(model))
    assert isinstance(model.model.layers[0].mlp.down_proj, ModulesToSave)


def test_modules_to_save_that_match_nothing_are_refused():
    with pytest.raises(ValueError, match="modules_to_save.*classifier"):
        apply_lora(tiny("llama"), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifier"]))


def test_bias_lora_only_trains_the_biases_of_adapted_layers():
    model = apply_lora(tiny("gpt2"), LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    biases = {n for n in adapter_parameters(model) if n.endswith("bias")}
    assert biases == {"transformer.h.0.attn.c_attn.base_layer.bias", "transformer.h.1.attn.c_attn.base_layer.bias"}


def test_bias_all_trains_every_bias_including_layer_norms():
    model = apply_lora(tiny("gpt2"), LoraConfig(target_modules=["c_attn"], bias="all"))
    biases = {n for n in adapter_parameters(model) if n.endswith("bias")}
    assert biases == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert "transformer.ln_f.bias" in biases


def test_disable_adapter_gives_base_outputs_and_restores_the_adapter():
    base_logits = tiny("bert").eval()(IDS).logits
    model = apply_lora(tiny("bert"), LoraConfig(r=4)).eval()
    randomize(model)
    adapted = model(IDS).logits
    assert not torch.allclose(adapted, base_logits)
    with disable_adapter(model):
        torch.testing.assert_close(model(IDS).logits, base_logits)
    torch.testing.assert_close(model(IDS).logits, adapted)


def test_disable_adapter_on_a_merged_model_unmerges_for_the_block():
    base_logits = tiny("llama").eval()(IDS).logits
    model = apply_lora(tiny("llama"), LoraConfig(target_modules="all-linear")).eval()
    randomize(model)
    merge_adapter(model)
    merged_logits = model(IDS).logits
    with disable_adapter(model):
        torch.testing.assert_close(model(IDS).logits, base_logits, rtol=1e-5, atol=1e-5)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(IDS).logits, merged_logits, rtol=1e-5, atol=1e-5)


def test_merge_then_unmerge_round_trips_the_logits():
    model = apply_lora(tiny("gpt2"), LoraConfig(target_modules="all-linear")).eval()
    randomize(model)
    adapted = model(IDS).logits
    merge_adapter(model)
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    unmerge_adapter(model)
    assert not any(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)


def test_failed_merge_unmerges_the_layers_already_merged():
    model = apply_lora(tiny("llama"), LoraConfig(target_modules=["q_proj"])).eval()
    randomize(model)
    before = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model).items()}
    with torch.no_grad():
        model.model.layers[2].self_attn.q_proj.lora_B.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="model.layers.2.self_attn.q_proj"):
        merge_adapter(model)
    for name, layer in lora_layers(model).items():
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, before[name], rtol=0, atol=1e-6)


def test_remove_lora_gives_back_the_base_model():
    reference = tiny("bert").eval()
    model = apply_lora(tiny("bert"), LoraConfig(r=4)).eval()
    randomize(model)
    base = remove_lora(model)
    assert base is model and not hasattr(base, "lora_state")
    assert not any(isinstance(m, LoraLinear | ModulesToSave) for m in base.modules())
    assert base.state_dict().keys() == reference.state_dict().keys()
    assert all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(base(IDS).logits, reference(IDS).logits, rtol=0, atol=0)


_DDP_SCRIPT = """
import os, sys, tempfile
import torch, torch.distributed as dist
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from lora_core import LoraConfig, adapter_parameters, apply_lora
from lora_core.inject import lora_layers

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2))
model = apply_lora(model, LoraConfig(r=4, dropout=0.1, target_modules="all-linear")).train()
with torch.no_grad():
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.2)
ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
dist.init_process_group("gloo", init_method="file://" + os.path.join(tempfile.mkdtemp(), "store"),
                        rank=0, world_size=1)
ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
for _ in range(2):
    ddp(input_ids=ids, labels=ids).loss.backward()
lora = {n: p for n, p in adapter_parameters(ddp).items() if ".lora_A." in f".{n}" or ".lora_B." in f".{n}"}
missing = [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
print(f"lora={len(lora)} missing={missing}", flush=True)
# Skip interpreter teardown: torch 2.13 can deadlock when a gloo process group is freed by a Python
# dealloc (GIL held) while its worker thread frees a finished work item (needs the GIL).
os._exit(0)
"""


def test_ddp_reduces_a_gradient_for_every_adapter_parameter():
    """Frozen base + fused siblings under DDP (find_unused_parameters=False): two steps, no
    'Expected to have finished reduction' error, every adapter parameter gets a gradient.
    In its own process, as DDP always runs: a process group must never outlive a test."""
    proc = subprocess.run([sys.executable, "-c", _DDP_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora=42 missing=[]" in proc.stdout, proc.stdout


# ---- lower-precision bases: every trainable parameter stays fp32 (issue 20) -------------------------

@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_every_trainable_parameter_is_fp32_on_a_lower_precision_base(base_dtype):
    model = apply_lora(tiny("bert").to(base_dtype), LoraConfig(r=4, target_modules=["query", "value"],
                                                               bias="lora_only"))
    trainable = adapter_parameters(model)
    assert "classifier.modules_to_save.weight" in trainable and any(n.endswith("base_layer.bias") for n in trainable)
    assert {n: p.dtype for n, p in trainable.items() if p.dtype != torch.float32} == {}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {base_dtype}  # the base itself is not copied to fp32
    assert model.classifier.original_module.weight.dtype == base_dtype
    remove_lora(model)  # the trained base biases go back to the base dtype
    assert {p.dtype for p in model.parameters()} == {base_dtype}


def test_a_bf16_base_with_an_fp32_head_runs_with_and_without_autocast_and_trains_the_head():
    model = apply_lora(tiny("bert").to(torch.bfloat16), LoraConfig(r=4, target_modules=["query"], bias="lora_only"))
    model.eval()
    plain = model(input_ids=IDS).logits
    assert plain.dtype == torch.bfloat16  # the head hands the model the base dtype, as the original did
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=IDS).logits
    torch.testing.assert_close(logits.float(), plain.float(), atol=0.05, rtol=0.05)
    logits.float().logsumexp(-1).sum().backward()
    head = model.classifier.modules_to_save.weight
    assert head.grad is not None and head.grad.dtype == torch.float32


def test_fp16_base_trains_under_autocast_with_a_grad_scaler():
    """The step that failed with `Attempting to unscale FP16 gradients` (a seq_cls head in fp16)."""
    model = apply_lora(tiny("bert").to(torch.float16), LoraConfig(r=4, target_modules=["query", "value"]))
    params = list(adapter_parameters(model).values())
    optimizer, scaler = torch.optim.AdamW(params, lr=1e-2), torch.amp.GradScaler("cpu", init_scale=2.0**8)
    head_before = model.classifier.modules_to_save.weight.detach().clone()
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(input_ids=IDS).logits
        scaler.scale(nn.functional.cross_entropy(logits.float(), torch.tensor([0, 2]))).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**8  # no step skipped for inf/nan gradients
    assert not torch.equal(model.classifier.modules_to_save.weight, head_before)

"""Put LoRA into a model and take it out again; select adapter parameters structurally.

`apply_lora` edits the model in place: targeted Linear/Conv1D layers become `LoraLinear`,
`modules_to_save` become `ModulesToSave`, every other parameter is frozen, and the resolved config
is kept on the model as `model.lora_state`. Trainable parameters, saved tensors and
`adapter_parameters(model)` are one and the same set, found by walking the adapter modules (never
by matching "lora" in parameter names).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import LoraConfig
from .fused import SiblingGroup
from .layers import LoraLinear, ModulesToSave
from .targets import (
    LINEAR_TYPES,
    SEQ_CLS_HEAD_NAMES,
    is_target,
    linear_leaf_names,
    resolve_target_modules,
    sibling_groups,
)

logger = logging.getLogger("lora_core")

_TASK_BY_CLASS_SUFFIX = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
                         "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                         "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


@dataclass
class LoraState:
    """What `apply_lora` did to a model: kept as `model.lora_state`, undone by `remove_lora`."""

    config: LoraConfig                  # resolved: concrete target_modules, task_type, modules_to_save
    layers: list[str]                   # names of the LoraLinear modules
    saved_modules: list[str]            # names of the ModulesToSave wrappers
    # (parameter, requires_grad, dtype) before: trained base biases become fp32 and go back on removal
    requires_grad_before: list[tuple[nn.Parameter, bool, torch.dtype]] = field(repr=False, default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / FSDP-style `.module` wrappers (the one `apply_lora` saw)."""
    while not hasattr(model, "lora_state") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def lora_state(model: nn.Module) -> LoraState:
    state = getattr(unwrap(model), "lora_state", None)
    if state is None:
        raise ValueError("model has no LoRA adapter (call apply_lora or load_adapter first)")
    return state


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Adapt `model` in place per `config`; freeze everything else. Returns the model.

    Raises ValueError if nothing matches (listing the model's linear layer names), if a match is not
    a Linear/Conv1D, or if the model already carries LoRA.
    """
    if hasattr(model, "lora_state") or any(isinstance(m, LoraLinear | ModulesToSave) for m in model.modules()):
        raise ValueError("model already has LoRA layers; call remove_lora(model) first")
    config = _resolve(model, config)
    saved = _wrap_modules_to_save(model, config.modules_to_save)
    names = [n for n, _ in model.named_modules() if n and is_target(config, n)]
    if not names:
        raise ValueError(
            f"no module matches target_modules={config.target_modules!r}"
            f" (exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r});"
            f" this model's linear layers are named: {', '.join(linear_leaf_names(model))}")
    before = [(p, p.requires_grad, p.dtype) for p in model.parameters()]
    model.requires_grad_(False)
    layers = {name: _replace(model, name, config) for name in names}
    for members in sibling_groups(names):
        if len({layers[n].in_features for n in members}) == 1:
            group = SiblingGroup([layers[n] for n in members])
            for n in members:
                layers[n].siblings = group
    config.fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())
    model.lora_state = LoraState(config, names, saved, before)
    for param in adapter_parameters(model).values():
        param.requires_grad_(True)
        if param.is_floating_point() and param.dtype != torch.float32:
            # Whatever the base dtype: a GradScaler refuses fp16 gradients, and bf16 weights and
            # AdamW state round small updates away. Autocast still runs the matmuls in its dtype.
            param.data = param.data.float()
    logger.info("LoRA r=%d alpha=%g on %d modules: %s%s", config.r, config.alpha, len(names),
                ", ".join(names[:8]), " ..." if len(names) > 8 else "")
    return model


def _resolve(model: nn.Module, config: LoraConfig) -> LoraConfig:
    task_type = config.task_type or next(
        (t for suffix, t in _TASK_BY_CLASS_SUFFIX.items() if type(model).__name__.endswith(suffix)), None)
    modules_to_save = list(config.modules_to_save or [])
    if task_type == "SEQ_CLS":  # PEFT's PeftModelForSequenceClassification does the same
        modules_to_save += [n for n in SEQ_CLS_HEAD_NAMES if n not in modules_to_save]
    resolved = config.replace(task_type=task_type, modules_to_save=modules_to_save or None,
                              base_model_name_or_path=config.base_model_name_or_path
                              or getattr(model, "name_or_path", None) or None)
    return resolved.replace(target_modules=resolve_target_modules(model, resolved))


def _wrap_modules_to_save(model: nn.Module, wanted: list[str] | None) -> list[str]:
    if not wanted:
        return []
    names = [n for n, _ in model.named_modules() if n and any(n == w or n.endswith("." + w) for w in wanted)]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    if not names:
        raise ValueError(f"modules_to_save={wanted!r} matches no module of {type(model).__name__}")
    for name in names:
        _set_submodule(model, name, ModulesToSave(model.get_submodule(name)))
    return names


def _replace(model: nn.Module, name: str, config: LoraConfig) -> LoraLinear:
    base = model.get_submodule(name)
    if not isinstance(base, LINEAR_TYPES):
        raise ValueError(f"target module {name!r} is a {type(base).__name__}; LoRA adapts only "
                         f"nn.Linear and Conv1D (make target_modules more specific or use exclude_modules)")
    layer = LoraLinear(base, config.r, config.alpha, config.dropout, config.use_rslora, config.lora_bias,
                       config.init)
    layer.train(base.training)
    _set_submodule(model, name, layer)
    return layer


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def adapter_entries(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(in-memory name, saved name, tensor) for everything the adapter owns, in model order.

    Saved names are PEFT's, without the `base_model.model.` prefix: `q_proj.lora_A.weight`,
    `q_proj.base_layer.bias` (bias="lora_only"), `classifier.weight` (modules_to_save).
    """
    model = unwrap(model)
    bias_mode = lora_state(model).config.bias
    seen: set[int] = set()  # tensors already yielded, and the frozen originals of saved modules
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLinear):
            entries = [(prefix + k, prefix + k, p) for k, p in module.adapter_params().items()]
            if bias_mode == "lora_only" and module.base_layer.bias is not None:
                key = prefix + "base_layer.bias"
                entries.append((key, key, module.base_layer.bias))
        elif isinstance(module, ModulesToSave):
            seen.update(id(p) for p in module.original_module.parameters())
            entries = [(f"{prefix}modules_to_save.{k}", prefix + k, t)
                       for k, t in module.modules_to_save.state_dict(keep_vars=True).items()]
        else:
            continue
        seen.update(id(t) for _, _, t in entries)
        yield from entries
    if bias_mode == "all":  # PEFT: every parameter called bias, LayerNorm biases included
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias" and id(param) not in seen:
                yield name, name, param


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train (LoRA A/B and bias, modules_to_save copies, trainable base biases),
    by in-memory name. Give these to the optimizer; DDP buckets exactly these."""
    return {name: t for name, _, t in adapter_entries(model) if isinstance(t, nn.Parameter)}


def trainable_summary(model: nn.Module) -> dict[str, float | int]:
    """Counts and bytes: trainable vs all parameters (PEFT's `print_trainable_parameters`)."""
    model = unwrap(model)
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights count once
    trainable = [p for p in params if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in params)
    return {
        "trainable_params": n_train,
        "total_params": n_all,
        "trainable_percent": 100.0 * n_train / max(n_all, 1),
        "adapter_param_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "base_param_bytes": sum(p.numel() * p.element_size() for p in params if not p.requires_grad),
        "lora_modules": sum(isinstance(m, LoraLinear) for m in model.modules()),
    }


def remove_lora(model: nn.Module) -> nn.Module:
    """The base model back, in place: LoRA layers unmerged and replaced by their base layers,
    `modules_to_save` by the *original* modules, `requires_grad` flags as before `apply_lora`.
    (Base biases trained with bias="lora_only"/"all" keep their trained values, as in PEFT.)"""
    model = unwrap(model)
    state = lora_state(model)
    for name in state.layers:
        layer = model.get_submodule(name)
        if layer.merged:
            layer.unmerge()
        layer.siblings = None
        _set_submodule(model, name, layer.base_layer)
    for name in state.saved_modules:
        _set_submodule(model, name, model.get_submodule(name).original_module)
    for param, flag, dtype in state.requires_grad_before:
        param.requires_grad_(flag)
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    del model.lora_state
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, LoraLinear)}


__all__ = ["LoraState", "adapter_entries", "adapter_parameters", "apply_lora", "lora_layers",
           "lora_state", "remove_lora", "trainable_summary", "unwrap"]

"""Explicit merge / unmerge and a context that runs the base model. Nothing here is tied to
`train()` / `eval()`: loralib's implicit merge-on-eval caused double merges in practice."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .inject import lora_layers, lora_state, unwrap
from .layers import ModulesToSave


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (fp32 delta, finite check, one cast per weight).

    All or nothing: if one layer would become non-finite, the layers merged so far are unmerged and
    ValueError names the layer. `modules_to_save` copies are not merged; they stay in use.
    """
    lora_state(model)
    done = []
    for name, layer in lora_layers(model).items():
        if layer.merged:
            raise RuntimeError(f"LoRA layer {name} is already merged")
        try:
            layer.merge()
        except ValueError as e:
            for merged in reversed(done):
                merged.unmerge()
            raise ValueError(f"cannot merge LoRA layer {name}: {e}") from None
        done.append(layer)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Subtract what `merge_adapter` added (exact up to one rounding in the base dtype)."""
    lora_state(model)
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            raise RuntimeError(f"LoRA layer {name} is not merged")
        layer.unmerge()
    return model


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes the base model's outputs (original heads included);
    adapter weights are untouched. A merged model is unmerged for the block and merged back after.
    Base biases trained with bias="lora_only"/"all" stay trained, as in PEFT."""
    lora_state(model)
    layers = list(lora_layers(model).values())
    saved = [m for m in unwrap(model).modules() if isinstance(m, ModulesToSave)]
    was_merged = any(layer.merged for layer in layers)
    flags = [(m, m.disabled) for m in layers + saved]
    if was_merged:
        unmerge_adapter(model)
    for module, _ in flags:
        module.disabled = True
    try:
        yield model
    finally:
        for module, flag in flags:
            module.disabled = flag
        if was_merged:
            merge_adapter(model)

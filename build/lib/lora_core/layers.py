"""The LoRA layer, the trainable copy used for `modules_to_save`, and the protocol both follow.

`LoraLinear` wraps an `nn.Linear` or a transformers `Conv1D` as `base_layer` and adds

    y = base(x) + scaling * (B(A(dropout(x))) + b_L)        scaling = alpha / r  (alpha / sqrt(r): rsLoRA)

with A = `lora_A.weight` (r, in) and B = `lora_B.weight` (out, r) as `nn.Linear`s, so in-memory
names (`q_proj.lora_A.weight`) are PEFT's saved names and `adapter_io` only adds the prefix. A is
kaiming-uniform(a=sqrt(5)) (or gaussian std 1/r) and B is zero, so a fresh adapter is a no-op.
A and B stay fp32 whatever the base dtype; outside autocast the branch's input is cast to fp32 and
the sum is rounded once to the base output's dtype (under autocast the matmuls run in autocast's
dtype anyway, so the input is not cast: an fp32 copy of it would only be cast back). `Conv1D` stores its weight as (in, out): A and B keep
their usual shapes and only `delta_weight` (merging) transposes.

`forward` is that formula. Where `fused.applies` (on the CPU, outside autocast, unless switched
off) the same function is computed by `fused.py`'s fast path instead.
"""

from __future__ import annotations

import copy
import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from . import fused
from .targets import Conv1D


@runtime_checkable
class AdapterModule(Protocol):
    """A module that owns adapter parameters: what trains, and what `save_adapter` writes."""

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """Adapter parameters by their name relative to this module."""
        ...


class LoraLinear(nn.Module):
    """A frozen linear layer plus a low-rank update. Never merges implicitly: see `merge`.

    Input (..., in) -> output (..., out). The fast path computes the base product itself from
    `base_layer.weight` and `.bias` (to add the LoRA update in place), so forward hooks on
    `base_layer` run only on the reference path; hooks on this module always run.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, lora_bias: bool = False, init: str = "kaiming"):
        super().__init__()
        if isinstance(base_layer, Conv1D):
            in_features, out_features = base_layer.weight.shape
        elif isinstance(base_layer, nn.Linear):
            out_features, in_features = base_layer.weight.shape
        else:
            raise TypeError(f"LoRA adapts nn.Linear and transformers Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # base weight is (in, out)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = base_layer.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias, device=device, dtype=torch.float32)
        self.merged = False
        self.disabled = False
        self.fast_path = True  # this layer may take fused.py's path (see fused.set_enabled)
        self.siblings: fused.SiblingGroup | None = None  # set by apply_lora for q/k/v-like layers
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {f"lora_{k}": p for k, p in (("A.weight", self.lora_A.weight), ("B.weight", self.lora_B.weight),
                                            ("B.bias", self.lora_B.bias)) if p is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if fused.applies(self, x):  # the same formula, computed faster on the CPU: fused.py
            return fused.forward(self, x)
        result = self._base_output(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        delta = self.lora_B(self.lora_A(self.lora_dropout(x if autocast else x.to(self.lora_A.weight.dtype))))
        return (result + self.scaling * delta).to(result.dtype)  # a bf16 base: summed in fp32, rounded once

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        bias, weight = self.base_layer.bias, self.base_layer.weight
        if bias is None or bias.dtype == weight.dtype or torch.is_autocast_enabled(x.device.type):
            return self.base_layer(x)
        # A trained base bias (bias="lora_only") stays fp32 on a lower-precision base (inject.py).
        out = x @ weight if self.fan_in_fan_out else nn.functional.linear(x, weight)
        return out + bias.to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, laid out like the base weight ((in, out) for Conv1D)."""
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta (and bias <- bias + scaling * b_L), computed in fp32, cast once; refuses
        non-finite results. Afterwards the forward is the base layer's alone."""
        if self.merged:
            raise RuntimeError("LoRA layer is already merged")
        weight = self.base_layer.weight
        merged = weight.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("merging gives non-finite weights: the adapter is broken")
        lora_bias = self.lora_B.bias
        if lora_bias is not None:
            if self.base_layer.bias is None:
                raise ValueError("cannot merge lora_bias into a layer without a bias")
            self.base_layer.bias.copy_(self.base_layer.bias.float() + self.scaling * lora_bias.float())
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to one rounding of the base dtype)."""
        if not self.merged:
            raise RuntimeError("LoRA layer is not merged")
        weight = self.base_layer.weight
        weight.copy_(weight.float() - self.delta_weight())
        if self.lora_B.bias is not None:
            self.base_layer.bias.copy_(self.base_layer.bias.float() - self.scaling * self.lora_B.bias.float())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, "
                f"dropout={self.dropout}, merged={self.merged}")


class ModulesToSave(nn.Module):
    """A module trained in full: a trainable copy (`modules_to_save`) beside the frozen original.

    The copy's state dict is what `save_adapter` writes under the module's own path (PEFT:
    `base_model.model.classifier.weight`). `disabled` routes the forward to the original.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = copy.deepcopy(original)
        self.disabled = False

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {f"modules_to_save.{k}": p for k, p in self.modules_to_save.named_parameters()}

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.original_module(*args, **kwargs)
        base_dtype = _float_dtype(self.original_module)
        train_dtype = _float_dtype(self.modules_to_save)
        if base_dtype == train_dtype or _autocast_on(args, kwargs):
            return self.modules_to_save(*args, **kwargs)
        # The copy trains in fp32 on a lower-precision base (inject.py) and no autocast runs: it
        # reads its inputs in fp32 and hands the model the base dtype, as the original would.
        args, kwargs = _cast_floats((args, kwargs), train_dtype)
        return _cast_floats(self.modules_to_save(*args, **kwargs), base_dtype)

    def __getattr__(self, name: str):
        # Model code may read the wrapped head's attributes (`self.score.weight.dtype`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "modules_to_save" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["modules_to_save"], name)


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _autocast_on(args: tuple, kwargs: dict) -> bool:
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    return any(torch.is_autocast_enabled(t.device.type) for t in tensors[:1])


def _cast_floats(value, dtype: torch.dtype | None):
    """`value` with every floating-point tensor in it (through tuples, lists, dicts) cast to `dtype`."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple | list):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value

"""lora_core: LoRA in plain PyTorch, with adapters in PEFT's on-disk format.

    cfg = LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    model = apply_lora(model, cfg)             # in place; base frozen
    optimizer = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-3)
    save_adapter(model, "out/")                # PEFT format + loraflow.json
    model2 = load_adapter(base_model, "out/")  # strict: keys, shapes, sha256
    with disable_adapter(model): ...           # base model outputs
    with use_fused(False): ...                 # the reference forward only (fused.py: the fast path)
    base = remove_lora(model)                  # the base model back

Imports neither ray nor workflows. `import lora_core.config` does not import torch either: the
torch-dependent names load on first use (PEP 562), so a process that only validates configs
stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import LoraConfig

_SOURCE = {  # public name -> the submodule defining it
    "AdapterModule": "layers",
    "adapter_parameters": "inject",
    "adapter_state_dict": "adapter_io",
    "apply_lora": "inject",
    "check_servable": "adapter_io",
    "disable_adapter": "merge",
    "load_adapter": "adapter_io",
    "merge_adapter": "merge",
    "remove_lora": "inject",
    "save_adapter": "adapter_io",
    "trainable_summary": "inject",
    "unmerge_adapter": "merge",
    "use_fused": "fused",
}
_SUBMODULES = ("adapter_io", "config", "fused", "inject", "layers", "merge", "targets")

__all__ = [  # LoraConfig and the keys of _SOURCE, spelled out for readers and linters
    "AdapterModule",
    "LoraConfig",
    "adapter_parameters",
    "adapter_state_dict",
    "apply_lora",
    "check_servable",
    "disable_adapter",
    "load_adapter",
    "merge_adapter",
    "remove_lora",
    "save_adapter",
    "trainable_summary",
    "unmerge_adapter",
    "use_fused",
]


def __getattr__(name: str):
    if name in _SOURCE:
        value = getattr(importlib.import_module(f".{_SOURCE[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCE, *_SUBMODULES})


if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from .adapter_io import adapter_state_dict, check_servable, load_adapter, save_adapter
    from .fused import use_fused
    from .inject import adapter_parameters, apply_lora, remove_lora, trainable_summary
    from .layers import AdapterModule
    from .merge import disable_adapter, merge_adapter, unmerge_adapter

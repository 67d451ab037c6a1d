"""lora_core: LoRA in plain PyTorch, with adapters in PEFT's on-disk format.

    cfg = LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    model = apply_lora(model, cfg)             # in place; base frozen
    optimizer = torch.optim.AdamW(adapter_parameters(model).values(), lr=1e-3)
    save_adapter(model, "out/")                # PEFT format + loraflow.json
    model2 = load_adapter(base_model, "out/")  # strict: keys, shapes, sha256
    with disable_adapter(model): ...           # base model outputs
    base = remove_lora(model)                  # the base model back

Imports neither ray nor workflows.
"""

from .adapter_io import adapter_state_dict, check_servable, load_adapter, save_adapter
from .config import LoraConfig
from .inject import adapter_parameters, apply_lora, remove_lora, trainable_summary
from .layers import AdapterModule
from .merge import disable_adapter, merge_adapter, unmerge_adapter

__all__ = [
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
]

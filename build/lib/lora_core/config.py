"""`LoraConfig`: what to adapt and how, plus its translation to and from PEFT's `adapter_config.json`.

The field names are loraflow's (`alpha`, `dropout`, `init`); `to_peft_dict` / `from_peft_dict` map them
onto PEFT 0.21's keys (`lora_alpha`, `lora_dropout`, `init_lora_weights`, ...) so an adapter directory
written here is read by PEFT unchanged, and one written by PEFT is read here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

BiasMode = Literal["none", "lora_only", "all"]
InitMode = Literal["kaiming", "gaussian"]

# PEFT's TaskType values; the task type picks the PeftModel subclass when PEFT loads the adapter.
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# PEFT config keys whose non-default value asks for a feature lora_core does not implement.
# Loading such an adapter silently without the feature would give wrong outputs, so it is refused.
_UNSUPPORTED_PEFT_KEYS = {
    "use_dora": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_pattern": (None, [], ""),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "alora_invocation_tokens": (None,),
}


@dataclass
class LoraConfig:
    """One LoRA adapter: `y = base(x) + scaling * B(A(dropout(x)))` on every targeted layer.

    Args:
        r: rank of A (r, in) and B (out, r).
        alpha: `scaling = alpha / r`, or `alpha / sqrt(r)` with `use_rslora`.
        dropout: probability on the LoRA branch's input only; 0 means no dropout op at all.
        target_modules: list = module name equals an entry or ends with "." + entry; str = `re.fullmatch`
            on the full module name; "all-linear" = every Linear/Conv1D but the output head;
            None = the architecture's default (see `targets.DEFAULT_TARGET_MODULES`).
        exclude_modules: same rules as `target_modules`, checked first.
        layers_to_transform: keep only matches whose first numeric path segment is in this set
            (list targets only, as in PEFT).
        use_rslora: rank-stabilised scaling.
        lora_bias: a trainable bias on B (`lora_B.bias`), scaled like the rest of the branch.
        bias: which base biases train and are saved: "none", "lora_only" (targeted layers) or "all".
        modules_to_save: modules trained in full and saved (a copy; the original stays frozen).
            For `task_type="SEQ_CLS"`, "classifier" and "score" are added, as PEFT does.
        init: A is kaiming-uniform(a=sqrt(5)) or gaussian(std=1/r); B is always zero.
        task_type: PEFT task type ("CAUSAL_LM", "SEQ_CLS", ...); inferred from the model class if None.
        base_model_name_or_path: written into adapter_config.json; the model's `name_or_path` if None.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    use_rslora: bool = False
    lora_bias: bool = False
    bias: BiasMode = "none"
    modules_to_save: list[str] | None = None
    init: InitMode = "kaiming"
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    # Set by apply_lora when a targeted layer is a transformers Conv1D (weight stored (in, out)).
    fan_in_fan_out: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoraConfig.alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in ("none", "lora_only", "all"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'lora_only' or 'all', got {self.bias!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoraConfig.init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"LoraConfig.task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        self.target_modules = _names("target_modules", self.target_modules)
        self.exclude_modules = _names("exclude_modules", self.exclude_modules)
        self.modules_to_save = _names("modules_to_save", list(self.modules_to_save)) if self.modules_to_save else None
        if isinstance(self.layers_to_transform, list | tuple):
            self.layers_to_transform = [int(i) for i in self.layers_to_transform]
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            # PEFT refuses this too: a regex already says exactly which layers it means.
            raise ValueError("LoraConfig.layers_to_transform cannot be combined with a string target_modules")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` content, with every key PEFT 0.21 writes (lists, never sets)."""
        targets = sorted(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        excludes = sorted(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        return {
            "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias, "corda_config": None, "eva_config": None, "exclude_modules": excludes,
            "fan_in_fan_out": self.fan_in_fan_out, "inference_mode": True,
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
            "layer_replication": None, "layers_pattern": None, "layers_to_transform": self.layers_to_transform,
            "loftq_config": {}, "lora_alpha": self.alpha, "lora_bias": self.lora_bias,
            "lora_dropout": self.dropout, "megatron_config": None, "megatron_core": "megatron.core",
            "modules_to_save": list(self.modules_to_save) if self.modules_to_save else None,
            "peft_type": "LORA", "r": self.r, "rank_pattern": {}, "revision": None,
            "target_modules": targets, "target_parameters": None, "task_type": self.task_type,
            "trainable_token_indices": None, "use_dora": False, "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Read a PEFT LoRA config; refuse (naming `source` and the key) what would load wrongly."""
        if data.get("peft_type") != "LORA":
            raise ValueError(f"{source}: peft_type is {data.get('peft_type')!r}, expected 'LORA'")
        for key in ("r", "lora_alpha"):
            # PEFT would default both to 8: a missing r breaks shapes, a missing alpha silently rescales.
            if key not in data:
                raise ValueError(f"{source}: required key {key!r} is missing")
        for key, defaults in _UNSUPPORTED_PEFT_KEYS.items():
            if key in data and data[key] not in defaults:
                raise ValueError(f"{source}: {key}={data[key]!r} is not supported by lora_core")
        if data.get("target_modules") is None:
            raise ValueError(f"{source}: target_modules is missing; cannot tell which layers the adapter adapts")
        init = data.get("init_lora_weights", True)
        try:
            return cls(
                r=data["r"], alpha=data["lora_alpha"], dropout=data.get("lora_dropout", 0.0),
                target_modules=data["target_modules"], exclude_modules=data.get("exclude_modules"),
                layers_to_transform=data.get("layers_to_transform"), use_rslora=data.get("use_rslora", False),
                lora_bias=data.get("lora_bias", False), bias=data.get("bias", "none"),
                modules_to_save=data.get("modules_to_save"),
                init="gaussian" if init == "gaussian" else "kaiming", task_type=data.get("task_type"),
                base_model_name_or_path=data.get("base_model_name_or_path"),
                fan_in_fan_out=data.get("fan_in_fan_out", False),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def _names(key: str, value: Any) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    names = list(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"LoraConfig.{key} must be a non-empty list of non-empty strings, got {value!r}")
    return names

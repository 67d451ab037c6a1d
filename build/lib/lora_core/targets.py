"""Which modules an adapter touches: PEFT's matching rules, default targets, sibling layers.

The rules are PEFT 0.21's (`check_target_module_exists`), so an adapter config means the same set of
layers here and in PEFT:
- a list entry matches a module whose full name equals it or ends with "." + entry;
- a string is `re.fullmatch`-ed against the full name;
- "all-linear" is every `nn.Linear` / `Conv1D` except the output head (and a SEQ_CLS head);
- `exclude_modules` (same rules) and `modules_to_save` are checked first and win;
- `layers_to_transform` filters list matches (not exact full-name matches) by the first numeric
  path segment (`model.layers.3.self_attn.q_proj` -> 3).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

try:  # transformers is optional for lora_core; without it there is simply no Conv1D to adapt.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    class Conv1D(nn.Module):  # type: ignore[no-redef]
        pass

from .config import LoraConfig

LINEAR_TYPES = (nn.Linear, Conv1D)
SEQ_CLS_HEAD_NAMES = ("classifier", "score")

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (constants.py), the entries we can adapt.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
         "opt", "gptj", "gpt_neo", "bart", "stablelm"], ["q_proj", "v_proj"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon", "chatglm", "RefinedWeb", "RefinedWebModel"],
                    ["query_key_value"]),
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    "btlm": ["c_proj", "c_attn"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}

# Children of one parent that the model's forward calls on the *same* input tensor. On the fast path
# targeted siblings share one dropout mask, one fused A matmul and one autograd node (`fused.py`); if
# a model calls them on different tensors after all (cross-attention k/v), they fall back to separate
# work, and the first sibling's call has computed their outputs on its own input for nothing.
SIBLING_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),   # Llama, Mistral, Qwen, OPT, ...
    frozenset({"gate_proj", "up_proj"}),         # gated MLPs
    frozenset({"query", "key", "value"}),        # BERT family
    frozenset({"q", "k", "v"}),                  # T5
    frozenset({"w1", "w3"}),                     # Mixtral experts
)


def name_matches(patterns: list[str] | str, name: str) -> bool:
    """PEFT's rule: a str is `re.fullmatch`; a list entry equals `name` or is a dotted suffix of it."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def layer_index(name: str) -> int | None:
    """First numeric path segment after at least two segments, lazily (so `experts.N` is not taken)."""
    match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def is_saved_module_path(modules_to_save: list[str] | None, name: str) -> bool:
    """True for a module listed in (or inside one listed in) `modules_to_save`: never a LoRA target."""
    return bool(modules_to_save) and any(
        re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def is_target(config: LoraConfig, name: str) -> bool:
    """Does `config` adapt the module called `name`? (`config.target_modules` must be resolved.)"""
    targets = config.target_modules
    if config.exclude_modules and name_matches(config.exclude_modules, name):
        return False
    if is_saved_module_path(config.modules_to_save, name):
        return False
    if isinstance(targets, str):
        return name_matches(targets, name)
    if name in targets:
        return True  # PEFT: an exact full-name entry is not filtered by layers_to_transform
    if not name_matches(targets, name):
        return False
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name)
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def output_head_names(model: nn.Module, task_type: str | None) -> set[str]:
    """Names "all-linear" leaves alone: the LM head (output embeddings) or a classification head."""
    heads: list[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    elif task_type == "SEQ_CLS":
        heads += [getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """`config.target_modules` made concrete: None -> the architecture default, "all-linear" -> the
    full names of the model's linear layers minus the output head (what PEFT saves in that case)."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"no default LoRA target modules for model_type {model_type!r}; pass target_modules "
                f"(this model's linear layers: {', '.join(linear_leaf_names(model)) or 'none'})")
        return list(DEFAULT_TARGET_MODULES[model_type])
    if isinstance(targets, str) and targets.lower() == "all-linear":
        heads = output_head_names(model, config.task_type)
        return sorted(n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and n not in heads)
    return targets


def linear_leaf_names(model: nn.Module, limit: int = 20) -> list[str]:
    """Distinct last path segments of the model's Linear/Conv1D layers (for error messages)."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)[:limit]


def sibling_groups(names: Iterable[str]) -> list[list[str]]:
    """Group targeted module names that share a parent and a `SIBLING_NAMES` set (2+ members each)."""
    groups: dict[tuple[str, frozenset[str]], list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        for family in SIBLING_NAMES:
            if leaf in family:
                groups.setdefault((parent, family), []).append(name)
    return [members for members in groups.values() if len(members) > 1]

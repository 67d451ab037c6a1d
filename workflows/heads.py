"""Tasks and heads: which transformers class a task loads, and what feeds a classification head
(the model's own pooling, or the mean over the real tokens).

`model.pooling` in the config; `workflows.models.load_base(..., pooling=...)` applies it, the adapter
records it (its loraflow.json holds the config), and evaluate, `predict` and warm starts follow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POOLINGS = ("default", "mean")


@dataclass(frozen=True)
class Task:
    """What a task is made of: the transformers class it loads, the `data.format` that feeds it, and
    whether it has a fresh head with `num_labels` outputs (trained in full, saved as `modules_to_save`)
    and a label per token (token_cls: its loss and accuracy count labelled tokens, not rows)."""

    model_class: str
    data_format: str | None  # None: every other format (the causal LM ones)
    head: bool
    per_token_labels: bool


TASK_SPECS = {
    "causal_lm": Task("AutoModelForCausalLM", None, head=False, per_token_labels=True),
    "seq_cls": Task("AutoModelForSequenceClassification", "classification", head=True, per_token_labels=False),
    "token_cls": Task("AutoModelForTokenClassification", "token_classification", head=True, per_token_labels=True),
}
TASKS = tuple(TASK_SPECS)


def model_class(task: str) -> Any:
    """The transformers Auto class of `task` (`TASK_SPECS`)."""
    import transformers

    return getattr(transformers, TASK_SPECS[task].model_class)


def task_of_format(fmt: str) -> str:
    """The task a `data.format` trains."""
    return next((t for t, spec in TASK_SPECS.items() if spec.data_format == fmt), "causal_lm")


def has_head(task: str) -> bool:
    return TASK_SPECS[task].head


def check_task(name: str, task: str, num_labels: int | None, pooling: str, encoder: bool) -> None:
    """Refuse what `load_base` cannot build, naming the model and the value."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if has_head(task) and (num_labels is None or num_labels < 2):
        raise ValueError(f"task={task!r} needs num_labels >= 2 (got {num_labels!r}) for {name!r}")
    if task == "causal_lm" and encoder:
        raise ValueError(f"{name!r} is an encoder (BERT) model: use task='seq_cls' or 'token_cls'")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling != "default" and task != "seq_cls":
        raise ValueError(f"pooling {pooling!r} feeds a sequence classifier; task {task!r} has none")


def pooling_of(lineage: dict[str, Any]) -> str:
    """The pooling an adapter was trained with, from its loraflow.json ("default" when absent)."""
    return ((lineage.get("config") or {}).get("model") or {}).get("pooling", "default")


def task_of_lineage(lineage: dict[str, Any]) -> str:
    """The task an adapter was trained for, from its loraflow.json ("seq_cls" when absent: predict's
    first task)."""
    return ((lineage.get("config") or {}).get("model") or {}).get("task", "seq_cls")


def max_seq_len_of(lineage: dict[str, Any], default: int = 512) -> int:
    """The `data.max_seq_len` an adapter was trained with (its loraflow.json), else `default`."""
    return int(((lineage.get("config") or {}).get("data") or {}).get("max_seq_len", default))


def apply_pooling(model: Any, pooling: str) -> Any:
    return use_mean_pooling(model) if pooling == "mean" else model


def use_mean_pooling(model: Any) -> Any:
    """Feed a BERT classifier's head the mean of the last hidden states over the real (unpadded)
    tokens instead of its pooler (dense + tanh on the first token), in place. Sentence-transformers
    encoders such as all-MiniLM-L6-v2 were trained to be read this way; their pooler never was.

    The pooler only ever sees the hidden states, so the mean is taken in a forward hook on the
    encoder, which sees the call's attention mask; the pooler becomes a parameter-free placeholder.
    Stateless: nothing is kept between calls. PEFT users load such an adapter onto
    `use_mean_pooling(AutoModelForSequenceClassification.from_pretrained(...))`.
    """
    import torch

    encoder = getattr(model, model.base_model_prefix, None)
    if getattr(encoder, "pooler", None) is None:
        raise ValueError(f"model.pooling 'mean' needs an encoder with a pooler (BERT-like); "
                         f"{type(model).__name__} has none")

    class MeanPoolingPlaceholder(torch.nn.Module):
        """Keeps `pooler_output` in the encoder's output; the hook below overwrites it."""

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden[:, 0]

    def mean_over_tokens(_module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden = output[0]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if isinstance(output, tuple):
            return (hidden, pooled, *output[2:])
        output["pooler_output"] = pooled
        return output

    encoder.pooler = MeanPoolingPlaceholder()
    encoder.register_forward_hook(mean_over_tokens, with_kwargs=True)
    return model

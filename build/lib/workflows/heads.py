"""Tasks and heads: which transformers class a task loads, and what feeds a classification head
(the model's own pooling, or the mean over the real tokens).

`model.pooling` in the config; `workflows.models.load_base(..., pooling=...)` applies it, the adapter
records it (its loraflow.json holds the config), and evaluate, `predict` and warm starts follow it.
"""

from __future__ import annotations

from typing import Any

TASKS = ("causal_lm", "seq_cls")
POOLINGS = ("default", "mean")


def model_class(task: str) -> Any:
    """AutoModelForCausalLM for "causal_lm", AutoModelForSequenceClassification for "seq_cls"."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "seq_cls" else AutoModelForCausalLM


def check_task(name: str, task: str, num_labels: int | None, pooling: str, encoder: bool) -> None:
    """Refuse what `load_base` cannot build, naming the model and the value."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "seq_cls" and (num_labels is None or num_labels < 2):
        raise ValueError(f"task='seq_cls' needs num_labels >= 2 (got {num_labels!r}) for {name!r}")
    if task == "causal_lm" and encoder:
        raise ValueError(f"{name!r} is an encoder (BERT) model: use task='seq_cls'")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def pooling_of(lineage: dict[str, Any]) -> str:
    """The pooling an adapter was trained with, from its loraflow.json ("default" when absent)."""
    return ((lineage.get("config") or {}).get("model") or {}).get("pooling", "default")


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

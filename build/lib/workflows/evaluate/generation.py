"""Greedy batched generation, answer matching, and the `generate` / `predict` library calls.

Evaluation and the `loraflow generate` / `loraflow predict` commands share this code, so what a
user sees from one command is what the evaluate stage measured.

Matching a generated answer against the reference text:
- exact: the two texts equal after stripping surrounding whitespace;
- normalised (`eval.generation.match`): "exact" also collapses inner whitespace; "gsm8k" compares
  the final number (after the last `####`, else the last number in the text; commas, `$` and a
  trailing `.0` ignored); "json" compares the parsed JSON values (the first `{...}`/`[...]` in
  the prediction when the whole text is not JSON).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from lora_core import load_adapter
from workflows.heads import pooling_of
from workflows.models import load_base

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


# ----------------------------------------------------------------------------- answer matching

def _final_number(text: str) -> Decimal | None:
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    try:
        return Decimal(found[0 if "####" in text else -1].replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def _json_value(text: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return decoder.raw_decode(text[i:])[0]
            except json.JSONDecodeError:
                continue
    return _NO_JSON


_NO_JSON = object()


def exact_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def normalized_match(prediction: str, reference: str, kind: str) -> bool:
    """Task-normalised equality (see the module docstring); `kind` is exact | gsm8k | json."""
    if kind == "exact":
        return " ".join(prediction.split()) == " ".join(reference.split())
    if kind == "gsm8k":
        ref = _final_number(reference)
        return ref is not None and _final_number(prediction) == ref
    if kind == "json":
        ref = _json_value(reference)
        return ref is not _NO_JSON and _json_value(prediction) == ref
    raise ValueError(f"unknown match kind {kind!r}; expected exact, gsm8k or json")


# ----------------------------------------------------------------------------- generation

def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    batch_size: int = 8, streamer: Any = None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, `batch_size` prompts per `generate` call.

    Prompts are left-padded (the attention mask hides the padding; positions follow the mask), so
    a prompt's continuation does not depend on its batch mates. Each continuation stops at the
    first EOS (which is dropped) or after `max_new_tokens` tokens.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt")
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # An explicit config: the model's own defaults (sampling, temperature) must not leak in.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad_id)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids, mask = _left_pad(chunk, pad_id)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                              generation_config=config, streamer=streamer)
        for row in seqs[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def chat_prompt_ids(tokenizer: Any, prompt: str, system_prompt: str | None = None) -> list[int]:
    """The prompt as the model saw it in training: chat template (with the generation prompt)
    when the tokenizer has one, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _adapter_meta(adapter_dir: Path | None) -> dict[str, Any]:
    path = adapter_dir / "loraflow.json" if adapter_dir else None
    return json.loads(path.read_text()) if path and path.is_file() else {}


def _model_name(model_name: str | None, meta: dict[str, Any]) -> str:
    name = model_name or (meta.get("base_model") or {}).get("name")
    if not name:
        raise ValueError("no base model given and the adapter's loraflow.json names none: pass model_name")
    return name


def default_device() -> str:
    """"cuda" when this process sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_dtype(meta: dict[str, Any], requested: str | None = None) -> str:
    """The dtype `generate` and `predict` load the base in: `requested` (`--dtype`) if given, else the
    `model.dtype` the adapter's loraflow.json records (what it was trained on), else "auto" (bf16 on a
    GPU or CPU with native bf16, fp16 on other GPUs): never an fp32 copy of a large base by default."""
    if requested:
        return requested
    return ((meta.get("config") or {}).get("model") or {}).get("dtype") or "auto"


def _load(model_name: str | None, adapter_dir: Path | None, dtype: str | None = None, **base_kwargs):
    meta = _adapter_meta(adapter_dir)
    if base_kwargs.get("task") == "seq_cls":  # the head is fed as it was in training
        base_kwargs["pooling"] = pooling_of(meta)
    model, tokenizer = load_base(_model_name(model_name, meta), dtype=load_dtype(meta, dtype), **base_kwargs)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model.eval(), tokenizer, meta


class _CallbackStreamer:
    """A transformers streamer that hands each newly decodable piece of text to `on_token`."""

    def __init__(self, tokenizer: Any, on_token: Callable[[str], None], eos: list[int]):
        self.tokenizer, self.on_token, self.eos = tokenizer, on_token, set(eos)
        self.tokens: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(t for t in value.reshape(-1).tolist() if t not in self.eos)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > self.printed:
            self.on_token(text[self.printed:])
            self.printed = len(text)

    def end(self) -> None:
        pass


def generate(model_name: str | None, adapter_dir: str | Path | None, prompts: Sequence[str],
             max_new_tokens: int = 128, on_token: Callable[[str], None] | None = None,
             system_prompt: str | None = None, batch_size: int = 8, device: str | None = None,
             dtype: str | None = None) -> list[str]:
    """Greedy answers to chat prompts from a base model plus an optional adapter folder.

    `model_name` defaults to the base recorded in the adapter's loraflow.json, `dtype` to the one it
    records (`load_dtype`). With `on_token`, text is streamed as it is produced (prompts then run one
    at a time).
    """
    model, tokenizer, _ = _load(model_name, Path(adapter_dir) if adapter_dir else None,
                                device=device or default_device(), dtype=dtype)
    ids = [chat_prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    if on_token is None:
        outs = greedy_generate(model, tokenizer, ids, max_new_tokens, batch_size=batch_size)
    else:
        outs = []
        for prompt in ids:
            streamer = _CallbackStreamer(tokenizer, on_token, eos_token_ids(model, tokenizer))
            outs += greedy_generate(model, tokenizer, [prompt], max_new_tokens, streamer=streamer)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def label_names_of(adapter_dir: Path) -> list[str] | None:
    """Class names the train stage stored in the adapter's loraflow.json (top level or `extra`)."""
    meta = _adapter_meta(adapter_dir)
    names = meta.get("label_names") or (meta.get("extra") or {}).get("label_names")
    return list(names) if names else None


@torch.inference_mode()
def predict(model_name: str | None, adapter_dir: str | Path, texts: Sequence[str],
            label_names: Sequence[str] | None = None, max_length: int = 512,
            device: str | None = None, dtype: str | None = None) -> list[dict[str, Any]]:
    """Classify texts with a sequence-classification adapter (base loaded in `load_dtype`).

    Returns one `{"text", "label", "label_id", "score"}` per text (`score` = softmax probability of
    the predicted class). Label names come from `label_names` or the adapter's loraflow.json.
    """
    adapter_dir = Path(adapter_dir)
    names = list(label_names) if label_names else label_names_of(adapter_dir)
    if not names:
        raise ValueError(f"{adapter_dir / 'loraflow.json'} has no label_names; pass label_names explicitly")
    device = device or default_device()
    model, tokenizer, _ = _load(model_name, adapter_dir, task="seq_cls", num_labels=len(names), device=device,
                                dtype=dtype)
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    probs = model(input_ids=enc["input_ids"].to(device),
                  attention_mask=enc["attention_mask"].to(device)).logits.float().softmax(-1).cpu()
    score, pred = probs.max(-1)
    return [{"text": t, "label": names[i], "label_id": i, "score": s}
            for t, i, s in zip(texts, pred.tolist(), score.tolist())]

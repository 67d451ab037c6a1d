"""The Ray Data UDF of the evaluate stage: one actor scores every model on each batch it is given.

Each actor loads the base model once. Per batch it scores, on the same collated tensors, the
adapter currently loaded, then the base (the adapter switched off with `lora_core.disable_adapter`),
then any other adapter (swapped in with `remove_lora` + `load_adapter`, never by reloading the
base). Starting each batch with whatever adapter is loaded costs one swap per batch when two
adapters are scored. When exactly one model is scored and it is an adapter, the adapter is merged
into the base once per actor (no LoRA branch in the forward at all).

Output: one row per (example, model) with the sums from which every aggregate is exact:

    causal:   example_id, model, loss_sum (float64, nats), tokens, correct_tokens,
              generated (bool), prediction (str), exact_match (bool), normalized_match (bool)
    seq_cls:  example_id, model, label, pred, loss (float64, nats), correct (bool)
    both:     tokens_in (the row's tokens), padded_to (the width of the forward it was in), actor (str),
              base_loads (int: how many times this actor loaded the base; always 1), gpus (float: the
              GPUs Ray assigned the actor)
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

import lora_core
from workflows.adapters import AdapterFiles
from workflows.collate import IGNORE_INDEX, collator_for
from workflows.evaluate.generation import exact_match, greedy_generate, normalized_match
from workflows.models import load_base

BASE, NEW, CHAMPION = "base", "new", "champion"


@dataclass(frozen=True)
class ScorerSpec:
    """Everything an actor needs, picklable. `adapters` maps a model key ("new", "champion") to the
    adapter's files (they travel with the spec; no actor opens a driver path); "base" is scored
    when `score_base`."""

    model_name: str
    task: str  # "causal_lm" | "seq_cls"
    manifest: dict[str, Any]
    adapters: dict[str, AdapterFiles]
    score_base: bool = True
    dtype: str = "float32"
    pooling: str = "default"  # model.pooling: every adapter scored here was trained with it
    num_labels: int | None = None
    threads: int | None = None
    # Greedy generation on these example ids only (causal LM); empty: no generation.
    generate_ids: frozenset[str] = field(default_factory=frozenset)
    max_new_tokens: int = 64
    generation_batch_size: int = 8
    match: str = "exact"
    batch_size: int = 8  # rows per forward; a call's rows are sorted by length and cut into these
    gpus: float = 0.0  # GPUs this actor requests (the model goes on its GPU when it has one)

    @property
    def models(self) -> list[str]:
        return ([BASE] if self.score_base else []) + list(self.adapters)

    @property
    def merged(self) -> bool:
        """The fast path: one model scored, and it is an adapter."""
        return not self.score_base and len(self.adapters) == 1


class EvalScorer:
    """Callable class for `Dataset.map_batches(..., compute=ActorPoolStrategy(size=n))`."""

    def __init__(self, spec: ScorerSpec):
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.actor = uuid.uuid4().hex[:12]
        # Seeded: a seq_cls base gets a fresh head, and every actor must build the same one.
        torch.manual_seed(0)
        self.resources = ray.get_runtime_context().get_assigned_resources()
        self.device = torch.device("cuda" if spec.gpus and torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_base(spec.model_name, task=spec.task, num_labels=spec.num_labels,
                                               dtype=spec.dtype, device=str(self.device), pooling=spec.pooling)
        self.base_loads = 1
        self.collate = collator_for(spec.manifest, "eval")
        self.loaded: str | None = None
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        # Each adapter's files, written once into this actor's own temp folder.
        self._folders = tempfile.TemporaryDirectory(prefix="loraflow-eval-")
        self.adapter_dirs = {key: files.write(Path(self._folders.name) / key) for key, files in spec.adapters.items()}
        if spec.adapters:
            self._swap_to(next(iter(spec.adapters)))
        if spec.merged:
            lora_core.merge_adapter(self.model)

    # -- switching models --------------------------------------------------------------------

    def _swap_to(self, key: str) -> None:
        if self.loaded == key:
            return
        if self.loaded is not None:
            lora_core.remove_lora(self.model)
            self.loaded = None
        lora_core.load_adapter(self.model, self.adapter_dirs[key])
        self.loaded = key

    def _order(self) -> list[str]:
        """Loaded adapter first, then the base (adapter switched off), then the others."""
        models = self.spec.models
        first = [self.loaded] if self.loaded in models else []
        return first + sorted((m for m in models if m not in first), key=lambda m: m != BASE)

    @contextlib.contextmanager
    def _active(self, key: str):
        if key == BASE:
            with lora_core.disable_adapter(self.model) if self.loaded else contextlib.nullcontext():
                yield
        else:
            self._swap_to(key)
            yield

    # -- scoring -----------------------------------------------------------------------------

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every model's rows for `batch`. Rows are sorted by length and scored `batch_size` at a time,
        so each forward pads to its own longest row and little else (order does not matter here)."""
        ids = np.array([str(x) for x in batch["example_id"]], dtype=object)
        lengths = np.array([len(x) for x in batch["input_ids"]])
        order = np.argsort(lengths, kind="stable")
        chunks = [order[i:i + self.spec.batch_size] for i in range(0, len(order), self.spec.batch_size)]
        parts = []
        for key in self._order():
            with self._active(key):
                for rows in chunks:
                    sub = {name: column[rows] for name, column in batch.items()}
                    tensors = {k: v.to(self.device) for k, v in self.collate(sub).items()}
                    scored = self._score_causal(tensors) if self.spec.task == "causal_lm" else self._score_classes(tensors)
                    width = tensors["input_ids"].shape[1]
                    parts.append({"example_id": ids[rows], "model": np.full(len(rows), key, dtype=object),
                                  "tokens_in": lengths[rows], "padded_to": np.full(len(rows), width), **scored})
                if self.spec.task == "causal_lm":
                    parts[-len(chunks):] = self._with_generation(batch, order, parts[-len(chunks):])
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(out["model"])
        out["actor"] = np.full(n, self.actor, dtype=object)
        out["base_loads"] = np.full(n, self.base_loads, dtype=np.int32)
        out["gpus"] = np.full(n, float(self.resources.get("GPU", 0.0)))
        return out

    @torch.inference_mode()
    def _score_causal(self, t: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        targets = t["labels"][:, 1:]
        mask = targets != IGNORE_INDEX
        # Only positions that predict a label need the vocabulary projection (for the demo's
        # prompts, three quarters of the positions): logits for the last `keep` positions only.
        scored = mask.any(0).nonzero()
        first = int(scored[0]) if len(scored) and self._logits_to_keep else 0
        keep = {"logits_to_keep": t["input_ids"].shape[1] - first} if first else {}
        logits = self.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], use_cache=False,
                            **keep).logits
        targets, mask = targets[:, first:], mask[:, first:]
        shifted = logits[:, :-1].float()
        # Same per-token NLL as training's `causal_token_nll`; summed in float64 so that the
        # aggregate over any number of actors and batches is the same number.
        nll = F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                              reduction="none").view_as(targets)
        correct = (shifted.argmax(-1) == targets) & mask
        return {"loss_sum": nll.double().sum(1).cpu().numpy(), "tokens": mask.sum(1).cpu().numpy().astype(np.int64),
                "correct_tokens": correct.sum(1).cpu().numpy().astype(np.int64)}

    def _with_generation(self, batch: dict[str, np.ndarray], order: np.ndarray, parts: list[dict]) -> list[dict]:
        """Greedy answers for the rows of `generate_ids` (all of this call's, in length order, so the
        generation batches are full and evenly padded), added to the chunks' columns."""
        chosen = [i for i in order if str(batch["example_id"][i]) in self.spec.generate_ids]
        answers: dict[int, str] = {}
        if chosen:
            prompts = [np.asarray(batch["input_ids"][i])[: int(batch["prompt_len"][i])].tolist() for i in chosen]
            outs = greedy_generate(self.model, self.tokenizer, prompts, self.spec.max_new_tokens,
                                   batch_size=self.spec.generation_batch_size)
            answers = {i: self.tokenizer.decode(toks, skip_special_tokens=True) for i, toks in zip(chosen, outs)}
        start = 0
        for part in parts:
            rows = order[start:start + len(part["model"])]
            start += len(rows)
            texts = [answers.get(i) for i in rows]
            refs = [str(batch["reference"][i]) for i in rows]
            part["generated"] = np.array([t is not None for t in texts])
            part["prediction"] = np.array([t or "" for t in texts], dtype=object)
            part["exact_match"] = np.array([t is not None and exact_match(t, r) for t, r in zip(texts, refs)])
            part["normalized_match"] = np.array([t is not None and normalized_match(t, r, self.spec.match)
                                                 for t, r in zip(texts, refs)])
        return parts

    @torch.inference_mode()
    def _score_classes(self, t: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        logits = self.model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits.float()
        labels = t["labels"]
        pred = logits.argmax(-1)
        loss = F.cross_entropy(logits, labels, reduction="none").double()
        return {"label": labels.cpu().numpy(), "pred": pred.cpu().numpy(), "loss": loss.cpu().numpy(),
                "correct": (pred == labels).cpu().numpy()}


def default_threads(actors: int) -> int:
    """Intra-op threads per actor so that the actors of one node share its cores."""
    return max(1, (os.cpu_count() or 1) // max(1, actors))

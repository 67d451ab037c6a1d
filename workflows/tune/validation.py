"""A tune trial's validation: the evaluate stage's own scoring and metrics, on the model in training.

Every `train.eval_every` steps each rank of a trial hands its model to `TrialValidator`, which scores
the rank's share of the validation split (carved out of the train rows by prepare) with the evaluate
stage's `EvalScorer`; rank 0 gathers every rank's scored rows and aggregates them with the evaluate
stage's `aggregate`: whatever metric the evaluate stage computes for the task (loss, accuracy,
macro_f1, exact_match, and any a task adds) is reported as `validation_<metric>`, so any of them can
drive the search. The eval split is never read here.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from workflows import storage
from workflows.collate import collator_for
from workflows.evaluate.metrics import aggregate
from workflows.evaluate.scorer import NEW, EvalScorer, ScorerSpec
from workflows.models import load_tokenizer
from workflows.train.metrics import gather

PREFIX = "validation_"


def metric_key(metric: str) -> str:
    """The reported key of a `tune.metric`: `validation_<metric>` ("eval_loss" is the loss)."""
    return PREFIX + ("loss" if metric == "eval_loss" else metric)


class _ScorerOnModel(EvalScorer):
    """`EvalScorer` on a model already in memory (a trial's, mid-training): no base is loaded and no
    adapter swapped; the one model scored is the trial's, under the key "new"."""

    def __init__(self, spec: ScorerSpec, model: nn.Module, tokenizer: Any):
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.actor, self.base_loads, self.resources = "trial", 0, {}
        self.device = next(model.parameters()).device
        self.collate = collator_for(spec.manifest, "eval")
        self.loaded = NEW
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass
class TrialValidator:
    """Picklable; travels to the trial's workers in `WorkerConfig.validator`."""

    files: list[str]  # the validation shards (local paths or store URIs every node reads)
    spec: ScorerSpec  # task, manifest, batch size, generation (exact_match) settings
    label_names: list[str] | None = None
    _batch: dict[str, np.ndarray] | None = field(default=None, repr=False)
    _tokenizer: Any = field(default=None, repr=False)

    def rows(self) -> dict[str, np.ndarray]:
        """The validation rows as one numpy batch (read once per worker and kept)."""
        if self._batch is None:
            from ray.data.block import BlockAccessor

            table = storage.read_parquet(self.files, columns=None)  # type: ignore[arg-type]  # every column
            self._batch = BlockAccessor.for_block(table).to_batch_format("numpy")
        return self._batch

    def __call__(self, model: nn.Module, rank: int = 0, world: int = 1) -> dict[str, Any]:
        """Rank `rank` of `world` scores rows rank, rank + world, ...; every rank must call it (the
        scored rows are gathered); rank 0 returns the metrics, the others {}."""
        batch = self.rows()
        if not len(batch["example_id"]):
            return {PREFIX + "rows": 0} if rank == 0 else {}
        if self.spec.generate_ids and self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.spec.model_name)
        model.eval()
        share = {k: v[rank::world] for k, v in batch.items()}
        scored = _ScorerOnModel(self.spec, model, self._tokenizer)(share) if len(share["example_id"]) else None
        parts = [p for p in gather(scored, world) if p is not None]
        if rank != 0:
            return {}
        scored = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out: dict[str, Any] = {PREFIX + "rows": len(scored["example_id"]), PREFIX + "ids_sha256": hashlib.sha256(
            "\n".join(sorted(str(i) for i in scored["example_id"])).encode()).hexdigest()}
        metrics = aggregate(self.spec.task, scored, self.label_names)
        out.update({PREFIX + k: float(v) for k, v in metrics.items()
                    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and k != "rows"})
        if PREFIX + "loss" in out:  # the trial's eval rows are these: its loop makes no pass of its own
            out["eval_loss"] = out[PREFIX + "loss"]
        return out


def trial_validator(prepared_manifest: dict[str, Any], files: list[str], model_name: str, metric: str,
                    eval_batch_size: int, generation: Any) -> TrialValidator:
    """The validator of a sweep over prepared data with `prepared_manifest`. Generation (for
    exact_match and normalized_match) runs only when the metric asks for it, on the first
    `eval.generation.num_prompts` validation rows, as the evaluate stage does on eval."""
    task = prepared_manifest["task"]
    generate: frozenset[str] = frozenset()
    if metric in ("exact_match", "normalized_match"):
        ids = storage.read_parquet(files, columns=["example_id"]).column("example_id").to_pylist()
        generate = frozenset(str(i) for i in ids[:generation.num_prompts])
    labels = prepared_manifest.get("label_names")
    spec = ScorerSpec(model_name=model_name, task=task, manifest=prepared_manifest, adapters={NEW: None},
                      score_base=False, num_labels=len(labels) if labels else None, generate_ids=generate,
                      max_new_tokens=generation.max_new_tokens, generation_batch_size=generation.batch_size,
                      match=generation.match, batch_size=eval_batch_size)
    return TrialValidator(files, spec, labels)

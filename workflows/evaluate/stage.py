"""The evaluate stage: base, new adapter and champion scored on the same eval rows, with Ray Data.

    read_parquet(eval shards) ─► map_batches(EvalScorer, actor pool) ─► write_parquet(per_example/)
                                  (one base load per actor;                │
                                   every model scores each batch)         ▼
                                           driver: count rows in and out, aggregate, bootstrap
                                                   ─► metrics.json

Output `<work>/evaluate/<fingerprint>/` (docs/artifacts.md): `per_example/part-*.parquet` (one row
per example and model, see `workflows.evaluate.scorer`) and `metrics.json`:

    {"task", "rows", "models": {"base": {...}, "new": {...}, "champion": {...}?},
     "diff": {metric: {"new_minus_champion", "ci95", "new_minus_base", "ci95_vs_base"}},
     "champion_ref": "name:3"?, "adapter", "base_model", "merged", "actors": {id: {"rows", "base_loads"}}}

Rows are counted in (Parquet metadata and example ids of the eval shards) and out (per model): a
lost or doubled row fails the stage, naming an example id, before anything is committed.

With the work directory on an object store the eval shards are read from the store, and the stage
directory is a staging folder on the driver that other nodes cannot see: the scored blocks come
back to the driver, which writes the part files itself.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from workflows import shards, storage
from workflows.adapters import AdapterFiles
from workflows.artifacts import atomic_write_json, is_uri, stage_output
from workflows.config import PipelineConfig
from workflows.evaluate.metrics import aggregate, paired_bootstrap
from workflows.evaluate.scorer import BASE, CHAMPION, NEW, EvalScorer, ScorerSpec, default_threads
from workflows.prepared import PreparedData, PreparedDataError

_INPUT_COLUMNS = {"causal_lm": ["input_ids", "labels", "example_id", "prompt_len", "reference"],
                  "seq_cls": ["input_ids", "label", "example_id"],
                  "token_cls": ["input_ids", "labels", "example_id", "word_ids", "word_labels"]}


ACTOR_START_TIMEOUT_S = 600  # loading a base model on a busy node can take minutes
BUCKET_BATCHES = 8  # batches an actor sorts by length together


class RowCountError(RuntimeError):
    """Evaluation output does not hold exactly one row per eval example and model."""


@dataclass(frozen=True)
class EvalResult:
    out_dir: Path
    metrics: dict[str, Any]
    per_example: list[Path]

    @property
    def rows(self) -> int:
        return int(self.metrics["rows"])


def _example_ids(files: list[str]) -> list[str]:
    table = storage.read_parquet(files, columns=["example_id"])
    rows_meta = sum(storage.parquet_rows(f) for f in files)
    ids = [str(x) for x in table.column("example_id").to_pylist()]
    if len(ids) != rows_meta:
        raise RowCountError(f"eval shards hold {rows_meta} rows by metadata but {len(ids)} example ids")
    return ids


def _spec(config: PipelineConfig, prepared: PreparedData, new: AdapterFiles, champion: AdapterFiles | None,
          ids: list[str]) -> ScorerSpec:
    gen = config.eval.generation
    causal = prepared.task == "causal_lm"
    # The first rows of the eval split (in file order, itself ordered by example hash): they arrive
    # together, so generation runs in few, full batches instead of a few prompts per eval batch.
    generate_ids = frozenset(ids[: gen.num_prompts]) if causal and gen.num_prompts else frozenset()
    adapters = {NEW: new, **({CHAMPION: champion} if champion else {})}
    labels = prepared.manifest.get("label_names")
    if champion is not None:  # scored on the same base as the new adapter
        champion.check_pooling(config.model.pooling, "champion")
    return ScorerSpec(model_name=config.model.name, task=prepared.task, revision=config.model.revision,
                      manifest=prepared.manifest,
                      adapters=adapters, score_base=config.eval.compare_base, dtype=config.model.dtype,
                      pooling=config.model.pooling, num_labels=len(labels) if labels else None,
                      threads=default_threads(config.eval.actors),
                      generate_ids=generate_ids, max_new_tokens=gen.max_new_tokens,
                      generation_batch_size=gen.batch_size, match=gen.match, batch_size=config.eval.batch_size,
                      gpus=gpus_per_actor(config))


def champion_not_comparable(champion: AdapterFiles | None, labels: list[str] | None) -> str | None:
    """Why a classifier champion cannot be scored on rows labelled with `labels` (None: it can).
    Its head predicts its own classes: scored against other label ids its numbers mean nothing."""
    if champion is None or labels is None or champion.label_names == list(labels):
        return None
    theirs = champion.label_names
    return (f"not comparable: the champion {champion.ref} was trained on "
            f"{_shown(theirs) if theirs else 'labels it did not record'}, these eval rows use {_shown(list(labels))}")


def _shown(names: list[str]) -> str:
    return f"{len(names)} labels {names[:5]}{' ...' if len(names) > 5 else ''}"


def gpus_per_actor(config: PipelineConfig) -> float:
    """`eval.gpus_per_actor`, by default one GPU per actor when training uses GPUs."""
    if config.eval.gpus_per_actor is not None:
        return config.eval.gpus_per_actor
    return 1.0 if config.train.use_gpu else 0.0


def call_rows(spec: ScorerSpec, actors: int, rows: int) -> int:
    """Rows per actor call. Each call gets a window of up to BUCKET_BATCHES batches, which the actor
    sorts by length (little padding), but never so few windows that an actor of the pool goes without
    work. With generation on, a call holds at most one generation batch: Ray Data stops a dataset that
    moves no block for `execution_no_progress_timeout_s` (30 min), and a window of 80 rows holding 50
    prompts of 256 new tokens for three models takes longer than that on a busy CPU."""
    window = spec.batch_size * max(1, min(BUCKET_BATCHES, rows // (2 * actors * spec.batch_size)))
    if spec.generate_ids:
        window = min(window, max(spec.batch_size, spec.generation_batch_size))
    return window


def score_dataset(files: list[str], spec: ScorerSpec, actors: int, rows: int, out_dir: Path,
                  driver_writes: bool = False) -> list[Path]:
    """The Ray Data job: per-example rows of every model written as Parquet under `out_dir`.

    `driver_writes`: `out_dir` is visible only on the driver's node, so the driver writes the files.
    """
    window = call_rows(spec, actors, rows)
    ds = shards.ray_parquet(files).select_columns(_INPUT_COLUMNS[spec.task])
    scored = ds.repartition(target_num_rows_per_block=window).map_batches(
        EvalScorer, fn_constructor_args=(spec,), batch_size=window, batch_format="numpy", num_cpus=1,
        num_gpus=spec.gpus or None, compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=2))
    # Start only when the whole pool is up: otherwise the first actor to finish loading the model
    # takes every block and "actors: N" silently means 1.
    scored.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    if driver_writes:
        return _write_parts(scored, out_dir)
    scored.write_parquet(str(out_dir))
    # Ray names files `<dataset>_<uuid>_<n>-<m>.parquet`; the contract is part-*.parquet.
    written = sorted(out_dir.glob("*.parquet"))
    parts = [out_dir / f"part-{i:05d}.parquet" for i in range(len(written))]
    for src, dst in zip(written, parts):
        os.rename(src, dst)
    return parts


def _write_parts(ds: Any, out_dir: Path) -> list[Path]:
    """`part-00000.parquet`, ... under `out_dir`, one per non-empty block, written by this process."""
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for ref in ds.to_arrow_refs():
        table = ray.get(ref)
        if table.num_rows:
            parts.append(out_dir / f"part-{len(parts):05d}.parquet")
            pq.write_table(table, parts[-1])
    return parts


def split_by_model(table: pa.Table, ids_in: list[str], models: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per model, its columns sorted by example_id; raises RowCountError unless every model has
    exactly the input's example ids (as a multiset: nothing lost, nothing doubled)."""
    expected = Counter(ids_in)
    found_models = set(table.column("model").to_pylist())
    if found_models != set(models):
        raise RowCountError(f"scored models {sorted(found_models)} != expected {sorted(models)}")
    out = {}
    for m in models:
        part = table.filter(pa.compute.equal(table.column("model"), m)).sort_by("example_id")
        got = Counter(part.column("example_id").to_pylist())
        if got != expected:
            lost, doubled = expected - got, got - expected
            detail = f"lost e.g. {next(iter(lost))!r}" if lost else f"doubled e.g. {next(iter(doubled))!r}"
            raise RowCountError(f"model {m!r}: {part.num_rows} rows scored for {len(ids_in)} eval rows "
                                f"({sum(lost.values())} lost, {sum(doubled.values())} doubled; {detail})")
        out[m] = {name: part.column(name).to_numpy(zero_copy_only=False) for name in part.column_names}
    return out


def _diffs(task: str, by_model: dict[str, dict[str, np.ndarray]], samples: int, seed: int) -> dict[str, Any]:
    diff: dict[str, dict[str, Any]] = {}
    for other, key, ci_key in ((CHAMPION, "new_minus_champion", "ci95"), (BASE, "new_minus_base", "ci95_vs_base")):
        if other not in by_model:
            continue
        for metric, d in paired_bootstrap(task, by_model[NEW], by_model[other], samples, seed).items():
            entry = diff.setdefault(metric, {})
            entry[key] = d["value"]
            if "ci95" in d:
                entry[ci_key] = d["ci95"]
    return diff


def build_metrics(config: PipelineConfig, prepared: PreparedData, table: pa.Table, ids_in: list[str],
                  spec: ScorerSpec) -> dict[str, Any]:
    by_model = split_by_model(table, ids_in, spec.models)
    labels = prepared.manifest.get("label_names")
    actors = {}
    for actor, loads, gpus in zip(*(table.column(c).to_pylist() for c in ("actor", "base_loads", "gpus"))):
        a = actors.setdefault(actor, {"rows": 0, "base_loads": 0, "gpus": gpus})
        a["rows"] += 1
        a["base_loads"] = max(a["base_loads"], loads)
    for a in actors.values():
        a["rows"] //= len(spec.models)  # example rows, not (example, model) rows
    metrics = {
        "task": prepared.task, "rows": len(ids_in), "adapter": spec.adapters[NEW].ref, "base_model": config.model.name,
        "models": {m: aggregate(prepared.task, cols, labels) for m, cols in by_model.items()},
        "diff": _diffs(prepared.task, by_model, config.eval.bootstrap_samples, config.data.seed),
        "merged": spec.merged, "actors": actors, "bootstrap_samples": config.eval.bootstrap_samples,
        "padding_fraction": _padding_fraction(table),
    }
    if CHAMPION in spec.adapters:
        metrics["champion_ref"] = spec.adapters[CHAMPION].ref
    if spec.generate_ids:
        gen = config.eval.generation
        metrics["generation"] = {"prompts": len(spec.generate_ids), "max_new_tokens": gen.max_new_tokens,
                                 "match": gen.match}
    return metrics


def _padding_fraction(table: pa.Table) -> float:
    """Share of the token positions fed to the models that were padding."""
    real = pa.compute.sum(table.column("tokens_in")).as_py() or 0
    fed = pa.compute.sum(table.column("padded_to")).as_py() or 0
    return round(1 - real / fed, 4) if fed else 0.0


def run_evaluate(config: PipelineConfig, prepared: PreparedData, new: AdapterFiles, out_dir: str | Path,
                 champion: AdapterFiles | None = None) -> EvalResult:
    """Score base, the `new` adapter and the `champion` (when given) on `prepared`'s eval shards and
    commit `out_dir` (see module doc). Adapters arrive as files: the actors never open a driver path.
    """
    files = list(prepared.eval_files)
    if not files:
        raise ValueError(f"{prepared.root}: no eval shards (data.eval_fraction is 0 and no data.eval_source)")
    ids_in = _example_ids(files)
    if not ids_in:
        raise PreparedDataError(f"{prepared.root}: the eval split has no rows (read, rejected and capped as its "
                                "manifest's counts say): check data.eval_source, data.eval_fraction and data.max_rows")
    not_comparable = champion_not_comparable(champion, prepared.manifest.get("label_names"))
    spec = _spec(config, prepared, new, None if not_comparable else champion, ids_in)
    out_dir = Path(out_dir)
    with stage_output(out_dir) as tmp:
        score_dataset(files, spec, config.eval.actors, len(ids_in), tmp / "per_example",
                      driver_writes=is_uri(config.cluster.work_dir))
        table = pq.read_table(tmp / "per_example")
        metrics = build_metrics(config, prepared, table, ids_in, spec)
        if not_comparable:  # the gate records it; the champion was not scored
            metrics.update(champion_ref=champion.ref, champion_not_comparable=not_comparable)
        atomic_write_json(tmp / "metrics.json", metrics)
    return EvalResult(out_dir, metrics, sorted((out_dir / "per_example").glob("part-*.parquet")))

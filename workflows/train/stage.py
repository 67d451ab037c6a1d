"""The train stage: a Ray Train `TorchTrainer` running DDP LoRA on the prepared shards.

    run_train(config, prepared, out_dir, storage_path, run_name) -> TrainResult

Before anything starts it refuses what cannot work, naming the cause: a prepared dataset for
another task or tokenizer (naming the manifest field), or more workers than the cluster can
place (Ray would wait forever on a cluster without an autoscaler).

Ray Train state (checkpoints, `metrics.jsonl`, the final adapter) lives in
`<storage_path>/<run_name>/`, outside the stage directory: the same `run_name` resumes an
interrupted run from its last registered checkpoint, and a finished one returns at once. The stage
directory `out_dir` (adapter/, metrics.jsonl, result.json, _SUCCESS) is committed only at the end.

`storage_path` may be an object store URI (`s3://bucket/work/ray_train`): Ray Train then gets the
driver's pyarrow filesystem, and rank 0 copies `metrics.jsonl` and `final/` there from a node-local
folder (`train_loop_to_store`), since the training loop writes those with plain file I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

import lora_core
from workflows import __version__, shards, storage
from workflows.adapters import AdapterFiles
from workflows.artifacts import UserError, atomic_write_json, is_uri, redact, stage_output
from workflows.config import PipelineConfig, TrainSection
from workflows.heads import has_head
from workflows.models import base_identity, load_tokenizer, tokenizer_fingerprint
from workflows.prepared import PreparedData, PreparedDataError
from workflows.train.worker import WorkerConfig, train_loop_per_worker, train_loop_to_store


class ClusterTooSmallError(UserError, RuntimeError):
    """The cluster cannot place the requested workers."""

    exit_code = 2


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path  # the committed stage directory
    adapter_dir: Path  # out_dir / "adapter": PEFT format + loraflow.json lineage
    metrics: dict[str, Any]  # final metrics (also in result.json)
    run_name: str
    storage_path: str


def run_train(config: PipelineConfig, prepared: PreparedData, out_dir: str | Path, storage_path: str | Path,
              run_name: str, *, init_adapter: AdapterFiles | None = None,
              loop: Callable[[dict[str, Any]], Any] | None = None) -> TrainResult:
    """Fine-tune `config.model` with LoRA on `prepared`, from `init_adapter` when given (warm start:
    the adapter's files travel to the workers). `loop` replaces the function the workers run
    (default: `train_loop_per_worker`, or `train_loop_to_store` for an object-store `storage_path`);
    tests wrap it to interrupt a run or to inspect the workers' models.
    """
    trainer = build_trainer(config, prepared, storage_path, run_name, init_adapter=init_adapter, loop=loop)
    trainer.fit()  # raises ray.train.TrainingFailedError when retries are exhausted
    return commit_run(Path(out_dir), _run_dir(storage_path, run_name))


def _run_dir(storage_path: str | Path, run_name: str) -> Path | str:
    """`<storage_path>/<run_name>`: a resolved local path, or a URI."""
    if is_uri(storage_path):
        return storage.join(storage_path, run_name)
    return Path(storage_path).expanduser().resolve() / run_name


def build_trainer(config: PipelineConfig, prepared: PreparedData, storage_path: str | Path, run_name: str, *,
                  init_adapter: AdapterFiles | None = None, callbacks: list[Any] | None = None,
                  loop: Callable[[dict[str, Any]], Any] | None = None,
                  validator: Callable[[Any, int, int], dict[str, Any]] | None = None,
                  progress_prefix: str = "[train]") -> TorchTrainer:
    """The checked `TorchTrainer` of one run (data and cluster fit verified before it exists).

    `callbacks` are Ray Train `UserCallback`s, e.g. Tune's `TuneReportCallback` in a sweep trial;
    `validator` and `progress_prefix` go to the workers (`WorkerConfig`).
    """
    check_prepared(config, prepared)
    if init_adapter is not None:
        init_adapter.check_pooling(config.model.pooling, "warm-start adapter")
    tc = config.train
    total_steps = plan_steps(_rows(prepared.train_files), tc)
    check_cluster_fits(tc, ray.cluster_resources(), _max_cluster_resources())

    run_dir = _run_dir(storage_path, run_name)
    identity = base_identity(config.model.name, revision=config.model.revision)
    worker = WorkerConfig(
        model=config.model, lora=lora_config(config, identity), train=config.train,
        manifest=prepared.manifest, run_dir=str(run_dir), total_steps=total_steps,
        num_labels=len(prepared.manifest["label_names"]) if has_head(prepared.task) else None,
        init_adapter=init_adapter, base_identity=identity, lineage=_lineage(config, prepared, run_dir),
        has_eval=_rows(prepared.eval_files) > 0, validator=validator, progress_prefix=progress_prefix)
    datasets = train_datasets(prepared, tc, with_eval=validator is None)  # a validator reads its own rows
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True  # same order every epoch and attempt: resume skips consumed batches
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {})}
    if is_uri(run_dir):
        # Ray Train gets the driver's filesystem object: its endpoint settings then apply on every node.
        fs, path = storage.resolve(storage_path)
        default, where = train_loop_to_store, {"storage_path": path, "storage_filesystem": fs}
        loop_config = {"worker": worker, "store_fs": fs, "store_run_dir": f"{path}/{run_name}"}
    else:
        default, where = train_loop_per_worker, {"storage_path": str(run_dir.parent)}
        loop_config = {"worker": worker}
    return TorchTrainer(
        loop or default,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=tc.ddp_backend) if tc.ddp_backend != "auto" else None,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, **where,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                             callbacks=callbacks or None),
        datasets=datasets,
        # Only train is split; every worker reads the whole eval set and scores its share of the
        # batches (streaming_split(equal=True) would drop the remainder rows of eval).
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )


# Train shards up to this size are read once into the object store before fit(): every epoch and
# every restarted worker group then splits blocks already in memory instead of re-running read
# tasks (seconds each on a small machine), and a cluster whose workers hold every CPU cannot stall
# on reads. Bigger data streams from storage each epoch.
MATERIALIZE_MAX_BYTES = 512 * 2**20


def train_datasets(prepared: PreparedData, tc: TrainSection, with_eval: bool = True) -> dict[str, Any]:
    """{"train": shards in file order, "eval": the rows periodic eval scores} as Ray Datasets.

    Eval keeps only the rows `eval_batches` batches per worker can use, always materialized; none
    without `with_eval` (a tune trial, whose validator scores the validation rows itself).
    """
    train = _in_file_order(shards.ray_parquet(prepared.train_files))
    if sum(storage.size(f) for f in prepared.train_files) <= MATERIALIZE_MAX_BYTES:
        train = train.materialize()
    datasets = {"train": train}
    if prepared.eval_files and with_eval:
        rows = tc.eval_batches * tc.batch_size * tc.num_workers
        datasets["eval"] = _in_file_order(shards.ray_parquet(prepared.eval_files)).limit(rows).materialize()
    return datasets


def _in_file_order(ds: Any) -> Any:
    """Blocks in file order whatever order read tasks finish in (resume relies on it)."""
    ds.context.execution_options.preserve_order = True
    return ds


# --- checks before anything starts ---------------------------------------------------------------


def check_prepared(config: PipelineConfig, prepared: PreparedData) -> None:
    """Refuse prepared data this model cannot train on, naming the manifest field and both values."""
    manifest, where = prepared.manifest, storage.join(prepared.root, "manifest.json")
    if manifest.get("task") != config.model.task:
        raise PreparedDataError(f"{where}: manifest field 'task' is {manifest.get('task')!r} but "
                                f"model.task is {config.model.task!r}; prepare the data for this task")
    expected = tokenizer_fingerprint(load_tokenizer(config.model.name, revision=config.model.revision))
    found = (manifest.get("tokenizer") or {}).get("fingerprint")
    if found != expected:
        raise PreparedDataError(
            f"{where}: manifest field 'tokenizer.fingerprint' is {found!r} but the tokenizer of "
            f"model {config.model.name!r} has {expected!r}: the data was tokenized for another model "
            f"({(manifest.get('tokenizer') or {}).get('name')!r}); prepare it again for this model")
    if not prepared.train_files:
        raise PreparedDataError(f"{where}: manifest field 'shards.train' lists no train shards")
    missing = [str(f) for f in prepared.train_files + prepared.eval_files if not storage.exists(f)]
    if missing:
        raise PreparedDataError(f"{where}: manifest field 'shards' names files that do not exist: {missing[:3]}")
    if has_head(config.model.task) and not manifest.get("label_names"):
        raise PreparedDataError(f"{where}: manifest field 'label_names' is empty; a classifier needs its labels")


def check_cluster_fits(tc: TrainSection, total: dict[str, float], autoscale_max: dict[str, float] | None) -> None:
    """Fail fast when `tc.num_workers` workers cannot be placed.

    Without an autoscaler (`autoscale_max` is None) the cluster is what `ray.cluster_resources()`
    says, and Ray Train would wait forever for workers that never fit; with one, its maximum counts.
    Train workers hold their CPUs for the whole run, so a cluster with none left for Ray Data
    would stall silently: that is refused too.
    """
    have = autoscale_max if autoscale_max is not None else total
    want_cpu = tc.num_workers * tc.cpus_per_worker
    problems = []
    if want_cpu > have.get("CPU", 0):
        problems.append(f"{tc.num_workers} workers x {tc.cpus_per_worker:g} CPU = {want_cpu:g} CPUs "
                        f"but the cluster has {have.get('CPU', 0):g}")
    elif autoscale_max is None and want_cpu >= have.get("CPU", 0) and not tc.use_gpu:
        problems.append(f"the workers would take all {have.get('CPU', 0):g} CPUs, leaving none for Ray Data "
                        "(training would hang); lower train.cpus_per_worker (fractions are fine) or add CPUs")
    want_gpu = tc.num_workers * tc.gpus_per_worker
    if tc.use_gpu and want_gpu > have.get("GPU", 0):
        problems.append(f"{tc.num_workers} workers x {tc.gpus_per_worker:g} GPU = {want_gpu:g} GPUs but the "
                        f"cluster has {have.get('GPU', 0):g}")
    if problems:
        raise ClusterTooSmallError("cannot place the train workers: " + "; ".join(problems)
                                   + " (train.num_workers / train.cpus_per_worker / train.use_gpu)")


def _max_cluster_resources() -> dict[str, float] | None:
    """The autoscaler's maximum cluster size, or None when the cluster does not autoscale."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: without it, behave as a fixed-size cluster
        return None


def plan_steps(train_rows: int, tc: TrainSection) -> int:
    """Optimizer steps of the whole run.

    Each of the `num_workers` ranks gets floor(rows / workers) rows (the equal split drops the
    remainder), read in micro-batches of `batch_size`, `grad_accum` per step (the last step of an
    epoch may have fewer). `max_steps` wins over `epochs`; fractional epochs round up.
    """
    rows_per_rank = train_rows // tc.num_workers
    if rows_per_rank == 0:
        raise PreparedDataError(f"{train_rows} train rows cannot feed {tc.num_workers} workers "
                                "(each needs at least one row)")
    steps_per_epoch = math.ceil(math.ceil(rows_per_rank / tc.batch_size) / tc.grad_accum)
    return tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))


def _rows(files: list[str]) -> int:
    return sum(storage.parquet_rows(f) for f in files)


def lora_config(config: PipelineConfig, identity: dict[str, Any]) -> lora_core.LoraConfig:
    """The `lora` section as lora_core's config; adapters record the base's path for PEFT."""
    return lora_core.LoraConfig(**config.lora.model_dump(), base_model_name_or_path=identity.get("path"))


# --- committing the stage directory --------------------------------------------------------------


def _lineage(config: PipelineConfig, prepared: PreparedData, run_dir: Path | str) -> dict[str, Any]:
    """What loraflow.json records beside lora_core's own fields (weights sha256, base identity)."""
    manifest = prepared.manifest
    run_name, storage_path = _split_run_dir(run_dir)
    return {
        "prepared": {"root": str(prepared.root),
                     "manifest_sha256": hashlib.sha256(storage.read_bytes(storage.join(prepared.root, "manifest.json"))).hexdigest(),
                     "rows_digest": manifest.get("rows_digest"), "input_digest": manifest.get("input_digest"),
                     "tokenizer": manifest.get("tokenizer")},
        "config": redact(config.model_dump(mode="json")),  # no credentials of a tracking URI in an adapter
        "ray_train": {"run_name": run_name, "storage_path": storage_path},
        "loraflow_version": __version__,
        # classification: what `loraflow predict` prints (index = the head's output)
        **({"label_names": manifest["label_names"]} if manifest.get("label_names") else {}),
    }


def _split_run_dir(run_dir: Path | str) -> tuple[str, str]:
    """(run name, storage path) of `<storage_path>/<run_name>`, a local path or a URI."""
    if is_uri(run_dir):
        storage_path, _, run_name = str(run_dir).rstrip("/").rpartition("/")
        return run_name, storage_path
    return Path(run_dir).name, str(Path(run_dir).parent)


def commit_run(out_dir: Path, run_dir: Path | str) -> TrainResult:
    """Copy a finished Ray Train run's final adapter and metrics into the stage directory (from an
    object store through a temporary local copy)."""
    if not is_uri(run_dir):
        return _commit_local_run(out_dir, Path(run_dir), *_split_run_dir(run_dir))
    fs, path = storage.resolve(run_dir)
    with tempfile.TemporaryDirectory(prefix="loraflow-run-") as tmp:
        storage.download_dir(fs, f"{path}/final", Path(tmp) / "final")
        if storage.exists(storage.join(run_dir, "metrics.jsonl")):
            storage.download_file(fs, f"{path}/metrics.jsonl", Path(tmp) / "metrics.jsonl")
        return _commit_local_run(out_dir, Path(tmp), *_split_run_dir(run_dir), shown=str(run_dir))


def _commit_local_run(out_dir: Path, run_dir: Path, run_name: str, storage_path: str,
                      shown: str | None = None) -> TrainResult:
    final = run_dir / "final"
    if not (final / "adapter").is_dir():
        where = storage.join(shown, "final", "adapter") if shown else final / "adapter"
        raise RuntimeError(f"Ray Train finished but {where} is missing; rank 0 did not save it")
    metrics = json.loads((final / "metrics.json").read_text())
    result = {"metrics": metrics, "run_name": run_name, "storage_path": storage_path, **metrics}
    with stage_output(out_dir, success={"run_name": run_name}) as tmp:
        shutil.copytree(final / "adapter", tmp / "adapter")
        _write_metrics_log(run_dir / "metrics.jsonl", tmp / "metrics.jsonl")
        atomic_write_json(tmp / "result.json", result)
    return TrainResult(out_dir=out_dir, adapter_dir=out_dir / "adapter", metrics=metrics,
                       run_name=run_name, storage_path=storage_path)


def _write_metrics_log(src: Path, dst: Path) -> None:
    """Copy metrics.jsonl keeping one record per step: steps re-run after a resume replace the lost ones."""
    by_step: dict[int, dict[str, Any]] = {}
    if src.is_file():
        for line in src.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    dst.write_text("".join(json.dumps(by_step[s]) + "\n" for s in sorted(by_step)))

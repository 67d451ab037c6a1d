"""Shared by the train tests: a GSM8K slice prepared once per session by the real prepare stage."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from workflows.artifacts import is_complete
from workflows.config import PipelineConfig, config_from_dict

# Small and fast on 2 cores: tiny Llama (SmolLM2's tokenizer), r=4 on q/v, rows of up to 128 tokens.
# Its 49k-token vocabulary makes the logits the bulk of a step, so micro-batches are 2 rows; grad_accum
# stays 2 so that the all-reduce tests see the first micro-batch of every step run under no_sync().
TRAIN = {"num_workers": 2, "cpus_per_worker": 1, "batch_size": 2, "grad_accum": 2, "max_steps": 8,
         "lr": 1e-3, "warmup_steps": 1, "log_every": 4, "checkpoint_every": 4, "eval_every": 4,
         "eval_batches": 2, "seed": 0, "max_failures": 0}


def gsm8k_config(example_data: Path, model: str = "tiny-llama", **train: Any) -> PipelineConfig:
    return config_from_dict({
        "model": {"name": model},
        # Eval is a hashed 10% of the same 480 rows (max_rows caps what is read from the sources).
        "data": {"source": str(example_data / "gsm8k" / "train.jsonl.gz"), "eval_fraction": 0.1,
                 "format": "instruction", "fields": {"instruction": "question", "output": "answer"},
                 "max_seq_len": 128, "max_rows": 480, "max_eval_rows": 48, "num_shards": 2,
                 # ~6% of GSM8K prompts alone exceed 128 tokens: rejected, as they teach nothing.
                 "max_reject_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "train": {**TRAIN, **train},
    })


def prepared_gsm8k(example_data: Path, session_tmp: Path):
    """The prepare stage's output for `gsm8k_config`, built on first use and reused by every test file."""
    from workflows.prepare.stage import run_prepare
    from workflows.prepared import PreparedData

    root = session_tmp / "train-tests" / "prepared-gsm8k-128-v2"
    if is_complete(root):
        return PreparedData.load(root)
    return run_prepare(gsm8k_config(example_data), root)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- worker functions for tests: instrumentation stays here, not on the production path ------------
# Passed to `run_train(..., loop=...)`; Ray Train workers import this module by name (PYTHONPATH).

class StopTraining(RuntimeError):
    """Raised by every worker after the report of `stop_after_step`, as if the run were interrupted."""


ADAPTER_DIGESTS = "adapter-digests-rank{rank}.jsonl"


def probe_loop(loop_config: dict[str, Any], stop_after_step: int | None = None,
               first_attempt_only: bool = False, sigkill_rank: int | None = None) -> Any:
    """`train_loop_per_worker` that records, per rank, under the run directory:

    - `adapter-digests-rank<r>.jsonl`: at every report, {"step", "resumed_from", "digest", "pid"}:
      the sha256 of the trainable tensors after that step, the step of the checkpoint this attempt
      started from (None: from scratch) and the worker's process; steps an attempt re-runs after a
      resume can so be compared with the interrupted attempt's;
    - `base-digest-rank<r>.json`: the sha256 of every frozen base tensor when the model was built and
      after training (written when the attempt finishes).

    With `stop_after_step` every worker raises `StopTraining` after that step's report, or with
    `sigkill_rank` that rank alone SIGKILLs its own process there (the others block in the next
    step's all-reduce until Ray Train stops them); with `first_attempt_only`, only in an attempt that
    started without a checkpoint, so that Ray Train's own restart (`max_failures` >= 1) resumes and
    finishes the run. It first waits until Ray Train has registered every reported checkpoint:
    `report()` returns once a checkpoint is uploaded, not once the controller has registered it, and
    stopping at once races that (a loaded machine lost the checkpoint and the "resumed" run started
    from scratch).
    """
    import ray.train

    from workflows.train import worker
    from workflows.train.checkpoint import tensors_digest, trainable_tensors

    rank = ray.train.get_context().get_world_rank()
    run_dir = Path(loop_config["worker"].run_dir)
    checkpoint = ray.train.get_checkpoint()
    resumed_from = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resumed_from = json.loads((Path(d) / "state.json").read_text())["step"]
    stop = stop_after_step is not None and not (first_attempt_only and checkpoint is not None)
    seen: dict[str, Any] = {}
    real_build, real_report = worker.build_model, ray.train.report

    def frozen(model) -> dict:
        return {n: p for n, p in model.named_parameters() if not p.requires_grad}

    def build(cfg, device):
        model = real_build(cfg, device)
        seen["model"], seen["before"] = model, tensors_digest(frozen(model))
        return model

    def report(metrics, *args, **kwargs):
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"step": metrics["step"], "resumed_from": resumed_from,
                  "digest": tensors_digest(trainable_tensors(seen["model"])), "pid": os.getpid()}
        with open(run_dir / ADAPTER_DIGESTS.format(rank=rank), "a") as f:
            f.write(json.dumps(record) + "\n")
        real_report(metrics, *args, **kwargs)
        if stop and metrics["step"] >= stop_after_step:
            ray.train.get_all_reported_checkpoints()
            if sigkill_rank is None:
                raise StopTraining(f"stopped after step {metrics['step']} (stop_after_step)")
            if rank == sigkill_rank:
                os.kill(os.getpid(), signal.SIGKILL)

    worker.build_model, ray.train.report = build, report
    try:
        result = worker.train_loop_per_worker(loop_config)
    finally:
        worker.build_model, ray.train.report = real_build, real_report
    out = run_dir / f"base-digest-rank{rank}.json"
    out.write_text(json.dumps({"before": seen["before"], "after": tensors_digest(frozen(seen["model"]))}))
    return result


def adapter_digests(run_dir: Path, rank: int = 0) -> list[dict[str, Any]]:
    """What `probe_loop` recorded at each report of `rank`, in order (every attempt)."""
    return read_jsonl(run_dir / ADAPTER_DIGESTS.format(rank=rank))


def cache_then_train_loop(loop_config: dict[str, Any], cache: str) -> Any:
    """`train_loop_per_worker` on a node whose model cache `cache` is empty: every worker first builds
    SmolLM2's converted folder there, rank 1 first. The folder must come out complete (transformers
    writes nothing on a distributed rank other than 0 unless told to) and load on both ranks; each
    rank writes what it saw to `<cache>/rank<r>-saw.json`, then trains as usual with that cache."""
    import time

    import ray.train

    from workflows import models
    from workflows.train.worker import train_loop_per_worker

    os.environ["LORAFLOW_CACHE"] = cache
    rank = ray.train.get_context().get_world_rank()
    started = Path(cache) / "rank1-started"
    started.parent.mkdir(parents=True, exist_ok=True)
    if rank == 1:
        started.touch()
    else:  # let rank 1 take the lock and build
        while not started.exists():
            time.sleep(0.05)
        time.sleep(1.0)
    folder = models._smollm2_model_dir()
    model, _ = models.load_base("smollm2-135m")
    saw = {"files": sorted(p.name for p in folder.iterdir()), "params": sum(p.numel() for p in model.parameters())}
    (Path(cache) / f"rank{rank}-saw.json").write_text(json.dumps(saw))
    del model
    return train_loop_per_worker(loop_config)

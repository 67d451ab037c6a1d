"""Shared by the train tests: a GSM8K slice prepared once per session by the real prepare stage."""

from __future__ import annotations

import json
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


def stopping_loop(loop_config: dict[str, Any], stop_after_step: int) -> Any:
    """`train_loop_per_worker`, interrupted after the report of step `stop_after_step`.

    It waits until Ray Train has registered every reported checkpoint first: `report()` returns
    once a checkpoint is uploaded, not once the controller has registered it, and raising at once
    races that (a loaded machine lost the checkpoint and the "resumed" run started from scratch).
    """
    import ray.train

    from workflows.train.worker import train_loop_per_worker

    real_report = ray.train.report

    def report(metrics, *args, **kwargs):
        real_report(metrics, *args, **kwargs)
        if metrics["step"] >= stop_after_step:
            ray.train.get_all_reported_checkpoints()
            raise StopTraining(f"stopped after step {metrics['step']} (stop_after_step)")

    ray.train.report = report
    try:
        return train_loop_per_worker(loop_config)
    finally:
        ray.train.report = real_report


def base_probe_loop(loop_config: dict[str, Any]) -> Any:
    """`train_loop_per_worker` that also writes, per rank, the sha256 of every frozen base tensor when
    the model was built and after training, to `<run_dir>/base-digest-rank<r>.json`."""
    import ray.train

    from workflows.train import worker
    from workflows.train.checkpoint import tensors_digest

    def frozen(model) -> dict:
        return {n: p for n, p in model.named_parameters() if not p.requires_grad}

    seen: dict[str, Any] = {}
    real_build = worker.build_model

    def build(cfg, device):
        model = real_build(cfg, device)
        seen["model"], seen["before"] = model, tensors_digest(frozen(model))
        return model

    worker.build_model = build
    try:
        result = worker.train_loop_per_worker(loop_config)
    finally:
        worker.build_model = real_build
    rank = ray.train.get_context().get_world_rank()
    out = Path(loop_config["worker"].run_dir) / f"base-digest-rank{rank}.json"
    out.write_text(json.dumps({"before": seen["before"], "after": tensors_digest(frozen(seen["model"]))}))
    return result


def cache_build_loop(loop_config: dict[str, Any]) -> Any:
    """Every worker builds SmolLM2's converted folder in one empty cache, rank 1 first: the folder
    must come out complete (transformers writes nothing on a distributed rank other than 0 unless
    told to) and load on both ranks. Returns what each rank saw."""
    import os
    import time

    import ray.train

    from workflows import models

    os.environ["LORAFLOW_CACHE"] = loop_config["cache"]
    rank = ray.train.get_context().get_world_rank()
    started = Path(loop_config["cache"]) / "rank1-started"
    started.parent.mkdir(parents=True, exist_ok=True)
    if rank == 1:
        started.touch()
    else:  # let rank 1 take the lock and build
        while not started.exists():
            time.sleep(0.05)
        time.sleep(1.0)
    folder = models._smollm2_model_dir()
    model, _ = models.load_base("smollm2-135m")
    files = sorted(p.name for p in folder.iterdir())
    ray.train.report({"rank": rank, "files": ",".join(files), "params": sum(p.numel() for p in model.parameters())})
    return {"files": files}

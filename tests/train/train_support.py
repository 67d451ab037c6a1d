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


def gsm8k_config(shared_data: Path, model: str = "tiny-llama", **train: Any) -> PipelineConfig:
    return config_from_dict({
        "model": {"name": model},
        # Eval is a hashed 10% of the same 480 rows (max_rows caps what is read from the sources).
        "data": {"source": str(shared_data / "gsm8k" / "train.jsonl"), "eval_fraction": 0.1,
                 "format": "instruction", "fields": {"instruction": "question", "output": "answer"},
                 "max_seq_len": 128, "max_rows": 480, "max_eval_rows": 48, "num_shards": 2,
                 # ~6% of GSM8K prompts alone exceed 128 tokens: rejected, as they teach nothing.
                 "max_reject_fraction": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "train": {**TRAIN, **train},
    })


def prepared_gsm8k(shared_data: Path, session_tmp: Path):
    """The prepare stage's output for `gsm8k_config`, built on first use and reused by every test file."""
    from workflows.prepare.stage import run_prepare
    from workflows.prepared import PreparedData

    root = session_tmp / "train-tests" / "prepared-gsm8k-128-v2"
    if is_complete(root):
        return PreparedData.load(root)
    return run_prepare(gsm8k_config(shared_data), root)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

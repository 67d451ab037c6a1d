"""GPU smoke check (< 5 min on one GPU): one TorchTrainer worker, NCCL, bf16 autocast with fp32
adapters, SmolLM2-135M on GSM8K for a few dozen steps. Asserts the loss drops; prints tokens/s and
peak GPU memory. CI never needs it; `--cpu` runs the same path on CPU for a few steps (a syntax and
wiring check on machines without a GPU).

    .venv/bin/python -m bench.gpu_smoke            # on a GPU machine
    .venv/bin/python -m bench.gpu_smoke --cpu      # anywhere, ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on CPU (wiring check, few steps)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    args = p.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from workflows.config import config_from_dict
    from workflows.prepare.stage import run_prepare
    from workflows.train.stage import run_train

    gpu = not args.cpu
    steps = args.steps or (40 if gpu else 4)
    data = Path(args.data)
    config = config_from_dict({
        "model": {"name": "smollm2-135m"},
        "data": {"source": str(data / "gsm8k" / "train.jsonl"), "eval_source": str(data / "gsm8k" / "test.jsonl"),
                 "format": "instruction", "fields": {"instruction": "question", "output": "answer"},
                 "max_seq_len": 256, "max_rows": 2000 if gpu else 200, "max_eval_rows": 64,
                 "max_reject_fraction": 0.2},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"num_workers": 1, "use_gpu": gpu, "bf16": gpu, "cpus_per_worker": 1,
                  "batch_size": 8 if gpu else 2, "lr": 1e-3, "warmup_steps": 2, "max_steps": steps,
                  "log_every": max(1, steps // 4), "eval_every": steps, "eval_batches": 4 if gpu else 1,
                  "checkpoint_every": None}})
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
             **({} if gpu else {"num_cpus": 3}))
    work = Path(tempfile.mkdtemp(prefix="loraflow-gpu-smoke-"))
    prepared = run_prepare(config, work / "prepared")
    result = run_train(config, prepared, work / "train", storage_path=work / "ray_train", run_name="smoke-a0")
    records = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines()]
    m = result.metrics
    summary = {"device": "cuda" if gpu else "cpu", "steps": m["steps"],
               "train_loss_first_log": records[0]["train_loss"], "train_loss_last_log": records[-1]["train_loss"],
               "eval_loss_initial": m["eval_loss_initial"], "eval_loss": m["eval_loss"],
               "tokens_per_s": records[-1]["tokens_per_s"], "step_time_s": records[-1]["step_time_s"],
               "peak_gpu_memory_bytes": m.get("peak_gpu_memory_bytes"),
               "allreduce_bytes_per_step": m["allreduce_bytes_per_step"], "adapter_dir": str(result.adapter_dir)}
    print(json.dumps(summary, indent=2))
    ray.shutdown()
    assert m["eval_loss"] < m["eval_loss_initial"], "eval loss did not drop"


if __name__ == "__main__":
    main()

"""Train-stage benchmark (not a timed test): DDP LoRA vs DDP full fine-tune, 1 vs 2 workers, bf16
gradient compression on/off, in one run on one local Ray cluster, on GSM8K prepared by the
prepare stage. Writes bench/results/train.md.

    .venv/bin/python -m bench.train [--model tiny-llama|smollm2-135m] [--steps 20] [--seq 128]

Every variant runs the same `StepLoop` (same data order, batches, loss, optimizer); full fine-tuning
only differs in what is trainable. Ratios measured in one run are what to compare: absolute times
on a shared 2-core machine drift by 15-20%.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "train.md"


def full_finetune_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The train loop with every base weight trainable and no LoRA (the comparison point)."""
    import ray.train
    import ray.train.torch
    import torch

    from workflows.models import load_base
    from workflows.train.checkpoint import TrainState
    from workflows.train.ddp_comm import CommStats, count_broadcasts, register_counting_hook, tensor_bytes
    from workflows.train.loop import StepLoop
    from workflows.train.worker import WorkerConfig, lr_lambda

    cfg: WorkerConfig = config["worker"]
    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.train.threads_per_worker or 1)
    torch.manual_seed(cfg.train.seed)
    model, _ = load_base(cfg.model.name)
    model.config.use_cache = False
    model.train().requires_grad_(True)
    stats = CommStats()
    with count_broadcasts(stats):  # default DDP: the whole model is broadcast at start-up
        ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    register_counting_hook(ddp, stats, cfg.train.grad_compression)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("constant", 0, cfg.total_steps))
    loop = StepLoop(cfg, ddp, model, optimizer, scheduler, stats, ray.train.torch.get_device(),
                    ctx.get_world_rank(), ctx.get_world_size())
    loop.run(TrainState(seed=cfg.train.seed, world_size=ctx.get_world_size()))
    return {**loop.last_metrics, "broadcast_bytes": stats.broadcast_bytes,
            "param_bytes": tensor_bytes(model.parameters())}


def run_full_finetune(config, prepared, total_steps: int, storage: Path, name: str) -> dict[str, Any]:
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workflows.train.stage import lora_config, train_datasets
    from workflows.train.worker import WorkerConfig

    tc = config.train
    worker = WorkerConfig(model=config.model, lora=lora_config(config, {}), train=tc,
                          manifest=prepared.manifest, run_dir=str(storage / name), total_steps=total_steps)
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    # Imported by module name: Ray must not pickle a __main__ function by value (see RAY_2.60.md).
    loop = importlib.import_module("bench.train").full_finetune_loop
    result = TorchTrainer(
        loop, train_loop_config={"worker": worker},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage)),
        datasets=train_datasets(prepared, tc),
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest)).fit()
    return result.return_value


def llama3_8b_projection(r: int = 16, steps: int = 1000, workers: int = 16) -> dict[str, float]:
    """Bytes per step / per run for Llama-3-8B, LoRA r on all seven linear projections.

    Shapes (hidden 4096, MLP 14336, 32 layers, 8 KV heads of 128): per layer q,o 4096x4096;
    k,v 4096x1024; gate,up 4096x14336; down 14336x4096. LoRA adds r*(in+out) per projection.
    """
    h, m, kv, layers, base_params = 4096, 14336, 1024, 32, 8.03e9
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]
    lora_params = layers * r * sum(i + o for i, o in shapes)
    ring = 2 * (workers - 1) / workers  # bytes each rank sends per byte all-reduced (ring)
    return {
        "lora_params": lora_params,
        "lora_fp32_bytes_per_step": lora_params * 4,
        "lora_bf16_bytes_per_step": lora_params * 2,
        "full_ft_fp32_bytes_per_step": base_params * 4,
        "lora_fp32_bytes_per_run": lora_params * 4 * steps,
        "lora_fp32_wire_bytes_per_rank_per_run": lora_params * 4 * steps * ring,
        "ddp_default_startup_broadcast_bf16": base_params * 2,
        "ours_startup_broadcast": lora_params * 4,
        "steps": steps, "workers": workers,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--data", default=str(REPO / "data"))
    args = p.parse_args()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from workflows.config import config_from_dict
    from workflows.prepare.stage import run_prepare
    from workflows.train.stage import run_train

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-train-"))
    data = Path(args.data)

    def config(**train):
        return config_from_dict({
            "model": {"name": args.model},
            "data": {"source": str(data / "gsm8k" / "train.jsonl.gz"), "eval_source": str(data / "gsm8k" / "test.jsonl.gz"),
                     "format": "instruction", "fields": {"instruction": "question", "output": "answer"},
                     "max_seq_len": 128, "max_rows": 800, "max_eval_rows": 16, "max_reject_fraction": 0.2},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
            "train": {"batch_size": 4, "max_steps": args.steps, "log_every": args.steps, "checkpoint_every": None,
                      "eval_every": None, "threads_per_worker": 1, "cpus_per_worker": 1, **train}})

    prepared = run_prepare(config(), work / "prepared")
    rows = {}
    for name, train in [("lora-1w", {"num_workers": 1}), ("lora-2w", {"num_workers": 2}),
                        ("lora-2w-bf16", {"num_workers": 2, "grad_compression": "bf16"})]:
        started = time.perf_counter()
        m = run_train(config(**train), prepared, work / name, storage_path=work / "ray_train", run_name=name).metrics
        rows[name] = {**m, "wall_s": time.perf_counter() - started}
    cfg = config(num_workers=2)
    started = time.perf_counter()
    rows["full-2w"] = {**run_full_finetune(cfg, prepared, args.steps,
                                           work / "ray_train", "full-2w"), "wall_s": time.perf_counter() - started}
    report(rows, args, llama3_8b_projection())
    ray.shutdown()


def report(rows: dict[str, dict], args, projection: dict[str, float]) -> None:
    lora, full, one = rows["lora-2w"], rows["full-2w"], rows["lora-1w"]
    lines = [f"# Train benchmark ({args.model}, {args.steps} steps, batch 4 x 128 per worker, gloo on CPU)", "",
             "| variant | step s | tokens/s | all-reduce B/step | start-up broadcast B |",
             "|---|---|---|---|---|"]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['step_time_s']:.3f} | {m['tokens_per_s']:.0f} | "
                     f"{m['allreduce_bytes_per_step']:,} | {m.get('broadcast_bytes', 0):,} |")
    lines += ["", f"- LoRA / full step time (2 workers): {lora['step_time_s'] / full['step_time_s']:.2f}x "
                  "(anchor: 0.84x)",
              f"- LoRA all-reduce / full all-reduce: {lora['allreduce_bytes_per_step'] / full['allreduce_bytes_per_step']:.4f}",
              f"- start-up broadcast, LoRA / full DDP default: {lora['broadcast_bytes'] / full['broadcast_bytes']:.4f}",
              f"- scaling 1 -> 2 workers: {lora['tokens_per_s'] / one['tokens_per_s']:.2f}x tokens/s "
              f"(efficiency {lora['tokens_per_s'] / (2 * one['tokens_per_s']):.0%})",
              f"- bf16 compression: {rows['lora-2w-bf16']['allreduce_bytes_per_step'] / lora['allreduce_bytes_per_step']:.2f}x bytes",
              "", "## Projection: Llama-3-8B, LoRA r=16 on all linear layers", "",
              "```", json.dumps(projection, indent=2), "```", ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

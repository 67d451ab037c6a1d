"""GPU smoke: every GPU path of loraflow once, in under 8 minutes on one GPU, nothing downloaded.

    .venv/bin/python -m bench.gpu_smoke            # on a machine with a GPU: writes bench/results/gpu_smoke.md
    .venv/bin/python -m bench.gpu_smoke --cpu      # the same wiring on CPU (few steps), anywhere

1. train: 1 worker, NCCL, bf16 autocast, SmolLM2-135M on GSM8K (packed 512)
2. train: 2 workers sharing the GPU (0.5 each) over a gloo group fed CUDA tensors, so every
   collective's device placement is exercised; then the tiny mixture of experts the same way
3. train: fp16 autocast with a gradient scaler (what a T4 or V100 gets)
4. evaluate: one eval actor on the GPU scoring base, the new adapter (3) and a champion (1)
5. generate (SmolLM2 + adapter 1) and predict (MiniLM + a mean-pooling classification adapter) on the GPU
6. load: peak host RSS and GPU memory of loading SmolLM2 in bf16 straight onto the GPU
7. step: lora_core vs PEFT tokens/s for SmolLM2 in bf16, side by side (the goal on a GPU: >= 1.3x)
Each step prints tokens/s, MFU (4N FLOPs per trained token: LoRA skips the frozen weights'
gradients), peak memory and all-reduce bytes per step.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
RESULTS = REPO / "bench" / "results" / "gpu_smoke.md"
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0, "V100": 125.0}


def config(gpu: bool, work: Path, **train):
    from workflows.config import config_from_dict

    return config_from_dict({
        "model": {"name": train.pop("model", "smollm2-135m"), "dtype": "auto"},
        "data": {"source": str(DATA / "gsm8k" / "train.jsonl.gz"), "eval_source": str(DATA / "gsm8k" / "test.jsonl.gz"),
                 "format": "instruction", "fields": {"instruction": "question", "output": "answer"},
                 "max_seq_len": 512 if gpu else 128, "max_rows": 4000 if gpu else 160, "max_eval_rows": 64 if gpu else 16,
                 "max_reject_fraction": 0.3},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": 1, "batch_size": 8 if gpu else 2, "lr": 1e-3,
                  "warmup_steps": 2, "max_steps": 30 if gpu else 3, "log_every": 10 if gpu else 3,
                  "eval_every": None, "eval_batches": 2, "checkpoint_every": None, **train},
        "eval": {"batch_size": 16, "bootstrap_samples": 0, "generation": {"num_prompts": 8 if gpu else 2,
                                                                           "max_new_tokens": 64 if gpu else 8}},
        "cluster": {"work_dir": str(work / "work"), "runs_dir": str(work / "runs")}})


def peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((t * 1e12 for key, t in PEAK_TFLOPS.items() if key in name), None)


def train(name: str, cfg, prepared, work: Path, rows: dict) -> Path:
    from workflows.train.stage import run_train

    started = time.perf_counter()
    result = run_train(cfg, prepared, work / name, storage_path=work / "ray_train", run_name=name)
    m = result.metrics
    n = m["base_param_bytes"] / (2 if cfg.model.dtype != "float32" else 4)  # ~ frozen parameters
    flops = peak_flops()
    rows[name] = {"seconds": round(time.perf_counter() - started, 1), "steps": m["steps"],
                  "train_loss": m.get("train_loss"), "tokens_per_s": round(m["tokens_per_s"]),
                  "mfu": round(4 * n * m["tokens_per_s"] / flops, 3) if flops else None,
                  "precision": m.get("precision"), "peak_gpu_memory_gib": round(m.get("peak_gpu_memory_bytes", 0) / 2**30, 2),
                  "allreduce_bytes_per_step": m["allreduce_bytes_per_step"], "adapter_param_bytes": m["adapter_param_bytes"],
                  "world_size": m["world_size"]}
    print(name, json.dumps(rows[name]), flush=True)
    return result.adapter_dir


def load_memory(gpu: bool) -> dict:
    """Peak host RSS of loading SmolLM2 in bf16 onto the device, over the bf16 weight bytes (in a
    fresh process, measured from after `import transformers`)."""
    code = f"""
import json, threading, time, psutil, torch, transformers
import sys; sys.path.insert(0, {str(REPO)!r})
from workflows.models import load_base, _smollm2_model_dir_in
_smollm2_model_dir_in("bfloat16")  # the converted folder exists before the measurement
p = psutil.Process(); base = p.memory_info().rss; peak = [base]; done = threading.Event()
def watch():
    while not done.wait(0.002):
        peak[0] = max(peak[0], p.memory_info().rss)
t = threading.Thread(target=watch); t.start()
model, _ = load_base("smollm2-135m", dtype="bfloat16", device={"cuda" if gpu else "cpu"!r})
done.set(); t.join()
weights = sum(x.numel() * x.element_size() for x in model.parameters())
gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(json.dumps({{"weights_mib": weights / 2**20, "host_peak_mib": (peak[0] - base) / 2**20,
                  "host_ratio": (peak[0] - base) / weights, "gpu_peak_gib": gpu_peak / 2**30}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_throughput(gpu: bool, steps: int) -> dict:
    """lora_core vs PEFT, SmolLM2, bf16 base + autocast on a GPU (fp32 on CPU), batch 8 x 512."""
    import peft
    import torch

    import lora_core
    from workflows.models import load_base

    device = "cuda" if gpu else "cpu"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    batch, seq = (8, 512) if gpu else (2, 64)
    with gzip.open(DATA / "gsm8k" / "train.jsonl.gz", "rt") as f:
        text = " ".join(json.loads(line)["answer"] for _, line in zip(range(200), f))
    out = {}
    for name in ("lora_core", "peft"):
        model, tok = load_base("smollm2-135m", dtype="bfloat16" if gpu else "float32", device=device)
        ids = torch.tensor(tok(text)["input_ids"][: batch * seq], device=device).view(batch, seq)
        if name == "peft":
            model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                               target_modules=targets, task_type="CAUSAL_LM"))
        else:
            lora_core.apply_lora(model, lora_core.LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=targets))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        times = []
        for i in range(steps + 2):
            if gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gpu:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
        out[name] = batch * seq / (sorted(times)[len(times) // 2])
        del model, opt
    out["ratio"] = out["lora_core"] / out["peft"]
    return {k: round(v, 3 if k == "ratio" else 0) for k, v in out.items()}


def evaluate_generate_predict(gpu: bool, cfg, prepared, new: Path, champion: Path, work: Path) -> dict:
    from workflows.adapters import AdapterFiles
    from workflows.evaluate.generation import generate
    from workflows.evaluate.stage import run_evaluate

    started = time.perf_counter()
    metrics = run_evaluate(cfg, prepared, AdapterFiles.read(new, "new"), work / "evaluate",
                           champion=AdapterFiles.read(champion, "champion")).metrics
    out = {"evaluate_seconds": round(time.perf_counter() - started, 1),
           "eval_actor_gpus": [a["gpus"] for a in metrics["actors"].values()],
           "eval_loss": {m: round(v["loss"], 4) for m, v in metrics["models"].items()},
           "padding_fraction": metrics["padding_fraction"]}
    started = time.perf_counter()
    answer = generate(None, new, ["Natalia sold 48 clips in April and half as many in May. How many in total?"],
                      max_new_tokens=48, device="cuda" if gpu else "cpu")[0]
    out.update(generate_seconds=round(time.perf_counter() - started, 1), generated=answer[:120])
    out.update(predict_on_device(gpu, work))
    return out


def predict_on_device(gpu: bool, work: Path) -> dict:
    """`predict` with a MiniLM classification adapter (mean pooling, the Banking77 setup) on the
    device. The adapter is saved untrained (B = 0, a seeded head): this checks the path, not accuracy."""
    import torch

    import lora_core
    from workflows.evaluate.generation import predict
    from workflows.models import load_base

    labels = ["card_arrival", "declined_card_payment", "exchange_rate"]
    torch.manual_seed(0)
    model, _ = load_base("minilm-l6", task="seq_cls", num_labels=len(labels), pooling="mean")
    lora_core.apply_lora(model, lora_core.LoraConfig(r=8, alpha=16, target_modules=["query", "value"],
                                                     task_type="SEQ_CLS"))
    adapter = lora_core.save_adapter(model, work / "classifier", base_identity={"name": "minilm-l6"},
                                     extra={"label_names": labels, "config": {"model": {"pooling": "mean"}}})
    started = time.perf_counter()
    texts = ["my card was declined", "when will my card arrive"]
    results = predict("minilm-l6", adapter, texts, device="cuda" if gpu else "cpu")
    return {"predict_seconds": round(time.perf_counter() - started, 1),
            "predicted": [(r["label"], round(r["score"], 3)) for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the same paths on CPU (few steps)")
    parser.add_argument("--out", type=Path, help=f"where the report goes (default: {RESULTS.relative_to(REPO)} on a "
                                                 "GPU, nowhere with --cpu)")
    args = parser.parse_args()
    gpu = not args.cpu
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from workflows.prepare.stage import run_prepare
    from workflows.prepared import PreparedData  # noqa: F401  (documentation of what run_prepare returns)

    work = Path(tempfile.mkdtemp(prefix="loraflow-gpu-smoke-"))
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
             **({} if gpu else {"num_cpus": 4}))
    rows: dict = {}
    started = time.perf_counter()
    try:
        base = config(gpu, work)
        prepared = run_prepare(base, str(work / "prepared"))
        first = train("1-worker-nccl-bf16", base, prepared, work, rows)
        shared = config(gpu, work, num_workers=2, gpus_per_worker=0.5, ddp_backend="gloo", cpus_per_worker=0.5)
        train("2-workers-share-gpu-gloo", shared, prepared, work, rows)
        moe = config(gpu, work, model="tiny-mixtral", num_workers=2, gpus_per_worker=0.5, ddp_backend="gloo",
                     cpus_per_worker=0.5)
        train("2-workers-tiny-moe", moe, prepared, work, rows)
        fp16 = train("1-worker-fp16", config(gpu, work, precision="fp16"), prepared, work, rows)
        rows["evaluate+generate"] = evaluate_generate_predict(gpu, base, prepared, fp16, first, work)
        print(json.dumps(rows["evaluate+generate"]), flush=True)
    finally:
        ray.shutdown()
    rows["load"] = load_memory(gpu)
    rows["step lora_core vs PEFT"] = step_throughput(gpu, 10 if gpu else 2)
    rows["total_seconds"] = round(time.perf_counter() - started)
    report = render(rows, gpu)
    print(report)
    out = args.out or (RESULTS if gpu else None)
    if out is not None:
        out.write_text(report)


def render(rows: dict, gpu: bool) -> str:
    import torch

    device = torch.cuda.get_device_name() if gpu else "CPU"
    lines = [f"# GPU smoke (bench/gpu_smoke.py) on {device}", "", "| run | " + " | ".join(
        ["seconds", "tokens/s", "MFU", "precision", "peak GPU GiB", "all-reduce B/step", "adapter B", "workers"]) + " |",
        "|---" * 9 + "|"]
    for name, r in rows.items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            lines.append(f"| {name} | {r['seconds']} | {r['tokens_per_s']} | {r['mfu']} | {r['precision']} | "
                         f"{r['peak_gpu_memory_gib']} | {r['allreduce_bytes_per_step']:,} | {r['adapter_param_bytes']:,} | "
                         f"{r['world_size']} |")
    lines += ["", "```json", json.dumps({k: v for k, v in rows.items() if not (isinstance(v, dict) and "tokens_per_s" in v)},
                                        indent=2), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

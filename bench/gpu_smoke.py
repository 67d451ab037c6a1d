"""GPU smoke: every GPU path of loraflow once, in under 8 minutes on one GPU, nothing downloaded.

    .venv/bin/python -m bench.gpu_smoke            # on a machine with a GPU: writes bench/results/gpu_smoke.md
    .venv/bin/python -m bench.gpu_smoke --cpu      # the same wiring on CPU (few steps), anywhere

Parts (each one passes or fails on its own, with its error; the report is rewritten after every
part, so a crash in one keeps the others' results):
1. train: 1 worker, NCCL, `auto` dtype and precision (bf16 on a GPU that has it natively), SmolLM2-135M
   on GSM8K (packed 512: FlashAttention-2 if `flash_attn` is installed, else SDPA; recorded)
2. train: 2 workers sharing the GPU (0.5 each) over a gloo group fed CUDA tensors, so every
   collective's device placement is exercised; then the tiny mixture of experts the same way
3. train: forced fp16 (`model.dtype: float16`, `train.precision: fp16`): the GradScaler path, even on
   a bf16 GPU (what a T4 or V100 gets), with trainable parameters kept fp32
4. evaluate: one eval actor on the GPU scoring base, the new adapter (3) and a champion (1)
5. generate (SmolLM2 + adapter 1) and predict (MiniLM + a mean-pooling classification adapter) on the GPU
6. load: peak host RSS of loading SmolLM2 in bf16 straight onto the GPU, measured after CUDA is
   initialised (the CUDA context is not load cost), and peak GPU memory next to the weight bytes
7. step: bench/lora_step's LoRA step against the frozen-base floor and PEFT, bf16 autocast
   (the goal on a GPU: LoRA step <= 1.05x the frozen floor)
Each training part prints tokens/s (training steps only), MFU (4N FLOPs per trained token: LoRA
skips the frozen weights' gradients; the peak looked up from the device name, named in the report),
peak GPU memory and all-reduce bytes per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
RESULTS = REPO / "bench" / "results" / "gpu_smoke.md"
# Dense bf16/fp16 tensor-core peaks (TFLOPS) from the vendors' data sheets; the first key found in
# the device name wins, so the more specific names come first.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "L4": 121.0, "A10G": 70.0, "A10": 125.0, "T4": 65.0, "V100": 125.0}


def config(gpu: bool, work: Path, dtype: str = "auto", **train):
    from workflows.config import config_from_dict

    return config_from_dict({
        "model": {"name": train.pop("model", "smollm2-135m"), "dtype": dtype},
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


def peak_flops() -> tuple[float | None, str]:
    """(peak FLOP/s, which peak) for this GPU, from its name; (None, why) when unknown."""
    import torch

    if not torch.cuda.is_available():
        return None, "no GPU"
    name = torch.cuda.get_device_name()
    key = next((k for k in PEAK_TFLOPS if k in name), None)
    if key is None:
        return None, f"{name}: no peak known (add it to PEAK_TFLOPS)"
    return PEAK_TFLOPS[key] * 1e12, f"{name}: {key} dense bf16/fp16 peak {PEAK_TFLOPS[key]:.0f} TFLOPS"


def train(name: str, cfg, prepared, work: Path, adapters: dict) -> dict:
    from workflows.devices import resolve_dtype
    from workflows.train.stage import run_train

    started = time.perf_counter()
    result = run_train(cfg, prepared, work / name, storage_path=work / "ray_train", run_name=name)
    adapters[name] = result.adapter_dir
    m = result.metrics
    device = "cuda" if cfg.train.use_gpu else "cpu"
    n = m["base_param_bytes"] / (4 if resolve_dtype(cfg.model.dtype, device) == "float32" else 2)  # ~ frozen params
    flops, _ = peak_flops()
    return {"seconds": round(time.perf_counter() - started, 1), "steps": m["steps"],
            "train_loss": m.get("train_loss"), "tokens_per_s": round(m["tokens_per_s"]),
            "step_time_s": round(m["step_time_s"], 4), "eval_s": m.get("eval_s"), "checkpoint_s": m.get("checkpoint_s"),
            "mfu": round(4 * n * m["tokens_per_s"] / flops, 3) if flops else None,
            "precision": m.get("precision"), "attn_implementation": m.get("attn_implementation"),
            "peak_gpu_memory_gib": round(m.get("peak_gpu_memory_bytes", 0) / 2**30, 2),
            "allreduce_bytes_per_step": m["allreduce_bytes_per_step"], "adapter_param_bytes": m["adapter_param_bytes"],
            "world_size": m["world_size"]}


def load_memory(gpu: bool) -> dict:
    """Peak host RSS of loading SmolLM2 in bf16 onto the device, over the bf16 weight bytes (in a
    fresh process, measured from after `import transformers` and, on a GPU, after CUDA's init), and
    the peak GPU memory allocated by the load next to the weight bytes."""
    code = f"""
import json, threading, time, psutil, torch, transformers
import sys; sys.path.insert(0, {str(REPO)!r})
from workflows.models import load_base, _smollm2_model_dir_in
_smollm2_model_dir_in("bfloat16")  # the converted folder exists before the measurement
if {gpu!r}:  # the CUDA context (hundreds of MiB of host memory) is not load cost
    torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.reset_peak_memory_stats()
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
                  "host_ratio": (peak[0] - base) / weights, "gpu_peak_mib": gpu_peak / 2**20,
                  "gpu_peak_over_weights": gpu_peak / weights}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_vs_floor(gpu: bool, rounds: int) -> dict:
    """bench/lora_step on the device: lora_core, the frozen-base floor (no adapter: forward and
    backward of activations only) and PEFT, same weights and batch, interleaved; median step."""
    import statistics

    import torch

    from bench.lora_step import build, gsm8k_batch, train_step
    from workflows.models import load_base

    device = "cuda" if gpu else "cpu"
    base, tokenizer = load_base("smollm2-135m", dtype="bfloat16" if gpu else "float32", device=device)
    ids = gsm8k_batch(tokenizer, 512 if gpu else 64).to(device)
    variants = ("lora_core", "frozen", "peft")
    models = {v: build(v, base) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds + 1):  # the first round warms up
        for v in variants[r % 3:] + variants[:r % 3]:
            t = train_step(*models[v], ids)
            if r:
                times[v].append(t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    out = {f"{v}_step_s": round(med[v], 4) for v in variants}
    out["lora_over_frozen"] = round(med["lora_core"] / med["frozen"], 3)  # goal on a GPU: <= 1.05
    out["peft_over_lora"] = round(med["peft"] / med["lora_core"], 3)
    out["tokens_per_step"] = ids.numel()
    del models, base
    if gpu:
        torch.cuda.empty_cache()
    return out


def evaluate_generate_predict(gpu: bool, cfg, prepared, adapters: dict, work: Path) -> dict:
    from workflows.adapters import AdapterFiles
    from workflows.evaluate.generation import generate
    from workflows.evaluate.stage import run_evaluate

    if not {"1-worker-fp16", "1-worker-nccl-bf16"} <= set(adapters):
        raise RuntimeError(f"needs the adapters of parts 1 and 3; only {sorted(adapters)} trained")
    new, champion = adapters["1-worker-fp16"], adapters["1-worker-nccl-bf16"]
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

    out = args.out or (RESULTS if gpu else None)
    work = Path(tempfile.mkdtemp(prefix="loraflow-gpu-smoke-"))
    rows: dict = {}
    adapters: dict = {}
    started = time.perf_counter()

    def part(name: str, body: Callable[[], dict]) -> None:
        rows[name] = run_part(body)
        print(name, json.dumps(rows[name]), flush=True)
        if out is not None:  # after every part: a later crash keeps what ran
            write_report(out, render(rows, gpu))

    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
             **({} if gpu else {"num_cpus": 4}))
    try:
        base = config(gpu, work)
        stash: dict = {}

        def prepare() -> dict:
            stash["prepared"] = run_prepare(base, str(work / "prepared"))
            return {"packed": stash["prepared"].manifest.get("packed")}
        part("prepare", prepare)
        prepared = stash.get("prepared")  # None: every part below fails, naming why
        shared = dict(num_workers=2, gpus_per_worker=0.5, ddp_backend="gloo", cpus_per_worker=0.5)
        part("1-worker-nccl-bf16", lambda: train("1-worker-nccl-bf16", base, prepared, work, adapters))
        part("2-workers-share-gpu-gloo", lambda: train("2-workers-share-gpu-gloo", config(gpu, work, **shared),
                                                       prepared, work, adapters))
        part("2-workers-tiny-moe", lambda: train("2-workers-tiny-moe", config(gpu, work, model="tiny-mixtral", **shared),
                                                 prepared, work, adapters))
        part("1-worker-fp16", lambda: train("1-worker-fp16", config(gpu, work, dtype="float16", precision="fp16"),
                                            prepared, work, adapters))
        part("evaluate+generate+predict", lambda: evaluate_generate_predict(gpu, base, prepared, adapters, work))
    finally:
        ray.shutdown()
    part("load", lambda: load_memory(gpu))
    part("step lora_core vs frozen floor vs PEFT", lambda: step_vs_floor(gpu, 10 if gpu else 2))
    rows["total_seconds"] = round(time.perf_counter() - started)
    report = render(rows, gpu)
    print(report)
    if out is not None:
        write_report(out, report)
    failed = [name for name, r in rows.items() if isinstance(r, dict) and r.get("status") == "fail"]
    if failed:
        sys.exit(f"gpu_smoke: {len(failed)} part(s) failed: {', '.join(failed)}")


def run_part(body: Callable[[], dict]) -> dict:
    """`body()`'s figures with status "pass", or status "fail" and its error; never raises."""
    started = time.perf_counter()
    try:
        result = {"status": "pass", **body()}
    except Exception as e:  # one part's failure is a result, not the end of the smoke test
        traceback.print_exc()
        result = {"status": "fail", "error": f"{type(e).__name__}: {e}"[:2000]}
    result["part_seconds"] = round(time.perf_counter() - started, 1)
    return result


def write_report(path: Path, report: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report)
    tmp.replace(path)


def render(rows: dict, gpu: bool) -> str:
    import torch

    device = torch.cuda.get_device_name() if gpu else "CPU"
    _, peak = peak_flops()
    lines = [f"# GPU smoke (bench/gpu_smoke.py) on {device}", "", f"MFU peak: {peak}.", "",
             "| part | status | " + " | ".join(
                 ["seconds", "tokens/s", "MFU", "precision", "attention", "peak GPU GiB", "all-reduce B/step",
                  "adapter B", "workers"]) + " |", "|---" * 11 + "|"]
    for name, r in rows.items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            lines.append(f"| {name} | {r['status']} | {r['seconds']} | {r['tokens_per_s']} | {r['mfu']} | "
                         f"{r['precision']} | {r['attn_implementation']} | {r['peak_gpu_memory_gib']} | "
                         f"{r['allreduce_bytes_per_step']:,} | {r['adapter_param_bytes']:,} | {r['world_size']} |")
    failed = {k: v["error"] for k, v in rows.items() if isinstance(v, dict) and v.get("status") == "fail"}
    if failed:
        lines += ["", "Failed parts:", ""] + [f"- **{k}**: `{e.splitlines()[0] if e else ''}`" for k, e in failed.items()]
    others = {k: v for k, v in rows.items() if not (isinstance(v, dict) and "tokens_per_s" in v)}
    lines += ["", "```json", json.dumps(others, indent=2), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

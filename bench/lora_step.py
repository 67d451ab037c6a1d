"""LoRA training-step benchmark (not a timed test): lora_core vs PEFT vs full fine-tuning.

    .venv/bin/python -m bench.lora_step [--seqs 128 256] [--rounds 3] [--threads 2] [--clock wall]
        [--variants lora_core lora_core_ref peft full lora_core_bf16 lora_core_bf16_ref frozen] [--write]

SmolLM2-135M, the same weights and the same batch (4 x seq tokens of GSM8K text) for every
variant; steps are interleaved round-robin in one process so machine drift hits all alike, and
the median step (forward + backward + AdamW step) is reported. LoRA: r=8, alpha=16, dropout 0.05
on the seven projections. `lora_core` runs where it can on the fast path (lora_core/fused.py), as it
does by default; `lora_core_ref` (and `lora_core_bf16_ref`) is the same model with the fast path
switched off for it (`lora_core.fused.set_enabled(False, model)`): the reference forward, the
formula in `LoraLinear.forward`. `frozen` is the floor every LoRA step shares: the same model with no
adapter and no optimizer, backpropagating to its input embeddings (a little more than LoRA needs:
layer 0's input gradient). MFU counts 4N FLOPs per token for LoRA (forward + input gradients) and
6N for full fine-tuning, N = 134.5M (lm_head matmul included), against a matmul peak measured in
the same run (fp32 [512,576]x[576,576], and bf16 for the bf16-base variants). Peak RSS is measured
per variant in a fresh subprocess (`--rss-child`) so peaks do not mix. Writes
bench/results/lora_step.md with `--write`.

`--device cuda`: the base is loaded in bf16 on the GPU and every step runs under bf16 autocast,
timed between `torch.cuda.synchronize()` calls; the matmul peak is measured on the GPU; no RSS
(host memory is not what a GPU step costs). bench/gpu_smoke.py runs lora_core, frozen and PEFT this
way (the goal on a GPU: a LoRA step <= 1.05x the frozen floor). The fused fast path is CPU-only, so
on a GPU lora_core runs the reference formula (bench/README.md: what a CUDA fast path would need).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "lora_step.md"
DATA = REPO / "data" / "gsm8k" / "train.jsonl.gz"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("lora_core", "lora_core_ref", "peft", "full", "lora_core_bf16", "lora_core_bf16_ref", "frozen")
DEFAULT_VARIANTS = ("lora_core", "peft", "full", "lora_core_bf16")
BATCH = 4
NOTES = "<!-- notes: kept by --write -->"


def gsm8k_batch(tokenizer, seq: int) -> torch.Tensor:
    """(BATCH, seq) token ids: GSM8K question/answer text, concatenated and cut (no padding)."""
    ids: list[int] = []
    with gzip.open(DATA, "rt") as f:
        for line in f:
            row = json.loads(line)
            ids += tokenizer(f"Question: {row['question']}\nAnswer: {row['answer']}\n")["input_ids"]
            if len(ids) >= BATCH * seq:
                break
    return torch.tensor(ids[:BATCH * seq]).view(BATCH, seq)


def build(variant: str, base: torch.nn.Module):
    """(model, optimizer) for one variant, on a private copy of `base`."""
    model = copy.deepcopy(base)
    model.config.use_cache = False
    if variant == "frozen":  # no adapter, no optimizer, backpropagation to the input embeddings
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        return model.train(), _NoOptimizer()
    if variant == "full":
        model.requires_grad_(True)
        params = list(model.parameters())
    elif variant == "peft":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                           target_modules=TARGETS, task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        import lora_core
        if variant.startswith("lora_core_bf16"):
            model.to(torch.bfloat16)
        lora_core.apply_lora(model, lora_core.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=TARGETS))
        # per model, not process-wide: the variants' steps interleave in one process
        lora_core.fused.set_enabled(not variant.endswith("_ref"), model)
        params = list(lora_core.adapter_parameters(model).values())
    return model.train(), torch.optim.AdamW(params, lr=1e-5)


class _NoOptimizer:
    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


# wall: what a user waits. cpu: process CPU time, robust to other load on a shared machine with
# --threads 1 (with more threads it also counts OpenMP spin-waiting). thread: this thread's CPU time,
# --threads 1 only (the other threads' work would be missed). CPU clocks include the kernel's time
# for page faults, which glibc's reuse of freed heap memory makes vary from step to step.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}


def train_step(model, optimizer, ids: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds for one step (forward, backward, optimizer step) on `clock`; on a GPU under bf16
    autocast, between two synchronisations (the step's kernels, not their launch)."""
    cuda = ids.is_cuda
    _sync(cuda)
    start = clock()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(cuda)
    return clock() - start


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, clock=time.perf_counter, reps: int = 200, device: str = "cpu") -> float:
    """GFLOP/s of the best of 5 timings of [512,576] x [576,576] (a typical projection)."""
    a = torch.randn(512, 576, dtype=dtype, device=device)
    b = torch.randn(576, 576, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(5):
        _sync(a.is_cuda)
        start = clock()
        for _ in range(reps):
            torch.mm(a, b)
        _sync(a.is_cuda)
        best = min(best, clock() - start)
    return 2 * 512 * 576 * 576 * reps / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
    fork and exec, so a child would report its (large) parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def rss_child(variant: str, seq: int) -> None:
    """Run in a fresh process: load, build one variant, take 2 steps, print peak RSS (MB) as JSON."""
    from workflows.models import load_base
    base, tokenizer = load_base("smollm2-135m")
    ids = gsm8k_batch(tokenizer, seq)
    loaded_mb = peak_rss_mb()
    model, optimizer = build(variant, base)
    del base
    for _ in range(2):
        train_step(model, optimizer, ids)
    print(json.dumps({"loaded_mb": loaded_mb, "peak_mb": peak_rss_mb()}))


def measure_rss(variant: str, seq: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.lora_step", "--rss-child", variant, str(seq),
                          "--threads", str(threads)], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant and sequence length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                        help="full and peft are always included (the ratios' denominators); the *_ref variants and "
                             "frozen are opt-in: each further resident model changes the others' page-fault costs")
    parser.add_argument("--no-rss", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: bf16 base under bf16 autocast, no RSS")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.relative_to(REPO)}")
    parser.add_argument("--rss-child", nargs=2, metavar=("VARIANT", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    variants = tuple(v for v in VARIANTS if v in {*args.variants, "peft", "full"})
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = CLOCKS[args.clock]
    if args.rss_child:
        return rss_child(args.rss_child[0], int(args.rss_child[1]))
    cuda = torch.device(args.device).type == "cuda"
    args.no_rss = args.no_rss or cuda

    from workflows.models import load_base
    base, tokenizer = load_base("smollm2-135m", dtype="bfloat16" if cuda else "float32", device=args.device)
    n_params = sum(p.numel() for p in base.parameters())  # tied embeddings once: the lm_head matmul
    peaks = {d: matmul_peak(d, clock, device=args.device) for d in (torch.float32, torch.bfloat16)}
    models = {v: build(v, base) for v in variants}
    times: dict[tuple[str, int], list[float]] = {}
    for seq in args.seqs:
        ids = gsm8k_batch(tokenizer, seq).to(args.device)
        for variant in variants:  # warm-up: allocator, thread pools, first-call paths
            train_step(*models[variant], ids, clock)
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for variant in order:
                times.setdefault((variant, seq), []).append(train_step(*models[variant], ids, clock))
                print(f"seq {seq} round {r} {variant}: {times[variant, seq][-1]:.2f} s", flush=True)
    peaks_after = {d: matmul_peak(d, clock, device=args.device) for d in (torch.float32, torch.bfloat16)}
    del models
    rss = {} if args.no_rss else {(v, s): measure_rss(v, s, args.threads) for s in args.seqs for v in variants}
    report = render(args, variants, n_params, peaks, peaks_after, times, rss)
    print(report)
    if args.write:
        write_results(report, RESULTS)


def write_results(report: str, path: Path) -> None:
    """Replace the generated tables in `path`, keeping the hand-written notes below NOTES."""
    old = path.read_text() if path.exists() else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report + "\n" + (old[old.index(NOTES):] if NOTES in old else NOTES + "\n"))


def _fast_path_enabled() -> bool:
    from lora_core import fused
    return fused.enabled()


def render(args, variants, n_params, peaks, peaks_after, times, rss) -> str:
    peak = {d: max(peaks[d], peaks_after[d]) for d in peaks}
    lines = [
        "# LoRA training step: lora_core vs PEFT vs full fine-tuning", "",
        f"`.venv/bin/python -m bench.lora_step --seqs {' '.join(map(str, args.seqs))} --rounds {args.rounds} "
        f"--threads {args.threads} --clock {args.clock}"
        + (f" --variants {' '.join(args.variants)}" if tuple(args.variants) != DEFAULT_VARIANTS else "")
        + (f" --device {args.device}" if args.device != "cpu" else "")
        + " --write`", "",
        f"SmolLM2-135M (N = {n_params / 1e6:.1f}M), batch {BATCH} x seq of GSM8K text, AdamW; LoRA r=8 alpha=16 "
        f"dropout 0.05 on {', '.join(TARGETS)}. torch {torch.__version__}, "
        + (f"{torch.cuda.get_device_name()} (bf16 base, bf16 autocast)" if args.device.startswith("cuda")
           else f"{args.threads} threads") + ". Median of "
        f"{args.rounds} interleaved steps after one warm-up step, {args.clock} clock"
        + ("" if _fast_path_enabled() else " (fast path off process-wide: LORAFLOW_FUSED_LORA)")
        + ". Matmul peak (fp32 / bf16, GFLOP/s, start - end "
        f"of run): {peaks[torch.float32]:.0f} - {peaks_after[torch.float32]:.0f} / "
        f"{peaks[torch.bfloat16]:.0f} - {peaks_after[torch.bfloat16]:.0f}; MFU uses the larger.", "",
        "| seq | variant | step s | tokens/s | vs PEFT tokens/s | step / full step | MFU | peak RSS MB "
        "| RSS / full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seq in args.seqs:
        med = {v: statistics.median(times[v, seq]) for v in variants}
        for v in variants:
            tokens_s = BATCH * seq / med[v]
            flops = (6 if v == "full" else 4) * n_params * tokens_s
            mfu = flops / (peak[torch.bfloat16 if "bf16" in v else torch.float32] * 1e9)
            mem = rss.get((v, seq))
            mem_cols = (f"{mem['peak_mb']:.0f} | {mem['peak_mb'] / rss[('full', seq)]['peak_mb']:.2f}"
                        if mem else "- | -")
            lines.append(f"| {seq} | {v} | {med[v]:.2f} | {tokens_s:.0f} | {med['peft'] / med[v]:.2f} | "
                         f"{med[v] / med['full']:.2f} | {mfu:.2f} | {mem_cols} |")
    lines += ["", "All step times (s):", ""]
    lines += [f"- seq {s} {v}: {', '.join(f'{t:.2f}' for t in ts)}" for (v, s), ts in sorted(times.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

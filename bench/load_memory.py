"""Benchmark: peak host memory of loading a base model in bf16 (not a timed test).

Each variant runs in a fresh process and reports its peak RSS while loading, above what it held
after importing transformers, as a multiple of the bf16 weight bytes (target: <= 1.2x on CPU; on a
GPU the host should hold well under the weights, < 0.3x):

- `fp32 then cast`: what `load_base` did before: read the fp32 folder, then `.to(bfloat16)`;
- `fp32 file, bf16 load`: `from_pretrained(dtype=bfloat16)` on the fp32 folder (tensors cast as read);
- `load_base`: today's path, a converted bf16 folder that is memory-mapped.

    .venv/bin/python bench/load_memory.py --out bench/results/load_memory.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, threading, psutil, torch, transformers
sys.path.insert(0, {repo!r})
from transformers import AutoModelForCausalLM
from workflows import models
fp32 = models._smollm2_model_dir(); models._smollm2_model_dir_in("bfloat16")  # built before measuring
p = psutil.Process(); start = p.memory_info().rss; peak = [start]; done = threading.Event()
def watch():
    while not done.wait(0.001):
        peak[0] = max(peak[0], p.memory_info().rss)
t = threading.Thread(target=watch); t.start()
variant = {variant!r}
if variant == "fp32 then cast":
    model = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32).to(torch.bfloat16)
elif variant == "fp32 file, bf16 load":
    model = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16)
else:
    model, _ = models.load_base("smollm2-135m", dtype="bfloat16")
done.set(); t.join()
weights = sum(x.numel() * x.element_size() for x in model.parameters())
print(json.dumps({{"weights": weights, "peak": peak[0] - start}}))
"""

VARIANTS = ("fp32 then cast", "fp32 file, bf16 load", "load_base")


def measure(variant: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), variant=variant)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = {v: [measure(v) for _ in range(args.rounds)] for v in VARIANTS}
    lines = ["| variant | bf16 weights (MiB) | peak RSS above start (MiB), median | ratio to the weights |",
             "|---|---|---|---|"]
    for variant, runs in rows.items():
        peak = sorted(r["peak"] for r in runs)[len(runs) // 2]
        weights = runs[0]["weights"]
        lines.append(f"| {variant} | {weights / 2**20:.0f} | {peak / 2**20:.0f} | {peak / weights:.2f}x |")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text("# Peak host memory of loading SmolLM2-135M in bf16 (bench/load_memory.py)\n\n"
                            "    .venv/bin/python bench/load_memory.py --out bench/results/load_memory.md\n\n"
                            f"{args.rounds} fresh processes per variant, CPU.\n\n" + report + "\n")


if __name__ == "__main__":
    main()

"""Evaluation throughput on SmolLM2-135M: what the evaluate stage's scoring costs (not a test).

Part 1, in one process, interleaved rounds on the same batches (real GSM8K text, B x T tokens),
each config scored exactly as the eval actor scores (forward with a padding mask, per-token NLL,
argmax accuracy) under `torch.inference_mode`:
  base          the plain base model
  merged        lora_core adapter merged into the base (the evaluate stage's fast path)
  unmerged      lora_core adapter as a separate branch (what scoring several models uses)
  peft          PEFT's `PeftModel.from_pretrained` of the same adapter files, unmerged
Targets: merged within 2% of base; unmerged vs merged shows what merging saves (~1.12x anchor).

Part 2: the whole Ray Data evaluate stage (`run_evaluate`, merged path) with 1 and with 2 actors
on the same prepared rows; wall time includes actor start-up and model load.

    .venv/bin/python bench/evaluate.py [--batch 8 --seq 128 --rounds 5 --actor-rows 96]

Absolute numbers drift 15-20% on a shared machine: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "data"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gsm8k_rows(tok, n: int, seq: int) -> list[dict]:
    """Prepared-style eval rows: question as prompt (labels -100), answer as response."""
    rows = []
    for line in gzip.open(DATA / "gsm8k" / "test.jsonl.gz", "rt").read().splitlines():
        ex = json.loads(line)
        prompt = tok(ex["question"], add_special_tokens=False)["input_ids"]
        answer = tok(" " + ex["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (prompt + answer)[:seq]
        if len(ids) < seq:  # full-length rows: every config sees exactly B x T tokens
            continue
        p = min(len(prompt), seq - 1)
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:], "position_ids": list(range(seq)),
                     "num_examples": 1, "example_id": f"{len(rows):06d}", "prompt_len": p, "reference": ex["answer"]})
        if len(rows) == n:
            return rows
    raise SystemExit(f"only {len(rows)} GSM8K rows reach {seq} tokens")


def make_adapter(path: Path) -> Path:
    from lora_core import LoraConfig, adapter_parameters, apply_lora, save_adapter
    from workflows.models import load_base

    model, _ = load_base("smollm2-135m")
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return save_adapter(model, path, base_identity={"name": "smollm2-135m"})


@torch.inference_mode()
def score(model, batch: dict[str, torch.Tensor]) -> float:
    """The eval actor's work on one batch; returns the summed NLL so nothing is optimised away."""
    from workflows.collate import causal_token_nll

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    nll, mask = causal_token_nll(logits, batch["labels"])
    (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & mask  # noqa: B018  (token accuracy)
    return float(nll.sum())


def part1(args, adapter: Path, rows: list[dict]) -> list[tuple[str, float]]:
    import peft

    from lora_core import load_adapter, merge_adapter, unmerge_adapter
    from workflows.collate import CausalCollator
    from workflows.models import load_base

    base, tok = load_base("smollm2-135m")
    ours, _ = load_base("smollm2-135m")
    load_adapter(ours, adapter)
    theirs = peft.PeftModel.from_pretrained(load_base("smollm2-135m")[0], str(adapter)).eval()
    collate = CausalCollator(tok.pad_token_id, packed=False)
    batches = [collate({k: [r[k] for r in rows[i:i + args.batch]] for k in ("input_ids", "labels")})
               for i in range(0, args.batch * args.batches_per_round, args.batch)]
    tokens = sum(b["input_ids"].numel() for b in batches)

    def timed(model) -> float:
        start = time.perf_counter()
        for b in batches:
            score(model, b)
        return tokens / (time.perf_counter() - start)

    configs = {"base": lambda: timed(base), "unmerged": lambda: timed(ours), "peft": lambda: timed(theirs)}

    def merged() -> float:
        merge_adapter(ours)
        try:
            return timed(ours)
        finally:
            unmerge_adapter(ours)

    configs["merged"] = merged
    for fn in configs.values():  # warm-up: first-call allocations and oneDNN kernel selection
        fn()
    speeds: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name in (list(configs) if r % 2 == 0 else list(reversed(configs))):  # interleaved, alternating order
            speeds[name].append(configs[name]())
    return [(name, statistics.median(v)) for name, v in speeds.items()]


def part2(args, adapter: Path, rows: list[dict], workdir: Path) -> list[tuple[int, float, float]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from workflows.adapters import AdapterFiles
    from workflows.config import config_from_dict
    from workflows.evaluate.stage import run_evaluate
    from workflows.models import load_tokenizer
    from workflows.prepared import PreparedData

    tok = load_tokenizer("smollm2-135m")
    root = workdir / "prepared"
    (root / "eval").mkdir(parents=True)
    ints = pa.list_(pa.int32())
    schema = pa.schema([("input_ids", ints), ("labels", ints), ("position_ids", ints), ("num_examples", pa.int32()),
                        ("example_id", pa.string()), ("prompt_len", pa.int32()), ("reference", pa.string())])
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part, schema=schema), root / "eval" / f"part-{i:05d}.parquet")
    manifest = {"task": "causal_lm", "packed": False, "shards": {"train": [], "eval": [f"eval/part-{i:05d}.parquet"
                                                                                        for i in range(2)]},
                "tokenizer": {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "_SUCCESS").write_text("{}")
    prepared = PreparedData.load(root)
    tokens = sum(len(r["input_ids"]) for r in rows)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    out = []
    try:
        for actors in (1, 2):
            config = config_from_dict({"model": {"name": "smollm2-135m"},
                                       "data": {"source": "unused.jsonl", "format": "instruction"},
                                       "eval": {"actors": actors, "batch_size": args.batch, "compare_base": False,
                                                "bootstrap_samples": 0}})
            start = time.perf_counter()
            run_evaluate(config, prepared, AdapterFiles.read(adapter), workdir / f"evaluate-{actors}")
            wall = time.perf_counter() - start
            out.append((actors, wall, tokens / wall))
    finally:
        ray.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches-per-round", type=int, default=2)
    p.add_argument("--actor-rows", type=int, default=96)
    p.add_argument("--skip-actors", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("LORAFLOW_CACHE", str(Path.home() / ".cache" / "loraflow"))
    torch.set_num_threads(os.cpu_count() or 1)

    from workflows.models import load_tokenizer

    print(f"load average at start (1/5/15 min): {os.getloadavg()} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-eval-") as tmp:
        work = Path(tmp)
        adapter = make_adapter(work / "adapter")
        tok = load_tokenizer("smollm2-135m")
        rows = gsm8k_rows(tok, max(args.actor_rows, args.batch * args.batches_per_round), args.seq)
        speeds = dict(part1(args, adapter, rows))
        print(f"\n## In-process scoring, SmolLM2-135M, r=8 on 7 projections, batch {args.batch} x {args.seq}, "
              f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds\n")
        print("| config | tokens/s | vs base | vs merged |\n|---|---|---|---|")
        for name in ("base", "merged", "unmerged", "peft"):
            print(f"| {name} | {speeds[name]:.0f} | {speeds[name] / speeds['base']:.3f} | "
                  f"{speeds[name] / speeds['merged']:.3f} |")
        if not args.skip_actors:
            runs = part2(args, adapter, rows[: args.actor_rows], work)
            print(f"\n## run_evaluate (Ray Data, merged path), {args.actor_rows} rows x {args.seq} tokens, "
                  "wall time incl. actor start-up and model load\n")
            print("| actors | wall s | tokens/s |\n|---|---|---|")
            for actors, wall, tps in runs:
                print(f"| {actors} | {wall:.1f} | {tps:.0f} |")
    print(f"\nload average at end (1/5/15 min): {os.getloadavg()}")


if __name__ == "__main__":
    main()

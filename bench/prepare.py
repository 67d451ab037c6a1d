"""Benchmark: `loraflow prepare` (Ray Data) vs HF `datasets.map(batched=True, num_proc=2)`.

Same input, same run, same per-example work: GSM8K (as user/assistant chats) and SGD dialogues,
replicated to N rows, rendered with SmolLM2's chat template, tokenized, prompt-masked
(workflows/prepare/formats.py does both sides' work). loraflow also validates, splits, dedupes, packs
and writes shards; HF only maps (its Arrow cache write included). Reported: rows/s, tokens/s,
and peak RSS summed over the driver and every process it started (Ray workers, HF pool).

    .venv/bin/python bench/prepare.py --rows 20000 --scale 10 --out bench/results/prepare.md
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "data"


def write_input(path: Path, rows: int) -> None:
    """GSM8K questions as chats + SGD dialogues, cycled to `rows` lines (row index appended to
    the first user turn, so dedupe keeps every row and the hash split sees new content)."""
    gsm = [json.loads(x) for x in gzip.open(DATA / "gsm8k" / "train.jsonl.gz", "rt").read().splitlines()]
    sgd = [json.loads(x)["messages"] for x in gzip.open(DATA / "sgd-dialogues" / "messages_train.jsonl.gz", "rt").read().splitlines()]
    chats = [[{"role": "user", "content": g["question"]}, {"role": "assistant", "content": g["answer"]}] for g in gsm]
    chats += sgd
    with open(path, "w") as f:
        for i, chat in zip(range(rows), itertools.cycle(chats)):
            first = dict(chat[0], content=f"{chat[0]['content']} (#{i})")
            f.write(json.dumps({"messages": [first, *chat[1:]]}) + "\n")


class PeakRss:
    """Peak of RSS summed over this process and all its descendants, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._total())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_ENCODER = None


def _hf_encode(batch: dict) -> dict:
    """The same render + tokenize + mask as loraflow's actors, one encoder per HF worker."""
    global _ENCODER
    from workflows.models import load_tokenizer
    from workflows.prepare.formats import ExampleEncoder, canonical_example

    if _ENCODER is None:
        _ENCODER = ExampleEncoder(load_tokenizer("smollm2-135m"), "chat", 512)
    examples = [canonical_example({"messages": m}, "chat", {}) for m in batch["messages"]]
    encoded = _ENCODER.encode_causal(examples)
    return {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded]}


def run_hf(path: Path, cache: Path) -> dict:
    import datasets

    start = time.perf_counter()
    with PeakRss() as rss:
        ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))
        out = ds.map(_hf_encode, batched=True, batch_size=256, num_proc=2, remove_columns=ds.column_names)
        tokens = sum(len(x) for x in out["input_ids"])
    return {"seconds": time.perf_counter() - start, "rows": len(out), "tokens": tokens, "peak_rss": rss.peak}


def run_loraflow(path: Path, out: Path, actors: int) -> dict:
    from workflows.config import config_from_dict
    from workflows.prepare.stage import run_prepare

    cfg = config_from_dict({"model": {"name": "smollm2-135m"},
                            "data": {"source": str(path), "format": "chat", "max_seq_len": 512,
                                     "tokenize_actors": actors, "eval_fraction": 0.01}})
    start = time.perf_counter()
    with PeakRss() as rss:
        prepared = run_prepare(cfg, out)
    m = prepared.manifest
    tokens = m["tokens"]["train"]["total"] + m["tokens"]["eval"]["total"]
    return {"seconds": time.perf_counter() - start, "rows": m["counts"]["rows_read"], "tokens": tokens,
            "peak_rss": rss.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the 1x input")
    parser.add_argument("--scale", type=int, default=10, help="the large input is this many times the 1x")
    parser.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from workflows.models import load_tokenizer

    load_tokenizer("smollm2-135m")  # convert/cache once, outside the timings
    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-"))
    small, large = work / "1x.jsonl", work / f"{args.scale}x.jsonl"
    write_input(small, args.rows)
    write_input(large, args.rows * args.scale)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    base_rss = PeakRss()._total()

    results = {}
    # Interleaved so drift from other load on the machine hits both sides alike.
    results["loraflow 2 actors, 1x"] = run_loraflow(small, work / "lf-1x", 2)
    results["HF datasets num_proc=2, 1x"] = run_hf(small, work / "hf-cache-1x")
    results[f"loraflow 2 actors, {args.scale}x"] = run_loraflow(large, work / "lf-10x", 2)
    results[f"HF datasets num_proc=2, {args.scale}x"] = run_hf(large, work / "hf-cache-10x")
    results[f"loraflow 1 actor, {args.scale}x"] = run_loraflow(large, work / "lf-10x-1", 1)
    ray.shutdown()

    lines = ["| run | rows | seconds | rows/s | tokens/s | peak RSS (GiB) |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['rows']:,} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | "
                     f"{r['tokens'] / r['seconds']:,.0f} | {r['peak_rss'] / 2**30:.2f} |")
    hf10, lf10 = results[f"HF datasets num_proc=2, {args.scale}x"], results[f"loraflow 2 actors, {args.scale}x"]
    lf1, one = results["loraflow 2 actors, 1x"], results[f"loraflow 1 actor, {args.scale}x"]
    lines += ["", f"- loraflow / HF rows/s at {args.scale}x: {(lf10['rows'] / lf10['seconds']) / (hf10['rows'] / hf10['seconds']):.2f}x",
              f"- loraflow peak RSS {args.scale}x / 1x: {lf10['peak_rss'] / lf1['peak_rss']:.2f}x "
              f"(HF: {hf10['peak_rss'] / results['HF datasets num_proc=2, 1x']['peak_rss']:.2f}x)",
              f"- loraflow 2 actors / 1 actor rows/s at {args.scale}x: {one['seconds'] / lf10['seconds']:.2f}x",
              f"- RSS of the driver + Ray processes before the runs: {base_rss / 2**30:.2f} GiB"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()

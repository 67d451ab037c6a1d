"""Benchmark: what the prepare stage holds in memory for dedupe as the input grows, and what the
planner reads to fingerprint the input.

1. Dedupe memory. Pass 1 of the prepare stage stages the encoded rows in buckets by content hash;
   pass 2 dedupes one bucket per task. The bucket count grows with the input (64 MiB of input per
   bucket in the stage; `--bucket-mb` scales that down so that a few hundred thousand rows show
   the effect), so a bucket task's peak memory should stay flat from 1x to 10x. The comparison is
   one bucket for the whole input: what a single dedupe actor would hold.
   Each variant finalizes its buckets in a fresh child process, one bucket at a time; its peak RSS
   above the child's own start is reported.
2. Planner reads. `loraflow dag` digests the input: a local file is hashed once and then served
   from the sha256 cache (bytes read by the planner process, `read_chars`); an object on S3 (moto)
   is fingerprinted by one HEAD request (GET requests on the data object, by moto's recorder).

    .venv/bin/python bench/prepare_scaling.py --rows 20000 --scale 10 --bucket-mb 2 --out bench/results/prepare_scaling.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CHILD = """
import json, sys, threading, time, psutil
sys.path.insert(0, {repo!r})
from workflows.prepare.finalize import BucketPlan, finalize_bucket
plan = BucketPlan(**json.loads({plan!r}))
p = psutil.Process(); start = p.memory_info().rss; peak = [start]; done = threading.Event()
def watch():
    while not done.wait(0.005):
        peak[0] = max(peak[0], p.memory_info().rss)
t = threading.Thread(target=watch); t.start()
rows = [finalize_bucket(plan, b)["examples"].get("train", 0) for b in range({buckets})]
done.set(); t.join()
print(json.dumps({{"peak": peak[0] - start, "rows_per_bucket": max(rows)}}))
"""


def stage(path: Path, root: Path, buckets: int):
    from workflows.config import config_from_dict
    from workflows.prepare.inputs import input_files
    from workflows.prepare.stage import _encode_and_stage

    cfg = config_from_dict({"model": {"name": "tiny-llama"},
                            "data": {"source": str(path), "format": "chat", "max_seq_len": 512, "eval_fraction": 0.01,
                                     "tokenize_actors": 2}})
    _encode_and_stage(cfg, input_files(cfg), "causal_lm", str(root), buckets)
    return cfg


def finalize_in_child(root: Path, buckets: int) -> dict:
    plan = json.dumps({"root": str(root), "task": "causal_lm", "packed": True, "max_seq_len": 512, "seed": 0,
                       "dedupe": True, "label_names": None})
    out = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO), plan=plan, buckets=buckets)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def planner_reads_local(path: Path) -> list[int]:
    from workflows.config import config_from_dict
    from workflows.prepare.inputs import input_digest

    cfg = config_from_dict({"data": {"source": str(path), "format": "chat"}})
    reads = []
    for _ in range(2):  # first plan hashes the file; the second finds the cached sha256
        before = psutil.Process().io_counters().read_chars
        input_digest(cfg)
        reads.append(psutil.Process().io_counters().read_chars - before)
    return reads


def planner_gets_s3(path: Path) -> dict:
    import socket
    import urllib.request

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recording = Path(tempfile.mkdtemp()) / "rec.jsonl"
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                       "MOTO_RECORDER_FILEPATH": str(recording)})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("bench")
        fs, _ = pafs.FileSystem.from_uri("s3://bench")
        with fs.open_output_stream("bench/input.jsonl") as f:
            f.write(path.read_bytes())
        from workflows.config import config_from_dict
        from workflows.prepare.inputs import input_digest

        def rec(action: str) -> None:
            urllib.request.urlopen(urllib.request.Request(f"{os.environ['AWS_ENDPOINT_URL']}/moto-api/recorder/{action}",
                                                          method="POST"))
        rec("start-recording")
        input_digest(config_from_dict({"data": {"source": "s3://bench/input.jsonl", "format": "chat"}}))
        rec("stop-recording")
        entries = [json.loads(x) for x in recording.read_text().splitlines() if x.strip()]
        on_data = [e["method"] for e in entries if "/bench/input.jsonl" in e["url"]]
        return {"requests": on_data, "gets": on_data.count("GET"), "object_bytes": path.stat().st_size}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--bucket-mb", type=float, default=2.0, help="input per bucket (the stage uses 64)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray
    from prepare import write_input

    work = Path(tempfile.mkdtemp(prefix="loraflow-bench-scaling-"))
    rows = {}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for scale in (1, args.scale):
            path = work / f"{scale}x.jsonl"
            write_input(path, args.rows * scale)
            buckets = max(2, math.ceil(path.stat().st_size / (args.bucket_mb * 2**20)))
            for label, n in ((f"{buckets} buckets (grows with the input)", buckets), ("1 bucket (all rows in one task)", 1)):
                root = work / f"{scale}x-{n}"
                started = time.perf_counter()
                stage(path, root, n)
                child = finalize_in_child(root, n)
                rows[(scale, label)] = {**child, "input_mb": path.stat().st_size / 2**20,
                                        "seconds": time.perf_counter() - started}
    finally:
        ray.shutdown()
    local = planner_reads_local(work / f"{args.scale}x.jsonl")
    s3 = planner_gets_s3(work / "1x.jsonl")

    lines = ["| input | buckets | input MiB | rows per bucket (max) | bucket task peak RSS above start (MiB) |",
             "|---|---|---|---|---|"]
    for (scale, label), r in rows.items():
        lines.append(f"| {scale}x | {label} | {r['input_mb']:.1f} | {r['rows_per_bucket']:,} | {r['peak'] / 2**20:.0f} |")
    grow = [r for (s, lb), r in rows.items() if "grows" in lb]
    one = [r for (s, lb), r in rows.items() if "1 bucket" in lb]
    lines += ["", f"- bucket task peak, {args.scale}x / 1x input, buckets growing with the input: "
                  f"{grow[1]['peak'] / grow[0]['peak']:.2f}x (one bucket for everything: {one[1]['peak'] / one[0]['peak']:.2f}x)",
              f"- planner, local {args.scale}x input ({local[0] / 2**20:.1f} MiB read the first time): "
              f"{local[1]:,} bytes read on the next plan (sha256 cache)",
              f"- planner, the 1x input on S3 ({s3['object_bytes']:,} bytes): requests on the object {s3['requests']}, "
              f"GETs {s3['gets']}"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text("# prepare: dedupe memory and planner reads (bench/prepare_scaling.py)\n\n"
                            f"    .venv/bin/python bench/prepare_scaling.py --rows {args.rows} --scale {args.scale} "
                            f"--bucket-mb {args.bucket_mb} --out {args.out}\n\n" + report + "\n")


if __name__ == "__main__":
    main()

"""fp16 training of a classifier on an fp16 base with a gradient scaler (GPUs without bf16), a mixture of experts under DDP, and a
node's model cache built by whichever training worker gets there first.

Two Train runs in all: the fp16 run is also the one whose worker is SIGKILLed, replaced and resumed,
and the mixture of experts trains in the group whose workers first build the model cache.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from train_support import (
    TRAIN,
    adapter_digests,
    cache_then_train_loop,
    gsm8k_config,
    prepared_gsm8k,
    probe_loop,
    read_jsonl,
)

from workflows.config import config_from_dict
from workflows.train.stage import run_train

# Reports every step (so that step 3, re-run after the restart, is logged by both attempts).
FP16 = {"precision": "fp16", "max_steps": 4, "checkpoint_every": 2, "log_every": 1, "eval_every": None,
        "eval_batches": 1}


pytestmark = pytest.mark.train_group

@pytest.fixture(scope="module")
def prepared(ray_session, example_data, session_tmp):
    return prepared_gsm8k(example_data, session_tmp)


def banking77_fp16_config(source: Path):
    """seq_cls on an fp16 base: the LoRA layers, the classifier head (modules_to_save) and its AdamW
    state must all be fp32 under fp16 autocast, or the scaler refuses fp16 gradients at step 1."""
    return config_from_dict({
        "model": {"name": "tiny-bert", "task": "seq_cls", "dtype": "float16"},
        "data": {"source": str(source), "format": "classification", "fields": {"text": "text", "label": "category"},
                 "max_seq_len": 32, "eval_fraction": 0.1, "num_shards": 2},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "train": {**TRAIN, "batch_size": 4, "grad_accum": 1, **FP16}})


@pytest.fixture(scope="module")
def banking77_slice(example_data, tmp_path_factory) -> Path:
    """24 rows of each of the first 4 intents of Banking77's train split (the file is sorted by intent)."""
    rows: dict[str, list[dict]] = {}
    with gzip.open(example_data / "banking77" / "train.csv.gz", "rt", newline="") as f:
        for row in csv.DictReader(f):
            if len(rows) < 4 or row["category"] in rows:
                rows.setdefault(row["category"], []).append(row)
    path = tmp_path_factory.mktemp("banking77") / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "category"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r for group in rows.values() for r in group[:24])
    return path


@pytest.fixture(scope="module")
def prepared_fp16_cls(ray_session, banking77_slice):
    from workflows.prepare.stage import run_prepare

    return run_prepare(banking77_fp16_config(banking77_slice), banking77_slice.parent / "prepared")


@pytest.fixture(scope="module")
def fp16_run(prepared_fp16_cls, banking77_slice, tmp_path_factory):
    """One fp16 run whose rank-1 worker SIGKILLs itself after step 3's report, once Ray Train has
    registered the step-2 checkpoint; Ray Train replaces it (max_failures=1), and the new group
    loads that checkpoint, scaler included, re-runs step 3 and finishes."""
    work = tmp_path_factory.mktemp("fp16")
    config = banking77_fp16_config(banking77_slice)
    config.train.max_failures = 1
    result = run_train(config, prepared_fp16_cls, work / "stage", storage_path=work / "rt", run_name="fp16",
                       loop=functools.partial(probe_loop, stop_after_step=3, first_attempt_only=True, sigkill_rank=1))
    return {"result": result, "metrics": result.metrics, "run_dir": work / "rt" / "fp16"}


def test_fp16_base_with_a_head_trains_with_a_scaler_that_is_checkpointed_and_resumes_exactly(fp16_run):
    """Step 3 must come out bitwise the same in the killed attempt and in the resumed one: adapter,
    loss, loss scale, gradient norm."""
    m, run_dir = fp16_run["metrics"], fp16_run["run_dir"]
    assert m["steps"] == 4 and m["precision"] == "float16" and m["resumed_from_step"] == 2
    assert m["loss_scale"] > 0 and torch.isfinite(torch.tensor(m["train_loss"]))
    assert m["attn_implementation"] == "sdpa"  # what ran, recorded (CPU: never FlashAttention)
    checkpoint = torch.load(next(run_dir.glob("checkpoint_*/optimizer.pt")), weights_only=True)
    assert set(checkpoint["scaler"]) >= {"scale", "_growth_tracker"}

    records = adapter_digests(run_dir)
    first = {r["step"]: r["digest"] for r in records if r["resumed_from"] is None}
    again = {r["step"]: r["digest"] for r in records if r["resumed_from"] is not None}
    assert sorted(first) == [1, 2, 3] and sorted(again) == [3, 4], records
    assert again[3] == first[3]
    step3 = [(r["train_loss"], r["loss_scale"], r["grad_norm"]) for r in read_jsonl(run_dir / "metrics.jsonl")
             if r["step"] == 3]
    assert len(step3) == 2 and step3[0] == step3[1], step3

    a = load_file(str(fp16_run["result"].adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in a
    assert {k: t.dtype for k, t in a.items() if t.dtype != torch.float32} == {}  # head and LoRA trained in fp32


def test_a_sigkilled_worker_is_replaced_and_resumes_from_the_registered_checkpoint(fp16_run):
    """The fault half of the fp16 run (test_train_faults.py has the lost node)."""
    records = adapter_digests(fp16_run["run_dir"], rank=1)
    killed = {r["pid"] for r in records if r["resumed_from"] is None}
    replacement = {r["pid"] for r in records if r["resumed_from"] is not None}
    assert len(killed) == 1 and len(replacement) == 1 and killed != replacement, records
    pid = killed.pop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead
    # It resumed from the checkpoint registered before the kill (step 2), never from scratch, so the
    # work lost is under one checkpoint interval: step 3 only.
    assert {r["resumed_from"] for r in records if r["resumed_from"] is not None} == {2}
    assert fp16_run["metrics"]["resumed_from_step"] == 2 and fp16_run["metrics"]["steps"] == 4


@pytest.fixture(scope="module")
def moe_on_a_fresh_node(prepared, example_data, tmp_path_factory):
    """tiny-mixtral under DDP, in a Train group whose workers first build SmolLM2's folder in an empty
    model cache (one group serves both: each check reads its own output)."""
    work = tmp_path_factory.mktemp("moe")
    config = gsm8k_config(example_data, model="tiny-mixtral", max_steps=4, checkpoint_every=None, eval_every=None,
                          log_every=4)
    config.lora.target_modules = "all-linear"
    cache = work / "cache"
    result = run_train(config, prepared, work / "stage", storage_path=work / "rt", run_name="moe",
                       loop=functools.partial(cache_then_train_loop, cache=str(cache)))
    return {"metrics": result.metrics, "cache": cache}


@pytest.mark.slow
def test_a_mixture_of_experts_trains_under_ddp_with_only_adapter_bytes_all_reduced(moe_on_a_fresh_node):
    m = moe_on_a_fresh_node["metrics"]
    assert m["find_unused_parameters"] is True  # auto: the model has experts
    assert m["steps"] == 4 and m["world_size"] == 2
    assert m["allreduce_bytes_per_step_distinct"] == [m["adapter_param_bytes"]]


@pytest.mark.slow
def test_a_fresh_node_builds_its_model_cache_whichever_rank_gets_there_first(moe_on_a_fresh_node):
    """Two workers of one Ray Train group, an empty cache, rank 1 takes the lock and converts."""
    cache = moe_on_a_fresh_node["cache"]
    saw = [json.loads((cache / f"rank{r}-saw.json").read_text()) for r in (0, 1)]
    for rank in saw:
        assert {"config.json", "model.safetensors", "loraflow_base.json", "tokenizer.json"} <= set(rank["files"]), rank
    assert saw[0] == saw[1] and saw[0]["params"] > 100_000_000  # the same complete folder, loaded on both ranks

"""fp16 training of a classifier on an fp16 base with a gradient scaler (GPUs without bf16), a mixture of experts under DDP, and a
node's model cache built by whichever training worker gets there first."""

from __future__ import annotations

import csv
import functools
import gzip
from pathlib import Path

import pytest
import torch
from ray.train import DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load_file
from train_support import TRAIN, cache_build_loop, gsm8k_config, prepared_gsm8k, stopping_loop

from workflows.config import config_from_dict
from workflows.train.stage import run_train

FP16 = {"precision": "fp16", "max_steps": 4, "checkpoint_every": 2, "log_every": 2, "eval_every": None,
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


def test_fp16_base_with_a_head_trains_with_a_scaler_that_is_checkpointed_and_resumes_exactly(
        prepared_fp16_cls, banking77_slice, tmp_path):
    config = banking77_fp16_config(banking77_slice)
    prepared = prepared_fp16_cls
    whole = run_train(config, prepared, tmp_path / "whole", storage_path=tmp_path / "rt", run_name="fp16-whole")
    assert whole.metrics["steps"] == 4 and whole.metrics["precision"] == "float16"
    assert whole.metrics["loss_scale"] > 0 and torch.isfinite(torch.tensor(whole.metrics["train_loss"]))
    assert whole.metrics["attn_implementation"] == "sdpa"  # what ran, recorded (CPU: never FlashAttention)
    from ray.train import TrainingFailedError

    with pytest.raises(TrainingFailedError, match="stop_after_step"):
        run_train(config, prepared, tmp_path / "resumed", storage_path=tmp_path / "rt", run_name="fp16-cut",
                  loop=functools.partial(stopping_loop, stop_after_step=2))
    checkpoint = torch.load(next((tmp_path / "rt" / "fp16-cut").glob("checkpoint_*/optimizer.pt")), weights_only=True)
    assert set(checkpoint["scaler"]) >= {"scale", "_growth_tracker"}
    resumed = run_train(config, prepared, tmp_path / "resumed", storage_path=tmp_path / "rt", run_name="fp16-cut")
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["loss_scale"] == whole.metrics["loss_scale"]
    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert "base_model.model.classifier.weight" in a
    assert {k: t.dtype for k, t in a.items() if t.dtype != torch.float32} == {}  # head and LoRA trained in fp32
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0)


def test_a_mixture_of_experts_trains_under_ddp_with_only_adapter_bytes_all_reduced(prepared, example_data, tmp_path):
    config = gsm8k_config(example_data, model="tiny-mixtral", max_steps=4, checkpoint_every=None, eval_every=None,
                          log_every=4)
    config.lora.target_modules = "all-linear"
    m = run_train(config, prepared, tmp_path / "moe", storage_path=tmp_path / "rt", run_name="moe").metrics
    assert m["find_unused_parameters"] is True  # auto: the model has experts
    assert m["steps"] == 4 and m["world_size"] == 2
    assert m["allreduce_bytes_per_step_distinct"] == [m["adapter_param_bytes"]]


@pytest.mark.slow
def test_a_fresh_node_builds_its_model_cache_whichever_rank_gets_there_first(ray_session, tmp_path):
    """Two workers of one Ray Train group, an empty cache, rank 1 takes the lock and converts."""
    trainer = TorchTrainer(cache_build_loop, train_loop_config={"cache": str(tmp_path / "cache")},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="cache", storage_path=str(tmp_path / "rt")),
                           dataset_config=DataConfig())
    result = trainer.fit()
    files = result.return_value["files"]
    assert {"config.json", "model.safetensors", "loraflow_base.json", "tokenizer.json"} <= set(files), files

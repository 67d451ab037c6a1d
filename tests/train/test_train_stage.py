"""The train stage on a real local Ray cluster: 2 DDP workers over gloo, tiny Llama, GSM8K shards.

One module-scoped training run, interrupted and resumed, feeds every test that only reads its outputs.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
from safetensors.torch import load_file
from train_support import adapter_digests, gsm8k_config, prepared_gsm8k, probe_loop, read_jsonl

import lora_core
from workflows.artifacts import is_complete
from workflows.models import load_base
from workflows.prepared import PreparedData
from workflows.train.checkpoint import tensors_digest
from workflows.train.stage import ClusterTooSmallError, PreparedDataError, run_train

pytestmark = pytest.mark.train_group

@pytest.fixture(scope="module")
def prepared(ray_session, example_data, session_tmp):
    return prepared_gsm8k(example_data, session_tmp)


# Reports (metrics and eval) every 2 steps, checkpoints every 4: the interrupted attempt stops after
# step 6, so the resumed one re-runs steps 5-6 and its adapter after step 6 can be compared with the
# interrupted attempt's.
RUN = {"log_every": 2, "eval_every": 2}


@pytest.fixture(scope="module")
def run(prepared, example_data, tmp_path_factory):
    """8 steps of 2 workers x 2 rows x 2 micro-batches, interrupted after step 6 and resumed under the
    same run name by a second `run_train` (the way a user re-runs a failed pipeline). Every test but
    the resume test reads the finished run as it would read any run."""
    from ray.train import TrainingFailedError

    work = tmp_path_factory.mktemp("train")
    config = gsm8k_config(example_data, **RUN)
    with pytest.raises(TrainingFailedError, match="stop_after_step"):
        run_train(config, prepared, work / "stage", storage_path=work / "ray_train", run_name="ref-a0",
                  loop=functools.partial(probe_loop, stop_after_step=6))
    committed_by_interrupted = (work / "stage").exists()
    result = run_train(config, prepared, work / "stage", storage_path=work / "ray_train", run_name="ref-a0",
                       loop=probe_loop)
    return {"config": config, "result": result, "work": work, "metrics": result.metrics,
            "run_dir": work / "ray_train" / "ref-a0", "committed_by_interrupted": committed_by_interrupted}


def test_allreduce_carries_exactly_the_adapter_bytes_and_under_5_percent_of_the_base(run):
    m = run["metrics"]
    assert m["allreduce_bytes_per_step_distinct"] == [m["adapter_param_bytes"]]  # every step, no more
    assert m["allreduce_bytes_per_step"] == m["adapter_param_bytes"]
    assert m["allreduce_bytes_per_step"] < 0.05 * m["base_param_bytes"]


def test_startup_broadcast_is_no_larger_than_the_adapter(run):
    m = run["metrics"]
    assert 0 < m["broadcast_bytes"] <= m["adapter_param_bytes"]


def test_adapter_is_identical_on_both_ranks_and_is_what_was_saved(run):
    per_rank = run["metrics"]["adapter_sha256_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    # The saved file under PEFT names must hold the same tensors: compare through lora_core's loader.
    model, _ = load_base("tiny-llama")
    lora_core.load_adapter(model, run["result"].adapter_dir)
    assert tensors_digest(lora_core.adapter_parameters(model)) == per_rank[0]


def test_base_weights_are_bitwise_unchanged_by_training(run):
    digests = [json.loads((run["run_dir"] / f"base-digest-rank{r}.json").read_text())
               for r in range(2)]
    assert digests[0] == digests[1] and digests[0]["before"] == digests[0]["after"]
    # ... and equal to a fresh base built in this process: training never touched a base weight.
    model, _ = load_base("tiny-llama")
    lora_core.apply_lora(model, lora_core.LoraConfig(**run["config"].section("lora")))
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert tensors_digest(frozen) == digests[0]["after"]


def test_training_moves_lora_b_away_from_zero(run):
    tensors = load_file(str(run["result"].adapter_dir / "adapter_model.safetensors"))
    lora_b = [t for k, t in tensors.items() if k.endswith("lora_B.weight")]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)


def test_stage_directory_holds_adapter_lineage_metrics_and_result(run, prepared):
    stage = run["result"].out_dir
    assert is_complete(stage)
    assert {"adapter_config.json", "adapter_model.safetensors", "loraflow.json"} <= {
        p.name for p in (stage / "adapter").iterdir()}
    lineage = json.loads((stage / "adapter" / "loraflow.json").read_text())
    assert lineage["base_model"]["name"] == "tiny-llama"
    assert lineage["prepared"]["rows_digest"] == prepared.manifest["rows_digest"]
    assert lineage["config"]["lora"]["r"] == 4
    assert lineage["metrics"]["steps"] == 8
    result = json.loads((stage / "result.json").read_text())
    assert result["run_name"] == "ref-a0" and result["metrics"]["steps"] == 8
    for key in ("train_loss", "eval_loss", "allreduce_bytes_per_step", "adapter_param_bytes",
                "base_param_bytes", "broadcast_bytes", "steps", "tokens_per_s"):
        assert key in result["metrics"], key


def test_metrics_are_logged_every_log_every_steps(run):
    records = read_jsonl(run["result"].out_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # one per step, though step 6 ran twice
    assert all(r["allreduce_bytes_per_step"] == run["metrics"]["adapter_param_bytes"] for r in records)
    assert all(math.isfinite(r["eval_loss"]) and r["lr"] >= 0 and r["tokens_per_s"] > 0 for r in records)


def test_resumed_run_continues_from_its_checkpoint_and_repeats_the_interrupted_steps_exactly(run):
    """Stopped after step 6 (last checkpoint: step 4), started again under the same run name: Ray
    Train hands the workers the step-4 checkpoint, they skip the 4 x 2 micro-batches already consumed,
    re-run steps 5 and 6 and finish.

    Bitwise equality of the adapter after step 6 in both attempts is expected: same data order,
    per-step reseeded dropout, restored fp32 AdamW and scheduler state, deterministic gloo sums of two
    ranks. A skipped or repeated batch, or a lost optimizer moment, changes it.
    """
    assert not run["committed_by_interrupted"]  # nothing committed by the interrupted attempt
    m = run["metrics"]
    assert m["resumed_from_step"] == 4 and m["steps"] == 8 and m["steps_this_run"] == 4
    for rank in (0, 1):
        records = adapter_digests(run["run_dir"], rank)
        first = {r["step"]: r["digest"] for r in records if r["resumed_from"] is None}
        again = {r["step"]: r["digest"] for r in records if r["resumed_from"] is not None}
        assert sorted(first) == [2, 4, 6] and sorted(again) == [6, 8], records
        assert again[6] == first[6]
    # ... and the step-6 line each attempt logged (train loss over the step's batches, gradient norm).
    step6 = [(r["train_loss"], r["grad_norm"]) for r in read_jsonl(run["run_dir"] / "metrics.jsonl") if r["step"] == 6]
    assert len(step6) == 2 and step6[0] == step6[1], step6


def test_more_workers_than_the_cluster_can_place_fails_fast_naming_the_setting(prepared, example_data, tmp_path):
    config = gsm8k_config(example_data, num_workers=8)
    with pytest.raises(ClusterTooSmallError, match=r"8 workers x 1 CPU = 8 CPUs but the cluster has 4.*num_workers"):
        run_train(config, prepared, tmp_path / "stage", storage_path=tmp_path / "ray_train", run_name="big-a0")
    assert not (tmp_path / "stage").exists() and not (tmp_path / "ray_train").exists()


def test_data_tokenized_for_another_model_is_refused_naming_the_manifest_field(prepared, example_data, tmp_path):
    config = gsm8k_config(example_data, model="tiny-bert")  # MiniLM's tokenizer, not SmolLM2's
    with pytest.raises(PreparedDataError, match=r"manifest field 'tokenizer.fingerprint'"):
        run_train(config, prepared, tmp_path / "stage", storage_path=tmp_path / "ray_train", run_name="x-a0")


def test_data_prepared_for_another_task_is_refused_naming_the_manifest_field(prepared, example_data, tmp_path):
    config = gsm8k_config(example_data, model="tiny-bert")
    config.model.task = "seq_cls"
    with pytest.raises(PreparedDataError, match=r"manifest field 'task' is 'causal_lm'"):
        run_train(config, prepared, tmp_path / "stage", storage_path=tmp_path / "ray_train", run_name="x-a0")


def test_a_missing_prepared_dataset_is_refused(ray_session, example_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="no _SUCCESS marker"):
        run_train(gsm8k_config(example_data), PreparedData.load(tmp_path / "never-prepared"), tmp_path / "stage",
                  storage_path=tmp_path / "ray_train", run_name="x-a0")

"""The work directory on an object store: a real S3 API (moto's server) behind pyarrow.

Unit tests pin the commit protocol against the bucket: files without `_SUCCESS` are not a stage,
`_SUCCESS` is the last object a publish writes, a committed stage is never overwritten, and an
unusable store fails naming the URI. One end-to-end CLI run (its own local Ray, which inherits the
AWS_* settings) puts every stage output and Ray Train's checkpoints in the bucket; a second run is
all cache hits without starting Ray.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from workflows.artifacts import SUCCESS, stage_output
from workflows.config import ConfigError, config_from_dict
from workflows.dag import Layout, plan
from workflows.lease import S3Lease
from workflows.storage import StorageError, WorkStore

sys.path.insert(0, str(Path(__file__).parent))
from s3_support import BUCKET, free_port  # noqa: E402
from test_pipeline_e2e import pipeline_config, statuses, write_rows  # noqa: E402


def s3_config(tmp_path: Path, work_uri: str, **cluster):
    return config_from_dict({"data": {"source": "rows.jsonl", "format": "instruction"},
                             "cluster": {"work_dir": work_uri, "runs_dir": str(tmp_path / "runs"), **cluster}})


def same_digest(config) -> str:
    return "d1"


def stage_locally(st, files: dict[str, str]) -> None:
    """What a stage body does: commit its output into the local staging directory."""
    with stage_output(st.dir) as tmp:
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)


# --- the commit protocol --------------------------------------------------------------------------


def test_a_prefix_with_files_but_no_success_marker_is_a_miss(s3, tmp_path):
    p = plan(s3_config(tmp_path, s3.uri("half")), input_digest=same_digest)
    st = p["prepare"]
    assert st.uri == s3.uri(f"half/prepare/{st.fingerprint}")
    s3.put(f"half/prepare/{st.fingerprint}/manifest.json", b"{}")  # an upload that died before the marker
    again = plan(s3_config(tmp_path, s3.uri("half")), input_digest=same_digest)
    assert again["prepare"].status == "miss"


def test_publish_commits_with_the_success_marker_as_the_last_object_written(s3, tmp_path):
    p = plan(s3_config(tmp_path, s3.uri("order")), input_digest=same_digest)
    st = p["prepare"]
    stage_locally(st, {f"train/part-{i:05d}.parquet": "x" * 100 for i in range(6)} | {"manifest.json": "{}"})
    s3.record("reset-recording")
    s3.record("start-recording")
    try:
        p.layout.store.publish("prepare", st.fingerprint)
    finally:
        s3.record("stop-recording")
    written = [k for k in s3.recorded_keys() if k.startswith(f"order/prepare/{st.fingerprint}/")]
    assert len(set(written)) == 8  # 6 shards, the manifest, the marker
    # Each object is a multipart upload (several requests): the marker's first comes after all others.
    marker = [i for i, k in enumerate(written) if k.endswith(f"/{SUCCESS}")]
    assert min(marker) > max(i for i, k in enumerate(written) if not k.endswith(f"/{SUCCESS}"))
    assert plan(s3_config(tmp_path, s3.uri("order")), input_digest=same_digest)["prepare"].status == "hit"


def test_publish_clears_what_an_unfinished_attempt_left(s3, tmp_path):
    p = plan(s3_config(tmp_path, s3.uri("retry")), input_digest=same_digest)
    st = p["train"]
    s3.put(f"retry/train/{st.fingerprint}/adapter/stale.bin", b"from a crashed attempt")
    stage_locally(st, {"adapter/adapter_config.json": "{}", "result.json": "{}"})
    p.layout.store.publish("train", st.fingerprint)
    assert s3.keys(f"retry/train/{st.fingerprint}") == [
        f"retry/train/{st.fingerprint}/{rel}" for rel in (SUCCESS, "adapter/adapter_config.json", "result.json")]


def test_a_committed_stage_is_never_overwritten(s3, tmp_path):
    p = plan(s3_config(tmp_path, s3.uri("immutable")), input_digest=same_digest)
    st = p["evaluate"]
    stage_locally(st, {"metrics.json": '{"loss": 1}'})
    p.layout.store.publish("evaluate", st.fingerprint)
    p.layout.store.clear_staging("evaluate", st.fingerprint)
    stage_locally(st, {"metrics.json": '{"loss": 2}'})
    with pytest.raises(FileExistsError, match=rf"{st.uri} is already complete"):
        p.layout.store.publish("evaluate", st.fingerprint)
    assert s3.fs.open_input_stream(f"{BUCKET}/immutable/evaluate/{st.fingerprint}/metrics.json").read() == b'{"loss": 1}'


def test_fetch_downloads_a_committed_stage_and_reuses_it_while_its_marker_matches(s3, tmp_path):
    p = plan(s3_config(tmp_path, s3.uri("fetch")), input_digest=same_digest)
    st, store = p["train"], p.layout.store
    stage_locally(st, {"adapter/adapter_model.safetensors": "weights", "result.json": "{}"})
    store.publish("train", st.fingerprint)
    store.clear_staging("train", st.fingerprint)  # another machine: nothing cached
    local = store.fetch("train", st.fingerprint)
    assert (local / "adapter" / "adapter_model.safetensors").read_text() == "weights"
    (local / "result.json").write_text("edited locally")
    assert (store.fetch("train", st.fingerprint) / "result.json").read_text() == "edited locally"  # cached
    s3.put(f"fetch/train/{st.fingerprint}/{SUCCESS}", b'{"published": "elsewhere"}')
    assert (store.fetch("train", st.fingerprint) / "result.json").read_text() == "{}"  # downloaded again


def test_a_missing_bucket_fails_before_any_stage_naming_the_uri(s3, tmp_path):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/work: bucket 'no-such-bucket' does not exist"):
        plan(s3_config(tmp_path, "s3://no-such-bucket/work"), input_digest=same_digest)


def test_an_unreachable_endpoint_fails_naming_the_uri(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match=rf"s3://{BUCKET}/work: cannot reach the store"):
        WorkStore.open(f"s3://{BUCKET}/work").check()


def test_planning_on_s3_input_reads_no_data_object_and_still_sees_a_content_change(s3, tmp_path):
    """`loraflow dag` fingerprints S3 input from the store's own size and ETag (a HEAD each), never by
    downloading the data; a new upload of the object changes the fingerprint."""
    s3.put("input/rows.jsonl", b'{"instruction": "2+2?", "output": "4"}\n' * 1000)
    config = config_from_dict({"data": {"source": s3.uri("input/rows.jsonl"), "format": "instruction"},
                               "cluster": {"work_dir": str(tmp_path / "work"), "runs_dir": str(tmp_path / "runs")}})
    s3.record("reset-recording")
    s3.record("start-recording")
    try:
        first = plan(config)["prepare"]
    finally:
        s3.record("stop-recording")
    on_data = [method for method, key in s3.recorded_requests() if key == "input/rows.jsonl"]
    assert on_data and "GET" not in on_data, on_data
    s3.put("input/rows.jsonl", b'{"instruction": "2+2?", "output": "5"}\n' * 1000)  # same size, new content
    again = plan(config)["prepare"]
    assert again.fingerprint != first.fingerprint


def test_runs_dir_stays_local(tmp_path):
    config = s3_config(tmp_path, "s3://bucket/work", runs_dir="s3://bucket/runs")
    with pytest.raises(ConfigError, match="cluster.runs_dir 's3://bucket/runs'"):
        Layout.of(config)


# --- one pipeline run through the CLI -------------------------------------------------------------


def loraflow(*args: str, cwd: Path, timeout: int = 300) -> dict:
    """A `loraflow` subprocess that starts its own local Ray (inheriting the AWS_* settings)."""
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *args, "--json"],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory, s3):
    root = tmp_path_factory.mktemp("s3e2e")
    write_rows(root / "rows.jsonl", 120, seed=1)
    cfg = pipeline_config(root, max_steps=4)
    # No dashboard and no generation: seconds saved on a small machine, nothing this module checks.
    work = ["--set", f"cluster.work_dir={s3.uri('work')}", "--set", "cluster.dashboard=false",
            "--set", "eval.generation.num_prompts=0"]
    s3.record("reset-recording")
    s3.record("start-recording")
    try:
        first = loraflow("run", str(cfg), *work, cwd=root)
    finally:
        s3.record("stop-recording")
    run_name = first["stages"]["train"]["outputs"]["run_name"]
    metrics_writes = [(method, query) for method, key, query in s3.recorded_writes()
                      if key == f"work/ray_train/{run_name}/metrics.jsonl"]
    return root, cfg, work, first, metrics_writes


@pytest.mark.train_group
def test_every_stage_output_is_committed_in_the_bucket(bucket_run, s3):
    _, _, _, manifest, _ = bucket_run
    assert statuses(manifest) == ["ran"] * 4
    for stage, must_hold in (("prepare", "manifest.json"), ("train", "adapter/adapter_config.json"),
                             ("evaluate", "metrics.json"), ("register", "register.json")):
        out = manifest["stages"][stage]["outputs"]["dir"]
        fp = manifest["stages"][stage]["fingerprint"]
        assert out == s3.uri(f"work/{stage}/{fp}")  # the run manifest records the store URIs
        keys = s3.keys(f"work/{stage}/{fp}")
        assert f"work/{stage}/{fp}/{SUCCESS}" in keys and f"work/{stage}/{fp}/{must_hold}" in keys


@pytest.mark.train_group
def test_ray_train_checkpoints_live_under_the_work_dir_in_the_bucket(bucket_run, s3):
    _, _, _, manifest, _ = bucket_run
    run_name = manifest["stages"]["train"]["outputs"]["run_name"]
    keys = s3.keys(f"work/ray_train/{run_name}")
    assert any("/checkpoint_" in k for k in keys)
    assert f"work/ray_train/{run_name}/checkpoint_manager_snapshot.json" in keys
    assert f"work/ray_train/{run_name}/final/adapter/adapter_model.safetensors" in keys


@pytest.mark.train_group
def test_rank_0_publishes_the_metrics_log_at_every_checkpoint_not_only_at_the_end(bucket_run):
    *_, metrics_writes = bucket_run  # 4 steps, checkpointed every 2
    uploads = [q for method, q in metrics_writes if (method, q) == ("POST", "uploads")  # multipart
               or method == "PUT" and "partNumber=" not in q]                           # single PUT
    assert len(uploads) == 3  # after the checkpoints at steps 2 and 4, and when rank 0 stopped


@pytest.mark.train_group
def test_the_run_registered_a_version_in_the_local_registry(bucket_run):
    root, _, _, manifest, _ = bucket_run
    reg = manifest["stages"]["register"]["outputs"]
    assert reg["version"] == 1 and reg["decision"]["promote"] is True
    assert (root / "registry" / "adapters" / "e2e" / "1" / "adapter_config.json").is_file()
    assert (root / "runs" / manifest["run_id"] / "loss.png").is_file()  # report read metrics from the bucket


@pytest.mark.train_group
def test_second_run_is_all_cache_hits_without_starting_ray(bucket_run):
    root, cfg, work, _, _ = bucket_run
    manifest = loraflow("run", str(cfg), *work, cwd=root)
    assert statuses(manifest) == ["hit"] * 4
    assert manifest["ray_started"] is False


@pytest.mark.train_group
def test_dag_reports_the_bucket_cache_status(bucket_run):
    root, cfg, work, _, _ = bucket_run
    rows = {r["stage"]: r for r in loraflow("dag", str(cfg), *work, "--set", "train.lr=1e-3", cwd=root)}
    assert rows["prepare"]["status"] == "hit" and rows["train"]["status"] == "miss"


def test_a_failed_forced_rerun_puts_the_complete_output_back(tmp_path):
    store = WorkStore.open(str(tmp_path / "work"))
    with stage_output(store.local_of("evaluate", "fp")) as d:
        (d / "metrics.json").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with store.replacing("evaluate", "fp"):
            assert not store.is_complete("evaluate", "fp")  # set aside while the stage runs
            raise RuntimeError("boom")
    assert (store.local_of("evaluate", "fp") / "metrics.json").read_text() == "old"
    assert [p.name for p in (tmp_path / "work" / "evaluate").iterdir()] == ["fp"]


def test_a_forced_rerun_on_the_store_uncommits_the_stage_first(s3):
    ws = WorkStore.open(s3.uri("forced"))
    with stage_output(ws.local_of("train", "fp")) as d:
        (d / "adapter.bin").write_text("old")
    ws.publish("train", "fp")
    with ws.replacing("train", "fp"):
        assert not ws.is_complete("train", "fp")
        ws.clear_staging("train", "fp")
        with stage_output(ws.local_of("train", "fp")) as d:
            (d / "adapter.bin").write_text("new")
        ws.publish("train", "fp")
    assert (ws.fetch("train", "fp") / "adapter.bin").read_text() == "new"


def test_the_best_tune_trial_is_committed_as_the_train_stage_in_the_bucket(s3, tmp_path):
    """What `loraflow tune` does after its sweep, without one: the best trial's Ray Train run, kept
    under the work directory in the bucket, is published there as the best config's train output."""
    from workflows.tune import commit_best_trial, sweep_storage, trial_run_dir

    p = plan(s3_config(tmp_path, s3.uri("tuned")), input_digest=same_digest)
    run_dir = trial_run_dir(sweep_storage(p.layout), "abc")
    assert run_dir == s3.uri("tuned/tune/trials/trial-abc")
    for rel, data in (("final/adapter/adapter_config.json", b"{}"), ("final/metrics.json", b'{"loss": 1.5}'),
                      ("metrics.jsonl", b'{"step": 4, "loss": 1.5}\n')):
        s3.put(f"tuned/tune/trials/trial-abc/{rel}", data)
    commit_best_trial(p, run_dir)
    assert plan(s3_config(tmp_path, s3.uri("tuned")), input_digest=same_digest)["train"].status == "hit"
    result = s3.fs.open_input_stream(f"{BUCKET}/tuned/train/{p['train'].fingerprint}/result.json").read()
    assert json.loads(result)["run_name"] == "trial-abc"



# -- one driver at a time on a prefix, from any machine: the lease ---------------------------------

def test_a_second_driver_on_a_leased_prefix_exits_4_naming_the_holder(s3, tmp_path):
    store = WorkStore.open(s3.uri("leased"))
    held = S3Lease(store, "run-of-driver-1")
    held.acquire()
    try:
        write_rows(tmp_path / "rows.jsonl", 8, seed=0)
        cfg = tmp_path / "pipeline.yaml"
        cfg.write_text(json.dumps({"data": {"source": "rows.jsonl", "format": "instruction"},
                                   "cluster": {"work_dir": s3.uri("leased"), "runs_dir": str(tmp_path / "runs")}}))
        proc = subprocess.run([sys.executable, "-m", "workflows.cli", "run", str(cfg)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    finally:
        held.release()
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "run-of-driver-1" in proc.stderr and socket.gethostname() in proc.stderr and "started" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not s3.keys("leased/prepare")  # nothing ran
    assert s3.keys("leased") == []  # and the holder's lease is gone once released

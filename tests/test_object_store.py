"""The work directory on an object store: a real S3 API (moto's server) behind pyarrow.

Unit tests pin the commit protocol against the bucket: files without `_SUCCESS` are not a stage,
`_SUCCESS` is the last object a publish writes, a committed stage is never overwritten, and an
unusable store fails naming the URI. The end-to-end run whose every stage output and Ray Train
checkpoint lands in the bucket is tests/test_isolated_nodes.py (nodes that share no disk).
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
from test_pipeline_e2e import write_rows  # noqa: E402


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

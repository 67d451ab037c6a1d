"""Run tracking (workflows/tracking.py): TensorBoard event files read back record by record, and a
real local MLflow (SQLite backend, artifacts under tmp_path) checked through MlflowClient."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from workflows.config import config_from_dict
from workflows.registry.sqlite import Registry
from workflows.report import write_report
from workflows.tracking import ENV_URI, TrackingError, config_params, log_run, mirror_registration

RUN_ID = "20260101-120000-abc123"
OLD_RUN_ID = "20251231-090000-def456"
EVAL = {"models": {"base": {"loss": 2.5, "exact_match": 0.0, "rows": 8},
                   "new": {"loss": 0.75, "exact_match": 0.5, "rows": 8}},
        "diff": {"loss": {"new_minus_base": -1.75, "ci95_vs_base": [-2.0, -1.5]}}, "rows": 8}
STEPS = [{"step": 3, "epoch": 0, "train_loss": 1.5, "lr": 0.001, "tokens_per_s": 400.0, "bytes": [1, 2]},
         {"step": 6, "epoch": 0, "train_loss": 0.8, "lr": 0.0005, "tokens_per_s": 410.0, "eval_loss": 0.9}]


def write_adapter(path: Path, seed: int) -> Path:
    """A LoRA adapter folder in PEFT's format (two q_proj layers, rank 2)."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight":
               rng.standard_normal(shape, dtype=np.float32)
               for i in range(2) for ab, shape in (("A", (2, 16)), ("B", (16, 2)))}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 2, "lora_dropout": 0.0,
         "target_modules": ["q_proj"], "bias": "none", "base_model_name_or_path": "tiny-llama"}))
    return path


@pytest.fixture(scope="module")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its schema, made once: each test copies it (the migrations that
    create the schema take seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "empty.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def mlflow_uri(empty_mlflow_db: Path, tmp_path: Path, name: str = "mlflow.db") -> str:
    shutil.copyfile(empty_mlflow_db, tmp_path / name)
    return f"sqlite:///{tmp_path / name}"


def make_config(tmp_path: Path, mlflow: dict | None = None, **tracking):
    if mlflow is not None:
        tracking["mlflow"] = mlflow
    return config_from_dict({"data": {"source": "data.jsonl", "format": "instruction"},
                             "train": {"lr": 1e-3, "num_workers": 1},
                             "registry": {"root": str(tmp_path / "registry"), "name": "demo"},
                             "tracking": tracking})


@pytest.fixture
def run(tmp_path: Path, monkeypatch):
    """A finished run as `run_pipeline` leaves it: stage outputs, manifest, report (the real
    `write_report`), and the registry with its adapter as `demo:1@champion`."""
    monkeypatch.delenv(ENV_URI, raising=False)
    monkeypatch.chdir(tmp_path)  # anything MLflow puts in the working directory stays in tmp_path
    adapter = write_adapter(tmp_path / "work" / "train" / "adapter", seed=1)
    metrics_path = tmp_path / "work" / "train" / "metrics.jsonl"
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in STEPS) + '{"step": 9, "cut')

    def stage(outputs):
        return {"fingerprint": "f" * 16, "status": "ran", "why": "new", "seconds": 1.0, "outputs": outputs}

    manifest = {"run_id": RUN_ID, "loraflow_version": "0.1.0", "config_file": None, "started": 1.7e9,
                "finished": 1.7e9 + 60, "ray_started": False, "stages": {
                    "prepare": stage({"dir": "p", "counts": {"train_rows": 12, "eval_rows": 8}}),
                    "train": stage({"dir": "t", "adapter": str(adapter), "metrics_path": str(metrics_path),
                                    "metrics": {"steps": 6, "train_loss": 0.8, "eval_loss": 0.9}}),
                    "evaluate": stage({"dir": "e", "metrics": EVAL}),
                    "register": stage({"dir": "r", "name": "demo", "version": 1, "decision": {
                        "promote": True, "reason": "no champion yet", "numbers": {}, "alias": "champion"}})}}
    run_dir = tmp_path / "runs" / RUN_ID
    run_dir.mkdir(parents=True)
    manifest["report"] = str(write_report(run_dir, manifest))
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    reg = Registry(tmp_path / "registry", check_servable=lambda path: (True, []))  # not judged here: no torch
    assert reg.register(adapter, "demo", metrics=EVAL["models"]["new"], lineage={"run_id": RUN_ID}) == 1
    reg.promote("demo", 1, "champion", reason="test")
    return manifest, run_dir, reg


def read_events(tb_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """Scalars {tag: {step: value}} and texts {tag: markdown} of the tfevents files in `tb_dir`
    (TFRecord framing: u64 length, u32 masked crc of it, the Event proto, u32 masked crc of it)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, dict[int, float]] = {}
    texts: dict[str, str] = {}
    files = sorted(tb_dir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {tb_dir}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + n]
            assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(body)
            pos += 16 + n
            event = Event.FromString(body)
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "text":
                    texts[v.tag] = v.tensor.string_val[0].decode()
                elif v.HasField("simple_value"):
                    scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars, texts


def test_tensorboard_has_every_step_the_eval_metrics_and_the_report(tmp_path, run):
    manifest, run_dir, _ = run
    out = log_run(make_config(tmp_path), manifest, run_dir, log=lambda m: None)
    assert out == {"tensorboard": str(run_dir / "tensorboard")}  # MLflow is off: no section, no env
    scalars, texts = read_events(run_dir / "tensorboard")
    assert scalars["train/train_loss"] == {3: 1.5, 6: pytest.approx(0.8)}
    assert scalars["train/lr"] == {3: pytest.approx(0.001), 6: pytest.approx(0.0005)}
    assert scalars["train/eval_loss"] == {6: pytest.approx(0.9)}
    assert "train/bytes" not in scalars and "train/step" not in scalars  # lists and the step itself
    assert scalars["eval/new/loss"] == {6: 0.75} and scalars["eval/base/exact_match"] == {6: 0.0}
    assert scalars["eval/diff/loss/new_minus_base"] == {6: -1.75}
    table = texts["report/evaluation_same_rows_for_every_model/text_summary"]
    assert "| model | loss | exact_match | rows |" in table and "| new | 0.75 | 0.5 | 8 |" in table
    assert "registered `demo:1`" in texts["report/registry_and_promotion_gate/text_summary"]


def test_tensorboard_problems_only_warn(tmp_path, run):
    manifest, run_dir, _ = run
    (run_dir / "tensorboard").write_text("a file where the folder goes")
    said = []
    out = log_run(make_config(tmp_path), manifest, run_dir, log=said.append)
    assert set(out) == {"tensorboard_error"} and "TensorBoard" in said[0]


def test_an_mlflow_failure_raises_naming_the_uri_after_tensorboard_is_written(tmp_path, run):
    manifest, run_dir, _ = run
    config = make_config(tmp_path, mlflow={"tracking_uri": "nosuchscheme://host"})
    with pytest.raises(TrackingError, match="MLflow at nosuchscheme://host"):
        log_run(config, manifest, run_dir, log=lambda m: None)
    assert read_events(run_dir / "tensorboard")[0]["train/train_loss"]


def test_config_params_are_dotted_strings_without_nones():
    cfg = config_from_dict({"data": {"source": ["a.jsonl", "b.jsonl"], "format": "instruction",
                                     "system_prompt": "x" * 7000}, "train": {"lr": 1e-3}})
    params = config_params(cfg)
    assert params["train.lr"] == "0.001" and params["data.source"] == '["a.jsonl", "b.jsonl"]'
    assert params["registry.gate.metric"] == "loss" and params["train.use_gpu"] == "false"
    assert len(params["data.system_prompt"]) == 6000  # MLflow's limit on a param value
    assert "train.max_steps" not in params and "tune" not in params  # None: not logged


def aliases(client, model: str = "demo") -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(model).aliases.items()}  # int or str by version


def mlflow_versions(client, model: str) -> dict[str, dict[str, str]]:
    return {str(v.version): v.tags for v in client.search_model_versions(f"name='{model}'")}


def test_mlflow_records_the_run_and_mirrors_the_registry(tmp_path, run, empty_mlflow_db):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    manifest, run_dir, reg = run
    uri = mlflow_uri(empty_mlflow_db, tmp_path)
    client = MlflowClient(uri)
    client.create_experiment("lf", artifact_location=str(tmp_path / "artifacts"))
    config = make_config(tmp_path, mlflow={"tracking_uri": uri, "experiment": "lf"})
    out = log_run(config, manifest, run_dir, log=lambda m: None)
    run_id = out["mlflow"]["run_id"]
    assert out["tensorboard"] and out["mlflow"]["registered_model"] == {
        "name": "demo", "version": "1", "aliases": {"champion": "1"}}

    r = client.get_run(run_id)
    assert (r.info.run_name, r.info.status, r.data.tags["loraflow.run_id"]) == (RUN_ID, "FINISHED", RUN_ID)
    assert r.data.params["train.lr"] == "0.001" and r.data.params["registry.name"] == "demo"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/train_loss")] == [(3, 1.5), (6, 0.8)]
    assert r.data.metrics["eval/new/loss"] == 0.75 and r.data.metrics["eval/diff/loss/new_minus_base"] == -1.75
    assert {"metrics.json", "report.md", "loss.png", "manifest.json", "adapter"} <= \
        {f.path for f in client.list_artifacts(run_id)}
    assert {f.path for f in client.list_artifacts(run_id, "adapter")} == \
        {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert (tmp_path / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()

    # The registry as MLflow shows it: version 1 with the loraflow tags, from this run, @champion.
    v1 = client.get_model_version("demo", "1")
    assert v1.run_id == run_id and v1.tags["loraflow.ref"] == "demo:1"
    assert v1.tags["loraflow.content_sha256"] == reg.get("demo:1").content_sha256
    assert aliases(client) == {"champion": "1"}
    got = Path(download_artifacts("models:/demo@champion", dst_path=str(tmp_path / "dl"), tracking_uri=uri,
                                  registry_uri=uri))
    assert (got / "adapter_model.safetensors").read_bytes() == \
        (reg.resolve("demo:1") / "adapter_model.safetensors").read_bytes()

    # A second version registered and promoted by another run: mirrored, and the alias moves.
    second = write_adapter(tmp_path / "adapter2", seed=2)
    assert reg.register(second, "demo", lineage={"run_id": OLD_RUN_ID}) == 2
    reg.promote("demo", 2, "champion", reason="better")
    assert mirror_registration(config, reg, "demo", 2) == {"name": "demo", "version": "2",
                                                           "aliases": {"champion": "2"}}
    assert aliases(client) == {"champion": "2"}
    v2 = client.get_model_version("demo", "2")
    assert client.get_run(v2.run_id).data.tags["loraflow.run_id"] == OLD_RUN_ID  # that run's own MLflow run

    reg.rollback("demo", "champion")
    assert mirror_registration(config, reg, "demo")["aliases"] == {"champion": "1"}
    assert aliases(client) == {"champion": "1"}

    # Retried calls find what they made: no duplicate version, no second MLflow run.
    mirror_registration(config, reg, "demo", 2)
    mirror_registration(config, reg, "demo", 1)
    assert log_run(config, manifest, run_dir, log=lambda m: None)["mlflow"]["run_id"] == run_id
    assert sorted(mlflow_versions(client, "demo")) == ["1", "2"]
    assert len(client.search_runs([client.get_experiment_by_name("lf").experiment_id])) == 2


def test_mlflow_tracking_uri_alone_turns_it_on_and_a_failed_run_is_recorded(tmp_path, run, monkeypatch,
                                                                             empty_mlflow_db):
    from mlflow import MlflowClient

    manifest, run_dir, reg = run
    config = make_config(tmp_path, tensorboard=False)  # no tracking.mlflow section
    assert mirror_registration(config, reg, "demo") is None  # off
    uri = mlflow_uri(empty_mlflow_db, tmp_path)
    monkeypatch.setenv(ENV_URI, uri)
    failed = {**manifest, "error": "RuntimeError: train failed", "report": None,
              "stages": {"prepare": manifest["stages"]["prepare"]}}
    out = log_run(config, failed, run_dir, log=lambda m: None)
    assert set(out) == {"mlflow"} and out["mlflow"]["tracking_uri"] == uri  # tensorboard: false
    client = MlflowClient(uri)
    r = client.get_run(out["mlflow"]["run_id"])
    assert client.get_experiment(r.info.experiment_id).name == "loraflow"
    assert r.info.status == "FAILED" and r.data.tags["loraflow.error"] == "RuntimeError: train failed"
    assert r.data.tags["loraflow.stage.prepare"] == "ran" and "loraflow.stage.train" not in r.data.tags
    assert r.data.params["train.lr"] == "0.001" and not r.data.metrics
    assert client.search_registered_models() == []  # no register stage: nothing mirrored
    # The registry mirrored from the environment's URI as well.
    assert mirror_registration(config, reg, "demo", 1)["aliases"] == {"champion": "1"}
    assert aliases(client) == {"champion": "1"}


def test_in_pipeline_order_register_then_log_run_share_one_mlflow_run(tmp_path, run, empty_mlflow_db):
    """The register stage mirrors first (creating the run's MLflow run for the adapter), then
    `log_run` at the end of the run finds that run and completes it."""
    from mlflow import MlflowClient

    manifest, run_dir, reg = run
    uri = mlflow_uri(empty_mlflow_db, tmp_path)
    config = make_config(tmp_path, mlflow={"tracking_uri": uri, "registered_model": "demo-mirror"})
    assert mirror_registration(config, reg, "demo", 1) == {"name": "demo-mirror", "version": "1",
                                                           "aliases": {"champion": "1"}}
    out = log_run(config, manifest, run_dir, log=lambda m: None)["mlflow"]
    client = MlflowClient(uri)
    assert client.get_model_version("demo-mirror", "1").run_id == out["run_id"]
    assert len(client.search_runs([out["experiment_id"]])) == 1
    assert client.get_run(out["run_id"]).data.params["train.lr"] == "0.001"
    assert sorted(mlflow_versions(client, "demo-mirror")) == ["1"]


def test_an_adapter_upload_cut_short_is_completed_not_taken_as_done(tmp_path, empty_mlflow_db, monkeypatch):
    from workflows.tracking import _Mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    adapter = write_adapter(tmp_path / "adapter", seed=3)
    ml = _Mlflow(make_config(tmp_path, mlflow={"tracking_uri": mlflow_uri(empty_mlflow_db, tmp_path)}))
    run_id = ml.run_for("20261206-120000-abcdef")
    ml.client.log_artifact(run_id, str(adapter / "adapter_config.json"), "adapter")  # the upload died here
    uri = ml.log_adapter(run_id, adapter)
    uploaded = {Path(f.path).name: f.file_size for f in ml.client.list_artifacts(run_id, "adapter")}
    assert uploaded == {f.name: f.stat().st_size for f in adapter.iterdir()}
    assert uri.endswith("/adapter")

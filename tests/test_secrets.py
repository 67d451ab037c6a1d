"""Credentials in URIs never reach a record, and keys listed from a store never leave their folder."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from workflows import storage
from workflows.adapters import AdapterFiles
from workflows.artifacts import UnsafePathError, redact
from workflows.config import config_from_dict

SECRET_URI = "https://alice:tok3n@mlflow.example.com/api"


def secret_config():
    return config_from_dict({"data": {"source": "rows.jsonl", "format": "text"},
                             "tracking": {"mlflow": {"tracking_uri": SECRET_URI}}})


@pytest.mark.parametrize("text, shown", [
    (SECRET_URI, "https://***@mlflow.example.com/api"),
    ("see http://tok3n@host:5000 and s3://bucket/a@b", "see http://***@host:5000 and s3://bucket/a@b"),
    ("hf:org/data@rev", "hf:org/data@rev"),
])
def test_credentials_in_uris_are_hidden(text, shown):
    assert redact(text) == shown
    assert redact({"a": [text]}) == {"a": [shown]}


def test_mlflow_params_hold_no_credentials():
    from workflows.tracking import config_params

    params = config_params(secret_config())
    assert "tok3n" not in json.dumps(params)
    assert params["tracking.mlflow.tracking_uri"] == "https://***@mlflow.example.com/api"


def test_an_mlflow_error_names_the_uri_without_its_credentials():
    from workflows.tracking import TrackingError, _Mlflow

    config = config_from_dict({"data": {"source": "rows.jsonl", "format": "text"},
                               "tracking": {"mlflow": {"tracking_uri": "nosuchscheme://alice:tok3n@host"}}})
    with pytest.raises(TrackingError) as failed:
        _Mlflow(config)
    assert "nosuchscheme://***@host" in str(failed.value) and "tok3n" not in str(failed.value)


def test_registry_lineage_holds_no_credentials():
    from workflows.dag import register_lineage

    run = SimpleNamespace(inputs={"prepare": {"input_digest": "d", "rows_digest": "r"}}, run_id="run",
                          plan=SimpleNamespace(adapters={}, stages=[]), config=secret_config())
    lineage = register_lineage(run)
    assert "tok3n" not in json.dumps(lineage) and lineage["config"]["tracking"]["mlflow"]["tracking_uri"].startswith(
        "https://***@")


def test_loraflow_json_holds_no_credentials(tmp_path):
    from workflows.train.stage import _lineage

    (tmp_path / "manifest.json").write_text("{}")
    prepared = SimpleNamespace(manifest={}, root=str(tmp_path))
    assert "tok3n" not in json.dumps(_lineage(secret_config(), prepared, tmp_path / "runs" / "r"))


def test_the_run_manifest_and_report_hold_no_credentials(tmp_path):
    from workflows.pipeline import record_run

    manifest = {"run_id": "r", "stages": {}, "started": 0.0, "finished": 1.0,
                "error": {"stage": "register", "type": "TrackingError", "message": f"MLflow at {SECRET_URI}: refused"}}
    record_run(tmp_path, manifest)
    for name in ("manifest.json", "report.md"):
        assert "tok3n" not in (tmp_path / name).read_text(), name
    assert "https://***@mlflow.example.com" in (tmp_path / "manifest.json").read_text()


class Listing:
    """A store whose listing holds keys that climb out of the folder."""

    def __init__(self, keys):
        self.keys = keys

    def get_file_info(self, selector):
        return [pafs.FileInfo(f"{selector.base_dir}/{k}", type=pafs.FileType.File, size=1) for k in self.keys]


@pytest.mark.parametrize("key", ["../../outside.txt", "a/../../outside.txt", "/etc/passwd"])
def test_a_listed_key_that_leaves_its_folder_is_refused(key):
    with pytest.raises(UnsafePathError, match="outside its folder"):
        storage.list_files(Listing(["adapter_config.json", key]), "bucket/adapter")


def test_adapter_files_are_never_written_outside_their_folder(tmp_path):
    files = AdapterFiles("demo:1", {"adapter_config.json": b"{}", "../escape.txt": b"x"})
    with pytest.raises(UnsafePathError, match="outside its folder"):
        files.write(tmp_path / "adapter")
    assert not (tmp_path / "escape.txt").exists()


def test_a_normal_listing_is_kept(tmp_path):
    assert storage.list_files(Listing(["adapter_config.json", "sub/x.bin"]), "bucket/adapter") == {
        "adapter_config.json": 1, "sub/x.bin": 1}

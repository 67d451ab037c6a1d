"""The checksum always covers the weights that are loaded, whatever loraflow.json names."""

from __future__ import annotations

import hashlib
import json

import pytest

from lora_core.adapter_io import AdapterLoadError, verify_checksum


def test_a_weights_file_named_in_loraflow_json_cannot_stand_in_for_the_real_weights(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"tampered weights")
    (tmp_path / "decoy.bin").write_bytes(b"the original weights")
    (tmp_path / "loraflow.json").write_text(json.dumps({
        "weights_file": "decoy.bin", "weights_sha256": hashlib.sha256(b"the original weights").hexdigest()}))
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors: sha256"):
        verify_checksum(tmp_path)


def test_a_weights_file_outside_the_adapter_is_not_read(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "loraflow.json").write_text(json.dumps({
        "weights_file": str(tmp_path.parent / "elsewhere" / "weights"),  # or /dev/zero: a hash that never ends
        "weights_sha256": hashlib.sha256(b"weights").hexdigest()}))
    verify_checksum(tmp_path)  # hashes the real file, and only it

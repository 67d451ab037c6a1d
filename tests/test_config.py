"""The pipeline config: validated at the edge, errors name the file, the key and the value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflows.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


BASE = {"data": {"source": "rows.jsonl", "format": "instruction"}}


def test_every_example_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.data.format in {"instruction", "completion", "chat", "text", "classification",
                                   "token_classification"}, path


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = write(tmp_path, {**BASE, "train": {"lerning_rate": 1e-3}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "train.lerning_rate" in str(e.value) and "unknown key" in str(e.value) and str(path) in str(e.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, {**BASE, "train": {"num_workers": "two"}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "train.num_workers" in str(e.value) and "'two'" in str(e.value)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, {"data": {"source": "x.jsonl"}})
    with pytest.raises(ConfigError, match=r"data\.format: required key is missing"):
        load_config(path)


@pytest.mark.parametrize("section, key, message", [
    ("model", {"pooling": "mean"}, "model.pooling: 'mean' feeds a classification head"),
    ("train", {"use_gpu": True, "gpus_per_worker": 0.5}, "train.gpus_per_worker: 0.5 puts several workers on one GPU"),
])
def test_keys_that_contradict_another_key_name_both(tmp_path, section, key, message):
    path = write(tmp_path, {**BASE, section: key})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_config_without_pooling_keeps_the_model_fingerprint_it_had_before_the_key_existed(tmp_path):
    cfg = load_config(write(tmp_path, {**BASE, "model": {"name": "tiny-bert", "task": "seq_cls"}}))
    assert "pooling" not in cfg.section("model")
    mean = load_config(write(tmp_path, {**BASE, "model": {"name": "tiny-bert", "task": "seq_cls", "pooling": "mean"}}))
    assert mean.section("model")["pooling"] == "mean"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides_any_key_with_yaml_typed_values(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(path, overrides=["train.lr=1e-4", "lora.target_modules=[q_proj, v_proj]", "data.pack=false"])
    assert cfg.train.lr == 1e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.pack is False


def test_numbers_in_exponent_notation_are_numbers_in_the_file_and_in_set(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 as a string; loraflow reads the number that YAML 1.2 and JSON read,
    so a search space's grid hands the trials floats and a log-uniform range is accepted."""
    from workflows.tune.space import check_space

    (tmp_path / "pipeline.yaml").write_text(
        "data: {source: rows.jsonl, format: instruction}\ntrain: {lr: 1e-4, eval_every: 2}\n"
        "tune: {search: grid, search_space: {train.lr: {grid: [1e-4, 5E-4, 2.0e-3]}}}\n")
    cfg = load_config(tmp_path / "pipeline.yaml", overrides=["lora.dropout=5e-2"])
    assert cfg.train.lr == 1e-4 and cfg.lora.dropout == 0.05
    assert cfg.tune.search_space["train.lr"] == {"grid": [1e-4, 5e-4, 2e-3]}
    cfg = load_config(tmp_path / "pipeline.yaml", overrides=[
        "tune.search=random", 'tune.search_space={"train.lr": {"loguniform": [1e-05, 1e-3]}}'])
    assert cfg.tune.search_space["train.lr"] == {"loguniform": [1e-5, 1e-3]}
    check_space(cfg)  # numbers: accepted
    assert load_config(tmp_path / "pipeline.yaml", overrides=["registry.name=1e5x"]).registry.name == "1e5x"


def test_set_with_unknown_key_fails(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(path, overrides=["train.nope=1"])


def test_data_paths_resolve_against_the_config_file(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.resolve_path("rows.jsonl") == str(tmp_path / "rows.jsonl")
    assert cfg.resolve_path("s3://bucket/x.jsonl") == "s3://bucket/x.jsonl"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_cli_validate_reports_bad_key_with_exit_2_and_never_imports_ray(tmp_path):
    path = write(tmp_path, {**BASE, "lora": {"rank": 8}})
    # -X importtime lists every module imported: ray must not be among them for a bad config.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "workflows.cli", "validate", str(path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "lora.rank: unknown key" in proc.stderr
    assert not any(line.rstrip().endswith(" ray") for line in proc.stderr.splitlines())


def test_cli_validate_names_a_missing_data_file(tmp_path):
    path = write(tmp_path, BASE)
    proc = run_cli("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 2 and "data.source not found" in proc.stderr and "rows.jsonl" in proc.stderr


def test_cli_init_writes_a_config_that_validates(tmp_path):
    proc = run_cli("init", "starter.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(tmp_path / "starter.yaml")
    assert cfg.registry.name == "my-adapter"


def test_token_classification_keys_left_at_their_defaults_keep_old_fingerprints():
    base = {"data": {"source": "x.jsonl", "format": "classification"}, "model": {"task": "seq_cls"}}
    cfg = config_from_dict(base)
    assert "tag_scheme" not in cfg.section("data") and "head_lr" not in cfg.section("train")
    cfg = config_from_dict({**base, "train": {"head_lr": 0.01}})
    assert cfg.section("train")["head_lr"] == 0.01


@pytest.mark.parametrize("train, dtype, expected", [
    ({"use_gpu": True}, None, "auto"),  # bf16 (fp16 without native bf16) on the GPU: no fp32 copy to autocast
    ({}, None, "float32"),
    ({"use_gpu": True}, "float32", "float32"),  # what the user says wins
    ({}, "bfloat16", "bfloat16"),
])
def test_an_unset_base_dtype_is_auto_on_a_gpu_and_float32_on_the_cpu(train, dtype, expected):
    model = {"name": "tiny-llama", **({"dtype": dtype} if dtype else {})}
    config = config_from_dict({"model": model, "data": {"source": "x.jsonl", "format": "text"}, "train": train})
    assert config.model.dtype == expected
    assert config.section("model")["dtype"] == expected  # fingerprints see what loads

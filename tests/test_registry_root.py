"""One registry root rule for every command: a flag or --set, then $LORAFLOW_REGISTRY, then the
config's `registry.root`, then the default; errors name where the root came from."""

from __future__ import annotations

import pytest
import yaml

from workflows.cli import build_parser
from workflows.config import load_config
from workflows.registry.base import RegistryError
from workflows.registry.references import resolve_adapter
from workflows.registry_root import DEFAULT_REGISTRY_ROOT, registry_root


def _config(tmp_path, root: str | None = None):
    raw = {"data": {"source": "d.jsonl", "format": "text"}}
    if root:
        raw["registry"] = {"root": root}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_run_and_predict_use_the_registry_named_by_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_REGISTRY", str(tmp_path / "env-registry"))
    run_root = load_config(_config(tmp_path)).registry.root
    predict_args = build_parser().parse_args(["predict", "--adapter", "demo@champion", "hello"])
    assert run_root == registry_root(predict_args.root)[0] == str(tmp_path / "env-registry")


@pytest.mark.parametrize("in_file, env, set_, expected", [
    ("/file", "/env", "/set", "/set"),
    ("/file", "/env", None, "/env"),
    ("/file", None, None, "/file"),
    (None, None, None, DEFAULT_REGISTRY_ROOT),
])
def test_the_root_is_set_then_environment_then_config_then_default(tmp_path, monkeypatch, in_file, env, set_,
                                                                    expected):
    monkeypatch.delenv("LORAFLOW_REGISTRY", raising=False)
    if env:
        monkeypatch.setenv("LORAFLOW_REGISTRY", env)
    cfg = load_config(_config(tmp_path, in_file), overrides=[f"registry.root={set_}"] if set_ else None)
    assert cfg.registry.root == expected
    assert registry_root(set_, in_file)[0] == expected  # the flag commands follow the same order


def test_a_missing_registry_error_names_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_REGISTRY", str(tmp_path / "nothing-here"))
    with pytest.raises(RegistryError, match=r"nothing-here \(the root comes from \$LORAFLOW_REGISTRY\)"):
        resolve_adapter("demo@champion", *registry_root(None))


def test_a_missing_registry_error_names_the_set_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_REGISTRY", str(tmp_path / "env"))
    cfg = load_config(_config(tmp_path), overrides=[f"registry.root={tmp_path / 'set'}"])
    with pytest.raises(RegistryError, match=r"the root comes from --set registry.root"):
        resolve_adapter("demo@champion", cfg.registry.root, cfg.registry.root_from)

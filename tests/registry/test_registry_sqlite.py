"""The adapter registry: versions, idempotence, verification, aliases, rollback, concurrency."""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from workflows.artifacts import sha256_file
from workflows.registry.base import AliasConflict, Ref, RegistryError, RegistryIntegrityError
from workflows.registry.references import resolve_adapter
from workflows.registry.sqlite import Registry

TARGETS = ("q_proj", "v_proj")


def write_peft_adapter(path: Path, seed: int, r: int = 8, hidden: int = 16, layers: int = 2,
                       modules_to_save: list[str] | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """A LoRA adapter directory exactly as PEFT writes one (non-zero B, distinct per seed)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for t in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, r), dtype=np.float32)
    for m in modules_to_save or []:
        tensors[f"base_model.model.{m}.weight"] = rng.standard_normal((3, hidden), dtype=np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.0,
              "target_modules": list(TARGETS), "bias": "none", "use_rslora": False, "lora_bias": False,
              "fan_in_fan_out": False, "modules_to_save": modules_to_save, "base_model_name_or_path": "tiny-llama",
              "inference_mode": True, "use_dora": False}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    return path


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return [write_peft_adapter(tmp_path / f"adapter{i}", seed=i) for i in range(3)]


def test_versions_are_numbered_from_one_per_name(registry, adapters):
    assert [registry.register(a, "demo") for a in adapters] == [1, 2, 3]
    assert registry.register(adapters[0], "other") == 1


def test_registering_the_same_content_returns_the_existing_version(registry, adapters, tmp_path):
    first = registry.register(adapters[0], "demo", metrics={"loss": 1.0})
    # Same config + weights, different loraflow.json (times, run ids): still the same adapter.
    twin = tmp_path / "twin"
    write_peft_adapter(twin, seed=0, extra_files={"loraflow.json": '{"run_id": "retry"}'})
    assert registry.register(twin, "demo") == first
    assert len(registry.list_versions("demo")) == 1


def test_stored_files_are_a_verified_copy(registry, adapters):
    v = registry.register(adapters[0], "demo")
    stored = registry.resolve(f"demo:{v}")
    assert stored.is_relative_to(registry.root / "adapters" / "demo")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert sha256_file(stored / f) == sha256_file(adapters[0] / f)
    assert registry.get(f"demo:{v}").files["adapter_model.safetensors"] == sha256_file(stored / "adapter_model.safetensors")


def test_a_flipped_byte_is_reported_with_the_file_name(registry, adapters):
    registry.register(adapters[0], "demo")
    weights = registry.root / "adapters" / "demo" / "1" / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryIntegrityError, match="adapter_model.safetensors.*modified"):
        registry.resolve("demo:1")


def test_a_missing_file_is_reported_with_the_file_name(registry, adapters):
    registry.register(adapters[0], "demo")
    (registry.root / "adapters" / "demo" / "1" / "adapter_config.json").unlink()
    with pytest.raises(RegistryIntegrityError, match="adapter_config.json is missing"):
        registry.resolve("demo:1")


def test_an_added_file_is_reported(registry, adapters):
    registry.register(adapters[0], "demo")
    (registry.root / "adapters" / "demo" / "1" / "evil.py").write_text("print('hi')")
    with pytest.raises(RegistryIntegrityError, match="unexpected file .*evil.py"):
        registry.resolve("demo:1")


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "", "with space", "x" * 129, "a..b"])
def test_bad_names_are_refused(registry, adapters, name):
    with pytest.raises(RegistryError, match="invalid adapter name"):
        registry.register(adapters[0], name)


@pytest.mark.parametrize("ref", ["demo", "demo:0", "demo:x", "demo@", "demo@1x", "../x:1", "demo@a/b"])
def test_bad_references_are_refused(ref):
    with pytest.raises(RegistryError, match="invalid"):
        Ref.parse(ref)


def test_a_directory_without_safetensors_weights_is_refused(registry, tmp_path):
    d = write_peft_adapter(tmp_path / "a", seed=0)
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(RegistryError, match="missing adapter_model.safetensors"):
        registry.register(d, "demo")
    assert registry.list_versions() == []


def test_lineage_metrics_tags_and_servability_are_recorded(registry, tmp_path):
    ok = registry.register(write_peft_adapter(tmp_path / "ok", seed=0), "demo", metrics={"loss": 0.5},
                           lineage={"run_id": "r1", "input_digest": "abc", "parent_adapter": "demo:0"},
                           tags={"owner": "me"})
    head = registry.register(write_peft_adapter(tmp_path / "head", seed=1, modules_to_save=["lm_head"]), "demo")
    v_ok, v_head = registry.get(f"demo:{ok}"), registry.get(f"demo:{head}")
    assert (v_ok.metrics, v_ok.tags, v_ok.lineage["run_id"], v_ok.lineage["input_digest"]) == (
        {"loss": 0.5}, {"owner": "me"}, "r1", "abc")
    assert (v_ok.servable, v_ok.servable_reasons, v_head.servable) == (True, [], False)
    assert any("modules_to_save" in r for r in v_head.servable_reasons)


def test_unknown_lineage_keys_are_refused(registry, adapters):
    with pytest.raises(RegistryError, match="unknown lineage keys.*'colour'"):
        registry.register(adapters[0], "demo", lineage={"colour": "blue"})


def test_references_resolve_by_version_and_alias(registry, adapters):
    for a in adapters:
        registry.register(a, "demo")
    registry.promote("demo", 2, "staging", reason="manual")
    assert registry.resolve("demo@staging") == registry.resolve("demo:2")
    pinned = resolve_adapter("demo@staging", registry.root)
    assert (pinned.ref, pinned.location) == ("demo:2", str(registry.resolve("demo:2")))
    assert pinned.content_sha256 == registry.get("demo:2").content_sha256
    assert resolve_adapter(str(adapters[0]), registry.root).location == str(adapters[0].resolve())  # a folder as is
    with pytest.raises(RegistryError, match="no version of 'demo' holds alias 'champion'"):
        registry.resolve("demo@champion")
    with pytest.raises(RegistryError, match="demo:9: not in the registry"):
        registry.resolve("demo:9")


def test_every_alias_move_is_recorded_with_reason_and_numbers(registry, adapters):
    for a in adapters:
        registry.register(a, "demo")
    registry.promote("demo", 1, "champion", "first", {"loss": 2.0})
    registry.promote("demo", 3, "champion", "better", {"loss": 1.0})
    moves = registry.history("demo", "champion")
    assert [(m.from_version, m.to_version, m.action, m.reason, m.numbers) for m in moves] == [
        (None, 1, "promote", "first", {"loss": 2.0}), (1, 3, "promote", "better", {"loss": 1.0})]


def test_rollback_walks_back_through_previous_holders(registry, adapters):
    for a in adapters:
        registry.register(a, "demo")
    for v in (1, 2, 3):
        registry.promote("demo", v, "champion", f"v{v}")
    assert registry.rollback("demo", "champion").to_version == 2
    assert registry.rollback("demo", "champion").to_version == 1
    assert registry.alias_version("demo", "champion") == 1
    with pytest.raises(RegistryError, match="no earlier holder"):
        registry.rollback("demo", "champion")


def test_delete_is_soft_and_refuses_an_aliased_version(registry, adapters):
    for a in adapters[:2]:
        registry.register(a, "demo")
    registry.promote("demo", 1, "champion", "first")
    with pytest.raises(RegistryError, match=r"holds alias\(es\) \['champion'\]"):
        registry.delete("demo:1")
    registry.delete("demo:2")
    assert [v.version for v in registry.list_versions("demo")] == [1]
    assert registry.get("demo:2").deleted is not None
    with pytest.raises(RegistryError, match="demo:2 was deleted"):
        registry.resolve("demo:2")
    assert registry.register(adapters[2], "demo") == 3  # numbers are never reused


def test_export_writes_a_plain_writable_peft_folder(registry, adapters, tmp_path):
    registry.register(adapters[0], "demo")
    out = registry.export("demo:1", tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sha256_file(out / "adapter_model.safetensors") == sha256_file(adapters[0] / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text("{}")  # a user's copy, not the registry's
    registry.resolve("demo:1")


def test_a_decision_against_a_stale_holder_conflicts(registry, adapters):
    for a in adapters:
        registry.register(a, "demo")
    registry.promote("demo", 1, "champion", "first")
    with pytest.raises(AliasConflict, match="now version 1"):
        registry.record_decision("demo", 3, "champion", True, "gate", {}, expected_holder=None)
    assert registry.alias_version("demo", "champion") == 1
    assert registry.decisions("demo") == []  # nothing recorded by the failed transaction


def test_root_expands_home_and_refuses_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Registry("~/reg").root == tmp_path / "reg"
    with pytest.raises(RegistryError, match="local POSIX path"):
        Registry("s3://bucket/registry")


def test_the_database_is_in_wal_mode(registry):
    with sqlite3.connect(registry.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- 8 processes at once ------------------------------------------------------------------------

WORKERS = 8


def _no_servable_check(path: Path) -> tuple[bool, list[str]]:
    # Servability is not what this test is about; lora_core would import torch in 8 processes.
    return True, []


def _writer(root: str, work: str, i: int, barrier, results) -> None:
    reg = Registry(root, check_servable=_no_servable_check)
    mine = [write_peft_adapter(Path(work) / f"w{i}-{k}", seed=100 + 10 * i + k) for k in range(2)]
    shared = write_peft_adapter(Path(work) / f"shared-{i}", seed=7)  # identical content in every process
    barrier.wait()
    versions = [reg.register(a, "demo") for a in (mine[0], shared, mine[1])]
    reg.promote("demo", versions[0], "champion", reason=f"writer {i}")
    reg.record_decision("demo", versions[2], "staging", True, f"writer {i} gate", {"i": i})
    results.put((i, [sha256_file(a / "adapter_model.safetensors") for a in (mine[0], shared, mine[1])], versions))


def test_eight_processes_register_and_promote_without_losing_a_version(tmp_path):
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold Ray/torch threads
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    root = tmp_path / "registry"
    Registry(root)  # created once up front, like a real deployment; writers race on everything else
    procs = [ctx.Process(target=_writer, args=(str(root), str(tmp_path), i, barrier, results)) for i in range(WORKERS)]
    for p in procs:
        p.start()
    out = []
    while len(out) < WORKERS:  # fail fast if a writer died instead of waiting for its result
        try:
            out.append(results.get(timeout=1))
        except queue.Empty:
            assert all(p.exitcode in (None, 0) for p in procs), [p.exitcode for p in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    reg = Registry(root)
    versions = reg.list_versions("demo")
    assert [v.version for v in versions] == list(range(1, 2 * WORKERS + 2))  # 16 own + 1 shared, no gaps
    by_weights = {v.files["adapter_model.safetensors"]: v.version for v in versions}
    assert len(by_weights) == len(versions)  # every content stored once
    for _, shas, got in out:
        assert [by_weights[s] for s in shas] == got  # each writer got the version of its own content
    assert len({got[1] for _, _, got in out}) == 1  # the shared adapter has one version for all
    for v in versions:
        reg.resolve(v.ref)

    for alias, n_moves in (("champion", WORKERS), ("staging", WORKERS)):
        moves = reg.history("demo", alias)
        assert len(moves) == n_moves
        assert moves[0].from_version is None
        assert all(b.from_version == a.to_version for a, b in zip(moves, moves[1:]))  # an unbroken chain
        assert reg.alias_version("demo", alias) == moves[-1].to_version
    assert len(reg.decisions("demo")) == WORKERS
    assert reg.integrity_check() == "ok"

"""The registry under a case-insensitive file system, a writer killed mid-register, deletions and
rollbacks the gate must respect, and a champion trained on other labels."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from workflows.adapters import AdapterFiles
from workflows.config import config_from_dict
from workflows.evaluate.stage import champion_not_comparable
from workflows.registry.references import champion_for
from workflows.registry.sqlite import ORPHAN, Registry
from workflows.registry.stage import register_and_gate

sys.path.insert(0, str(Path(__file__).parent))
from test_gate import _eval  # noqa: E402
from test_registry_sqlite import write_peft_adapter  # noqa: E402


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return [write_peft_adapter(tmp_path / f"adapter{i}", seed=i) for i in range(4)]


def config(root: Path, **registry):
    return config_from_dict({"data": {"source": "x.jsonl", "format": "text"},
                             "registry": {"root": str(root), "name": "demo", **registry}})


def test_names_that_differ_only_in_case_keep_their_own_versions_on_a_case_insensitive_file_system(tmp_path, adapters):
    reg = Registry(tmp_path / "registry")
    reg.register(adapters[0], "demo")
    # What macOS and Windows do: `Demo` and `demo` are one folder.
    os.symlink(reg.adapters_dir / "demo", reg.adapters_dir / "Demo")
    assert reg.register(adapters[1], "Demo") == 1
    assert reg.resolve("demo:1") != reg.resolve("Demo:1")  # both verify: neither removed the other's files


def test_only_a_folder_with_an_orphan_marker_and_no_row_is_removed(tmp_path, adapters):
    reg = Registry(tmp_path / "registry")
    reg.register(adapters[0], "demo")
    keep = reg.adapters_dir / "demo" / "2"
    keep.mkdir()  # not the registry's to remove: no marker (on a case-insensitive disk, maybe Demo's)
    # A writer killed between its rename and its commit: the folder and its marker, no row.
    orphan = reg.adapters_dir / "demo" / "2-deadbeef0000"
    orphan.mkdir()
    (orphan.parent / f"{orphan.name}{ORPHAN}").touch()
    assert reg.register(adapters[1], "demo") == 2
    assert not orphan.exists() and keep.is_dir()
    reg.resolve("demo:1")
    reg.resolve("demo:2")


def test_registering_a_deleted_adapters_content_again_does_not_restore_or_promote_it(tmp_path, adapters):
    cfg = config(tmp_path / "registry")
    reg = Registry(cfg.registry.root)
    register_and_gate(cfg, adapters[0], _eval(2.0), {})
    reg.register(adapters[1], "demo")
    reg.delete("demo:2")
    version, decision = register_and_gate(cfg, adapters[1], _eval(0.5, 2.0, "demo:1"), {})
    assert version == 2 and not decision.promote and "deleted" in decision.reason
    assert reg.get("demo:2").deleted is not None and reg.alias_version("demo", "champion") == 1


def test_a_rolled_back_version_is_not_promoted_again_by_a_rerun(tmp_path, adapters):
    cfg = config(tmp_path / "registry")
    reg = Registry(cfg.registry.root)
    register_and_gate(cfg, adapters[0], _eval(2.0), {})
    register_and_gate(cfg, adapters[1], _eval(1.0, 2.0, "demo:1"), {})
    reg.rollback("demo", "champion", reason="bad answers in production")
    version, decision = register_and_gate(cfg, adapters[1], _eval(1.0, 2.0, "demo:1"), {})  # run --from evaluate
    assert version == 2 and not decision.promote and "rolled back" in decision.reason
    assert reg.alias_version("demo", "champion") == 1


def test_a_rollback_skips_a_deleted_holder(tmp_path, adapters):
    reg = Registry(tmp_path / "registry")
    for a in adapters[:3]:
        reg.register(a, "demo")
    for v in (1, 2, 3):
        reg.promote("demo", v, "champion", f"v{v}")
    reg.delete("demo:2")
    move = reg.rollback("demo", "champion")
    assert (move.to_version, move.numbers) == (1, {"skipped_deleted": [2]})
    with pytest.raises(Exception, match="no earlier holder"):
        reg.rollback("demo", "champion")  # both promotions are undone


def test_a_deleted_earlier_champion_does_not_break_planning(tmp_path, adapters):
    cfg = config(tmp_path / "registry")
    reg = Registry(cfg.registry.root)
    reg.register(adapters[0], "demo")
    reg.register(adapters[1], "demo", lineage={"fingerprints": {"train": "fp-of-this-plan"}})
    reg.promote("demo", 1, "champion", "first")
    reg.promote("demo", 2, "champion", "this plan's adapter")
    reg.delete("demo:1")
    assert champion_for(cfg, "fp-of-this-plan") is None


def _classifier(tmp_path: Path, name: str, labels: list[str]) -> AdapterFiles:
    folder = write_peft_adapter(tmp_path / name, seed=1, extra_files={"loraflow.json": json.dumps({"label_names": labels})})
    return AdapterFiles.read(folder, f"demo:{name}")


def test_a_champion_trained_on_other_labels_is_not_comparable(tmp_path):
    assert champion_not_comparable(_classifier(tmp_path, "same", ["a", "b"]), ["a", "b"]) is None
    reason = champion_not_comparable(_classifier(tmp_path, "other", ["a", "b"]), ["a", "b", "c"])
    assert reason.startswith("not comparable") and "['a', 'b', 'c']" in reason
    assert champion_not_comparable(_classifier(tmp_path, "order", ["b", "a"]), ["a", "b"]) is not None


def test_the_gate_records_not_comparable_and_keeps_the_champion(tmp_path, adapters):
    cfg = config(tmp_path / "registry")
    reg = Registry(cfg.registry.root)
    register_and_gate(cfg, adapters[0], _eval(2.0), {})
    metrics = _eval(0.5, 2.0, "demo:1")
    del metrics["models"]["champion"]
    metrics["champion_not_comparable"] = "not comparable: the champion demo:1 was trained on 2 labels"
    version, decision = register_and_gate(cfg, adapters[1], metrics, {})
    assert not decision.promote and decision.reason.startswith("not comparable")
    assert reg.decisions("demo", version)[0]["numbers"]["comparable"] is False
    assert reg.alias_version("demo", "champion") == 1

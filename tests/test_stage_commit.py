"""A stage commit survives a power loss: every file and folder is flushed before the rename that
publishes it, and the parent after; a process killed between the writes and the rename commits nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workflows import artifacts
from workflows.artifacts import is_complete, stage_output


@pytest.fixture
def disk_events(monkeypatch):
    """fsync and rename calls, in order: ("fsync", path) / ("rename", src, dst)."""
    events: list[tuple] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return events


def test_a_stage_commit_flushes_every_file_and_folder_before_the_rename_and_the_parent_after(tmp_path, disk_events):
    final = tmp_path / "train" / "fp"
    with stage_output(final) as tmp:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 1000)
        (tmp / "shard-0.parquet").write_bytes(b"s" * 1000)
    (rename_at,) = [i for i, e in enumerate(disk_events) if e[0] == "rename" and e[2] == str(final)]
    synced_before = {Path(e[1]).relative_to(tmp) for e in disk_events[:rename_at]
                     if e[0] == "fsync" and e[1].startswith(str(tmp))}
    assert synced_before >= {Path("adapter/adapter_model.safetensors"), Path("shard-0.parquet"), Path("adapter"),
                             Path("_SUCCESS"), Path(".")}
    assert ("fsync", str(final.parent)) in disk_events[rename_at + 1:]


def test_a_process_killed_between_the_writes_and_the_rename_commits_nothing(tmp_path, monkeypatch):
    final = tmp_path / "evaluate" / "fp"

    def killed(src, dst):
        raise KeyboardInterrupt  # the signal arrives after every write, before the rename

    monkeypatch.setattr(os, "rename", killed)
    with pytest.raises(KeyboardInterrupt), stage_output(final) as tmp:
        (tmp / "metrics.json").write_text("{}")
    monkeypatch.undo()
    assert not is_complete(final) and not final.exists()
    assert not [p for p in final.parent.iterdir()]  # no temp folder left to be mistaken for output
    with stage_output(final) as tmp:  # the rerun commits
        (tmp / "metrics.json").write_text("{}")
    assert is_complete(final)
    assert artifacts.SUCCESS in os.listdir(final)

"""The local cluster's state file names processes to kill and a folder to delete: it lives in the
user's own folder, and a file planted by someone else is never acted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workflows.ops import local_cluster


@pytest.fixture
def victim(tmp_path):
    """A process and a folder of the user's that a planted state file points at."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "work.txt").write_text("keep me")
    yield proc, folder
    proc.kill()
    proc.wait()


def planted(path: Path, proc, folder: Path) -> Path:
    node = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "log": "x"}
    path.write_text(json.dumps({"temp_dir": str(folder), "gcs_address": "127.0.0.1:1", "dashboard_url": "http://x",
                                "auth_mode": "token", "head": node, "workers": []}))
    return path


def test_the_state_file_defaults_to_a_folder_of_the_users_own(monkeypatch):
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert local_cluster.default_state_path() == Path.home() / ".local" / "state" / "loraflow" / "local-cluster.json"


@pytest.mark.parametrize("plant", ["other_user", "world_writable"])
def test_a_state_file_planted_by_another_user_is_never_acted_on(tmp_path, victim, capsys, plant):
    proc, folder = victim
    state = planted(tmp_path / "state.json", proc, folder)
    if plant == "other_user":
        os.chown(state, os.getuid() + 4242, -1)  # needs root; as any other user, the mode case stands
        if os.stat(state).st_uid == os.getuid():
            pytest.skip("chown needs root")
    else:
        state.chmod(0o666)
    assert local_cluster._main(["stop", "--state", str(state)]) == 1
    time.sleep(0.2)
    assert proc.poll() is None and (folder / "work.txt").is_file()  # nothing killed, nothing deleted
    assert "is not used" in capsys.readouterr().err


def test_a_state_file_is_written_for_its_user_only(tmp_path):
    head = local_cluster.PrivateHead("t", "g", "http://d", "token", local_cluster.RayNodeProcess(1, 0.0, "l"))
    path = tmp_path / "state" / "local.json"
    local_cluster.write_state(path, head)
    assert oct(path.stat().st_mode & 0o777) == "0o600" and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert local_cluster.read_state(path) == head

"""Ray Jobs: planning what reaches the cluster, and real jobs on a private head of this test's own.

Every head here is started with `workflows.ops.local_cluster` (own ports, own temp dir, explicit
RAY_AUTH_MODE) and stopped by killing exactly its processes; nothing calls `ray stop`.
"""

from __future__ import annotations

import io
import shlex
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from workflows.config import ConfigError
from workflows.ops import auth, jobs
from workflows.ops.local_cluster import free_ports, private_head
from workflows.ops.submission import UnreachableInputError, plan_submission

REPO = Path(__file__).resolve().parents[2]
ADDRESS = "http://10.11.12.13:8265"  # planning never connects; `local_cluster` says where the nodes are


@pytest.fixture(scope="module")
def head():
    """One private head (dashboard on, auth disabled) for the job tests of this module."""
    with private_head(num_cpus=2, auth_mode="disabled") as h:
        yield h


def plan(config: Path, local_cluster: bool = False, **kwargs):
    return plan_submission(config, ADDRESS, local_cluster=local_cluster, **kwargs)


# ---- planning: what the job gets, and what is refused ----

@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder: a config whose outputs live on cluster storage, and a small data file."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"instruction": "2+2?", "output": "4"}\n' * 20)
    (tmp_path / "configs").mkdir()
    write_config(tmp_path, {"data": {"source": "../data/train.jsonl", "format": "instruction"}})
    return tmp_path


def write_config(project: Path, raw: dict, name: str = "demo.yaml") -> Path:
    raw.setdefault("cluster", {"work_dir": "s3://bucket/work", "runs_dir": "/mnt/shared/runs"})
    raw.setdefault("registry", {"root": "/mnt/registry"})
    path = project / "configs" / name
    path.write_text(yaml.safe_dump(raw))
    return path


def entrypoint_sets(entrypoint: str) -> dict[str, object]:
    argv = shlex.split(entrypoint)
    return {k: yaml.safe_load(v) for k, v in (argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")}


def test_entrypoint_runs_loraflow_on_the_config_inside_the_shipped_working_dir(project):
    p = plan(project / "configs" / "demo.yaml", working_dir=project,
                           overrides=["train.lr=0.001"], env_vars={"HF_TOKEN": "x"}, pip=["peft==0.21.2"])
    assert shlex.split(p.entrypoint)[:3] == ["loraflow", "run", "configs/demo.yaml"]
    assert entrypoint_sets(p.entrypoint)["train.lr"] == 0.001
    assert entrypoint_sets(p.entrypoint)["cluster.address"] == "auto"  # join the cluster, don't start one
    assert p.runtime_env["working_dir"] == str(project)
    assert p.runtime_env["env_vars"] == {"HF_TOKEN": "x"}
    assert p.runtime_env["pip"] == ["peft==0.21.2"]


def test_retrain_command_is_what_the_job_runs(project):
    p = plan(project / "configs" / "demo.yaml", working_dir=project, command="retrain")
    assert shlex.split(p.entrypoint)[:2] == ["loraflow", "retrain"]


def test_small_local_data_inside_the_working_dir_is_shipped_and_said_so(project):
    p = plan(project / "configs" / "demo.yaml", working_dir=project)
    assert any("data.source" in n and "travels with the working directory" in n for n in p.notes)
    assert entrypoint_sets(p.entrypoint)["data.source"] == "../data/train.jsonl"


def test_local_data_outside_the_working_dir_is_refused_naming_the_key(project, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "train.jsonl"
    elsewhere.write_text("{}\n")
    write_config(project, {"data": {"source": str(elsewhere), "format": "instruction"}})
    with pytest.raises(UnreachableInputError, match=r"data\.source: .* is outside the working directory"):
        plan(project / "configs" / "demo.yaml", working_dir=project)


def test_gitignored_local_data_is_refused_because_ray_would_not_upload_it(project):
    (project / ".gitignore").write_text("data/\n")
    with pytest.raises(UnreachableInputError, match=r"data\.source: .* excluded from the upload"):
        plan(project / "configs" / "demo.yaml", working_dir=project)


def test_local_data_over_the_ship_limit_is_refused(project):
    with pytest.raises(UnreachableInputError, match=r"over the 0 MiB limit"):
        plan(project / "configs" / "demo.yaml", working_dir=project, ship_limit_bytes=100)


def test_missing_local_data_is_refused(project):
    write_config(project, {"data": {"source": "../data/nope.jsonl", "format": "instruction"}})
    with pytest.raises(UnreachableInputError, match=r"data\.source: \.\./data/nope\.jsonl does not exist"):
        plan(project / "configs" / "demo.yaml", working_dir=project)


def test_object_store_and_shared_mount_paths_pass_as_cluster_visible(project, tmp_path_factory):
    mount = tmp_path_factory.mktemp("nfs")
    (mount / "eval.jsonl").write_text("{}\n")
    write_config(project, {"data": {"source": "s3://bucket/train.jsonl", "eval_source": str(mount / "eval.jsonl"),
                                    "format": "instruction"}})
    p = plan(project / "configs" / "demo.yaml", working_dir=project,
                           shared_mounts=[str(mount)])
    sets = entrypoint_sets(p.entrypoint)
    assert "data.source" not in sets
    assert sets["data.eval_source"] == str(mount / "eval.jsonl")


def test_relative_work_dir_is_refused_for_a_remote_cluster(project):
    write_config(project, {"data": {"source": "s3://bucket/train.jsonl", "format": "instruction"},
                           "cluster": {"work_dir": "work", "runs_dir": "/mnt/shared/runs"}})
    with pytest.raises(UnreachableInputError, match=r"cluster\.work_dir: 'work' is relative"):
        plan(project / "configs" / "demo.yaml", working_dir=project)


@pytest.mark.parametrize("runs_dir", ["s3://bucket/runs", "gs://bucket/runs"])
def test_an_object_store_runs_dir_is_refused_before_anything_else(project, runs_dir):
    write_config(project, {"data": {"source": "s3://bucket/train.jsonl", "format": "instruction"},
                           "cluster": {"work_dir": "s3://bucket/work", "runs_dir": runs_dir}})
    with pytest.raises(ConfigError, match=rf"cluster\.runs_dir '{runs_dir}': .*must be a path on the cluster, "
                                          r"e\.g\. a shared volume.*only cluster\.work_dir may be s3://"):
        plan(project / "configs" / "demo.yaml", working_dir=project)


def test_a_cluster_on_this_machine_gets_absolute_local_paths(project):
    write_config(project, {"data": {"source": "../data/train.jsonl", "format": "instruction"},
                           "cluster": {"work_dir": "work"}, "registry": {"root": "reg"}})
    p = plan(project / "configs" / "demo.yaml", local_cluster=True, working_dir=project)
    sets = entrypoint_sets(p.entrypoint)
    assert sets["data.source"] == str(project / "data" / "train.jsonl")
    assert sets["cluster.work_dir"] == str(project / "work")  # outputs resolve against the working dir
    assert sets["registry.root"] == str(project / "reg")


def test_config_outside_the_working_dir_is_refused(project, tmp_path_factory):
    with pytest.raises(UnreachableInputError, match="outside the working directory"):
        plan(project / "configs" / "demo.yaml", working_dir=tmp_path_factory.mktemp("other"))


def test_invalid_config_fails_before_anything_is_submitted(project):
    write_config(project, {"data": {"source": "s3://b/x.jsonl", "format": "instruction"}, "train": {"lerning_rate": 1}})
    with pytest.raises(ConfigError, match=r"train\.lerning_rate: unknown key"):
        plan(project / "configs" / "demo.yaml", working_dir=project)


@pytest.mark.train_group
def test_cmd_submit_prints_the_refusal_and_returns_2(project, head, capsys, monkeypatch):
    monkeypatch.chdir(project)
    write_config(project, {"data": {"source": "../data/nope.jsonl", "format": "instruction"}})
    from workflows.cli import main

    assert main(["submit", "configs/demo.yaml", "--address", head.dashboard_url, "--set", "train.lr=0.001"]) == 2
    assert "data.source: ../data/nope.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.train_group
def test_a_head_on_this_machine_is_recognised_as_local(head):
    assert jobs.cluster_on_this_machine(head.dashboard_url)


# ---- exit codes and auth, no cluster needed ----

@pytest.mark.parametrize(("status", "driver_code", "expected"), [
    ("SUCCEEDED", 0, 0), ("FAILED", 3, 3), ("FAILED", None, 1), ("FAILED", -9, 137),
    ("STOPPED", None, jobs.EXIT_STOPPED), ("RUNNING", None, None),
])
def test_exit_code_stands_for_the_job_outcome(status, driver_code, expected):
    assert jobs.exit_code_for(status, driver_code) == expected


def test_the_token_file_is_sent_unless_auth_is_disabled(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    env = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(token)}
    assert auth.auth_headers(env) == {"Authorization": "Bearer s3cret"}
    assert auth.auth_headers({**env, "RAY_AUTH_MODE": "disabled"}) == {}


def test_token_mode_without_a_token_is_a_clear_error(tmp_path):
    with pytest.raises(auth.AuthError, match="RAY_AUTH_MODE=token but no Ray auth token"):
        auth.auth_headers({"HOME": str(tmp_path), "RAY_AUTH_MODE": "token"})


def test_an_address_without_a_job_server_is_a_clear_error():
    (port,) = free_ports(1)
    with pytest.raises(jobs.JobsError, match="cannot reach a Ray job server"):
        jobs.connect(f"http://127.0.0.1:{port}")


# ---- real jobs on a private head ----

@pytest.mark.train_group
def test_a_job_imports_the_shipped_workflows_package_and_succeeds(head, tmp_path):
    marker = tmp_path / "marker.txt"
    script = f"import pathlib, workflows; pathlib.Path({str(marker)!r}).write_text(workflows.__file__)"
    outcome = jobs.submit_entrypoint(f"python -c {shlex.quote(script)}", head.dashboard_url,
                                     {"working_dir": str(REPO), "excludes": [".git", ".venv"]}, out=io.StringIO())
    assert (outcome.status, outcome.exit_code) == ("SUCCEEDED", 0)
    assert "_ray_pkg_" in marker.read_text()  # imported from the uploaded copy, not the checkout


@pytest.mark.train_group
def test_logs_are_followed_while_waiting_and_can_be_fetched_later(head):
    out = io.StringIO()
    outcome = jobs.submit_entrypoint("echo hello-from-the-job", head.dashboard_url, out=out)
    assert "hello-from-the-job" in out.getvalue()
    assert "hello-from-the-job" in jobs.job_logs(outcome.job_id, head.dashboard_url)


@pytest.mark.train_group
def test_a_failed_job_exits_with_the_driver_exit_code(head):
    outcome = jobs.submit_entrypoint("python -c 'import sys; sys.exit(7)'", head.dashboard_url, out=io.StringIO())
    assert (outcome.status, outcome.exit_code) == ("FAILED", 7)


@pytest.mark.train_group
def test_a_stopped_job_has_its_own_exit_code(head):
    started = jobs.submit_entrypoint("sleep 300", head.dashboard_url, wait=False, out=io.StringIO())
    assert started.exit_code is None
    _wait_for_status(started.job_id, head.dashboard_url, "RUNNING")
    outcome = jobs.stop_job(started.job_id, head.dashboard_url)
    assert (outcome.status, outcome.exit_code) == ("STOPPED", jobs.EXIT_STOPPED)


@pytest.mark.train_group
def test_cmd_jobs_status_prints_the_outcome_and_returns_its_exit_code(head, capsys):
    outcome = jobs.submit_entrypoint("python -c 'import sys; sys.exit(5)'", head.dashboard_url, out=io.StringIO())
    from workflows.cli import main

    code = main(["jobs", "status", outcome.job_id, "--address", head.dashboard_url])
    assert code == 5
    assert f"{outcome.job_id} FAILED (exit code 5)" in capsys.readouterr().out


@pytest.mark.train_group
def test_loraflow_submit_ships_the_config_and_data_and_the_job_runs_loraflow_on_the_cluster(project, head, capsys):
    from workflows.cli import main

    code = main(["submit", str(project / "configs" / "demo.yaml"), "--address", head.dashboard_url,
                 "--working-dir", str(project), "--command", "validate", "--set", "train.lr=0.001"])
    assert code == 0
    assert "configs/demo.yaml: ok" in capsys.readouterr().out  # printed by `loraflow validate` in the job


@pytest.mark.train_group
def test_an_unknown_job_id_is_a_clear_error(head):
    with pytest.raises(jobs.JobsError, match="no job 'raysubmit_nope'"):
        jobs.job_status("raysubmit_nope", head.dashboard_url)


def _wait_for_status(job_id: str, address: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while jobs.job_status(job_id, address).status != status:
        assert time.monotonic() < deadline, f"job {job_id} never reached {status}"
        time.sleep(0.2)


@pytest.mark.train_group
def test_a_token_auth_cluster_accepts_the_token_file_and_explains_a_missing_token(tmp_path, monkeypatch):
    token = tmp_path / "auth_token"
    token.write_text("loraflow-test-token")
    with private_head(num_cpus=1, auth_mode="token", env={"RAY_AUTH_TOKEN_PATH": str(token)}) as h:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # a user who never heard of token auth
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        assert jobs.submit_entrypoint("true", h.dashboard_url, out=io.StringIO()).exit_code == 0

        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
        with pytest.raises(jobs.JobsError, match="requires token authentication and this client has no token"):
            jobs.submit_entrypoint("true", h.dashboard_url, out=io.StringIO())


@pytest.mark.train_group
def test_stopping_a_private_head_kills_exactly_its_processes(tmp_path):
    # Stands in for someone else's process on the machine: it must outlive our head.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with private_head(num_cpus=1, auth_mode="disabled") as h:
        job = jobs.submit_entrypoint("sleep 300", h.dashboard_url, wait=False, out=io.StringIO())
        _wait_for_status(job.job_id, h.dashboard_url, "RUNNING")  # its driver survives a plain killpg
        ours = h.processes()
        temp_dir = Path(h.temp_dir)
    try:
        assert [p.pid for p in ours if _alive(p)] == []
        assert not temp_dir.exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def _alive(p: psutil.Process) -> bool:
    return p.is_running() and p.status() != psutil.STATUS_ZOMBIE

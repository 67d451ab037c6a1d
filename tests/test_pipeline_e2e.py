"""The DAG end to end through the CLI on a tiny model: run, cache hits, reruns, resume after SIGKILL.

Each `loraflow` call is a real subprocess (a new driver) joined to the session's Ray cluster with
`--address`, so the tests exercise exactly what a user runs, without paying a cluster start per call.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.train_group

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
from make_demo_data import make_row  # noqa: E402


def write_rows(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(make_row(rng)) + "\n" for _ in range(n)))


def pipeline_config(root: Path, **train) -> Path:
    cfg = {
        "model": {"name": "tiny-llama"},
        "data": {"source": "rows.jsonl", "format": "instruction",
                 "fields": {"instruction": "instruction", "input": "input", "output": "output"},
                 "max_seq_len": 128, "eval_fraction": 0.1},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"num_workers": 1, "batch_size": 4, "lr": 5e-3, "max_steps": 6, "log_every": 2,
                  "checkpoint_every": 2, **train},
        "eval": {"batch_size": 8, "generation": {"num_prompts": 2, "max_new_tokens": 4}},
        "registry": {"root": str(root / "registry"), "name": "e2e", "gate": {"metric": "loss"}},
        "cluster": {"work_dir": str(root / "work"), "runs_dir": str(root / "runs")},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def loraflow(*args: str, address: str, cwd: Path, timeout: int = 400) -> dict:
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", *args, "--json", "--address", address],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def statuses(manifest: dict) -> list[str]:
    return [manifest["stages"][s]["status"] for s in ("prepare", "train", "evaluate", "register")]


@pytest.fixture(scope="module")
def address(ray_address) -> str:
    return ray_address


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, address):
    root = tmp_path_factory.mktemp("e2e")
    write_rows(root / "rows.jsonl", 160, seed=1)
    cfg = pipeline_config(root)
    return root, cfg, loraflow("run", str(cfg), address=address, cwd=root)


def test_full_run_executes_every_stage_and_registers_a_champion(first_run):
    root, _, manifest = first_run
    assert statuses(manifest) == ["ran"] * 4
    reg = manifest["stages"]["register"]["outputs"]
    assert reg["name"] == "e2e" and reg["version"] == 1 and reg["decision"]["promote"] is True
    assert (Path(manifest["stages"]["train"]["outputs"]["adapter"]) / "adapter_config.json").is_file()
    run_dir = root / "runs" / manifest["run_id"]
    assert json.loads((run_dir / "manifest.json").read_text())["run_id"] == manifest["run_id"]
    assert (run_dir / "report.md").is_file() and (run_dir / "loss.png").is_file()


def test_second_run_hits_every_stage_without_starting_ray(first_run, address):
    root, cfg, _ = first_run
    manifest = loraflow("run", str(cfg), address=address, cwd=root)
    assert statuses(manifest) == ["hit"] * 4
    assert manifest["ray_started"] is False


def test_from_evaluate_reruns_a_complete_stage_and_replaces_it(first_run, address):
    root, cfg, first = first_run
    manifest = loraflow("run", str(cfg), "--from", "evaluate", address=address, cwd=root)
    assert statuses(manifest) == ["hit", "hit", "ran", "ran"]
    assert manifest["stages"]["evaluate"]["fingerprint"] == first["stages"]["evaluate"]["fingerprint"]
    # Same adapter content: the registry hands back the version it already has, no duplicate.
    assert manifest["stages"]["register"]["outputs"]["version"] == 1
    out = root / "work" / "evaluate"
    assert [d.name for d in out.iterdir()] == [first["stages"]["evaluate"]["fingerprint"]]  # nothing set aside
    assert (out / first["stages"]["evaluate"]["fingerprint"] / "_SUCCESS").is_file()


def test_dag_reports_cache_status_without_running(first_run, address):
    root, cfg, _ = first_run
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "dag", str(cfg), "--json",
                           "--set", "train.lr=1e-3"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {r["stage"]: r for r in json.loads(proc.stdout)}
    assert rows["prepare"]["status"] == "hit" and rows["train"]["status"] == "miss"
    assert rows["train"]["why"] == "`train` section changed"


def test_edited_data_reruns_from_prepare(first_run, address):
    root, cfg, _ = first_run
    with open(root / "rows.jsonl", "a") as f:
        f.write(json.dumps(make_row(random.Random(99))) + "\n")
    manifest = loraflow("prepare", str(cfg), address=address, cwd=root)
    assert list(manifest["stages"]) == ["prepare"] and manifest["stages"]["prepare"]["status"] == "ran"
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "dag", str(cfg), "--json"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    rows = {r["stage"]: r for r in json.loads(proc.stdout)}
    assert rows["prepare"]["status"] == "hit"
    assert rows["train"]["status"] == "miss" and "prepare upstream changed" in rows["train"]["why"]


def test_driver_sigkilled_during_train_resumes_from_checkpoint(first_run, address):
    root, cfg, _ = first_run
    longer = ["--set", "train.max_steps=30", "--set", "train.checkpoint_every=3", "--set", "train.log_every=3"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "workflows.cli", "run", str(cfg), *longer, "--address", address],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    # Kill the driver once Ray Train has registered a checkpoint (its snapshot lists one).
    before = set((root / "work" / "ray_train").glob("*"))
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = [d for d in (root / "work" / "ray_train").glob("*") if d not in before]
        snaps = [d / "checkpoint_manager_snapshot.json" for d in runs]
        if any(p.is_file() and "checkpoint_dir_name" in p.read_text() for p in snaps):
            break
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        time.sleep(0.3)
    else:
        pytest.fail("no checkpoint was registered in time")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    # A changed train section (max_steps) reruns train and what follows it, and reuses prepare.
    manifest = loraflow("run", str(cfg), *longer, address=address, cwd=root)
    assert statuses(manifest) == ["hit", "ran", "ran", "ran"]
    assert manifest["stages"]["train"]["outputs"]["metrics"]["resumed_from_step"] > 0


def test_evaluate_scores_a_registry_reference_against_the_base(first_run, address):
    root, cfg, _ = first_run
    before = set((root / "runs").iterdir())
    out = loraflow("evaluate", str(cfg), "--adapter", "e2e@champion", address=address, cwd=root)
    models = out["metrics"]["models"]
    assert {"base", "new"} <= set(models) and models["new"]["rows"] == models["base"]["rows"] > 0
    assert Path(out["dir"], "metrics.json").is_file()
    (run,) = set((root / "runs").iterdir()) - before  # its log and manifest kept under one run id
    assert (run / "run.log").is_file() and (run / "manifest.json").is_file()

"""The DAG end to end through the CLI on a tiny model: run, cache hits, reruns, resume after SIGKILL.

Each `loraflow` call is a real subprocess (a new driver) joined to the session's Ray cluster with
`--address`, so the tests exercise exactly what a user runs, without paying a cluster start per call.
"""

from __future__ import annotations

import itertools
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


def demo_config(root: Path) -> Path:
    """configs/demo.yaml on the tiny model, cut in size: its first 400 rows (copied into `root`: a test
    edits them; 8 held out), 4 of its 24 generated answers of 8 tokens; its 36 steps and progress
    line every 4 as shipped. Every output goes under `root`."""
    with open(REPO / "data" / "demo" / "extraction.jsonl") as src:
        (root / "rows.jsonl").write_text("".join(itertools.islice(src, 400)))
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["model"] = {"name": "tiny-llama", "dtype": "float32"}
    cfg["data"]["source"] = "rows.jsonl"
    cfg["eval"]["generation"].update(num_prompts=4, max_new_tokens=8)
    cfg["registry"]["root"] = str(root / "registry")
    cfg["registry"]["gate"] = {"metric": "loss"}  # a tiny random model matches no answer, before or after
    cfg["cluster"] = {"work_dir": str(root / "work"), "runs_dir": str(root / "runs")}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, address):
    """The demo, cut in size, as a user runs it, console and all: the console test reads what it
    printed, the cache and rerun tests start from it."""
    root = tmp_path_factory.mktemp("e2e")
    cfg = demo_config(root)
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "run", str(cfg), "--address", address],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (manifest,) = (json.loads(p.read_text()) for p in (root / "runs").glob("*/manifest.json"))
    return root, cfg, manifest, proc


def test_full_run_executes_every_stage_and_registers_a_champion(first_run):
    root, _, manifest, _ = first_run
    assert statuses(manifest) == ["ran"] * 4
    reg = manifest["stages"]["register"]["outputs"]
    assert reg["name"] == "demo" and reg["version"] == 1 and reg["decision"]["promote"] is True
    assert (Path(manifest["stages"]["train"]["outputs"]["adapter"]) / "adapter_config.json").is_file()
    run_dir = root / "runs" / manifest["run_id"]
    assert json.loads((run_dir / "manifest.json").read_text())["run_id"] == manifest["run_id"]
    assert (run_dir / "report.md").is_file() and (run_dir / "loss.png").is_file()


def test_the_demo_prints_at_most_40_lines_and_logs_everything(first_run):
    """The console shows the stage banners, the rank-0 progress lines and the summary; the rest
    goes to the run log."""
    root, _, manifest, proc = first_run
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    progress = [line for line in lines if line.startswith("[train] step")]
    assert [line.split()[2] for line in progress] == [f"{s}/36" for s in range(4, 37, 4)]
    assert not any("Reporting training result" in line or "LOAD REPORT" in line or "pid=" in line for line in lines)
    assert "RayTrainWorker" in (root / "runs" / manifest["run_id"] / "run.log").read_text()


def test_second_run_hits_every_stage_without_starting_ray(first_run, address):
    root, cfg, *_ = first_run
    manifest = loraflow("run", str(cfg), address=address, cwd=root)
    assert statuses(manifest) == ["hit"] * 4
    assert manifest["ray_started"] is False


def test_from_evaluate_reruns_a_complete_stage_and_replaces_it(first_run, address):
    root, cfg, first, _ = first_run
    manifest = loraflow("run", str(cfg), "--from", "evaluate", address=address, cwd=root)
    assert statuses(manifest) == ["hit", "hit", "ran", "ran"]
    assert manifest["stages"]["evaluate"]["fingerprint"] == first["stages"]["evaluate"]["fingerprint"]
    # Same adapter content: the registry hands back the version it already has, no duplicate.
    assert manifest["stages"]["register"]["outputs"]["version"] == 1
    out = root / "work" / "evaluate"
    assert [d.name for d in out.iterdir()] == [first["stages"]["evaluate"]["fingerprint"]]  # nothing set aside
    assert (out / first["stages"]["evaluate"]["fingerprint"] / "_SUCCESS").is_file()


def test_dag_reports_cache_status_without_running(first_run, address):
    root, cfg, *_ = first_run
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "dag", str(cfg), "--json",
                           "--set", "train.lr=2e-3"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {r["stage"]: r for r in json.loads(proc.stdout)}
    assert rows["prepare"]["status"] == "hit" and rows["train"]["status"] == "miss"
    assert rows["train"]["why"] == "`train` section changed"


def test_edited_data_reruns_from_prepare(first_run, address):
    root, cfg, *_ = first_run
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
    root, cfg, *_ = first_run
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
    root, cfg, *_ = first_run
    before = set((root / "runs").iterdir())
    out = loraflow("evaluate", str(cfg), "--adapter", "demo@champion", address=address, cwd=root)
    models = out["metrics"]["models"]
    assert {"base", "new"} <= set(models) and models["new"]["rows"] == models["base"]["rows"] > 0
    assert Path(out["dir"], "metrics.json").is_file()
    (run,) = set((root / "runs").iterdir()) - before  # its log and manifest kept under one run id
    assert (run / "run.log").is_file() and (run / "manifest.json").is_file()

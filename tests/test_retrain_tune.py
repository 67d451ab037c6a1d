"""Scheduled retraining, through the CLI on a tiny model (Ray Tune sweeps: tests/test_tune.py; a
warm-start retrain that is promoted with its lineage: tests/test_isolated_nodes.py).

Every `loraflow` call is a real subprocess joined to the session's Ray cluster (`--address`).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from workflows.registry.sqlite import Registry

pytestmark = pytest.mark.train_group

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
from make_demo_data import make_row  # noqa: E402


def append_rows(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "a") as f:
        f.writelines(json.dumps(make_row(rng)) + "\n" for _ in range(n))


def write_config(root: Path, **extra) -> Path:
    cfg = {
        "model": {"name": "tiny-llama"},
        "data": {"source": "rows.jsonl", "format": "instruction", "max_seq_len": 128, "eval_fraction": 0.1},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"num_workers": 1, "batch_size": 4, "lr": 5e-3, "max_steps": 8, "log_every": 4},
        "eval": {"batch_size": 8},
        "registry": {"root": str(root / "registry"), "name": "nightly", "gate": {"metric": "loss"}},
        "cluster": {"work_dir": str(root / "work"), "runs_dir": str(root / "runs")},
        **extra,
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str, cwd: Path, address: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "workflows.cli", *args, "--json"] + (["--address", address] if address else [])
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def address(ray_address) -> str:
    return ray_address


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, address):
    """Two `retrain` processes started at once on a fresh registry: one runs, one exits."""
    root = tmp_path_factory.mktemp("retrain")
    append_rows(root / "rows.jsonl", 160, seed=1)
    cfg = write_config(root)
    argv = [sys.executable, "-m", "workflows.cli", "retrain", str(cfg), "--json", "--address", address]
    procs = [subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    return root, cfg, results


def test_two_concurrent_retrains_run_once(nightly):
    root, _, results = nightly
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 4], [r[2][-2000:] for r in results]
    loser = next(r for r in results if r[0] == 4)
    assert "another `loraflow retrain` is running" in loser[2]
    winner = json.loads(next(r for r in results if r[0] == 0)[1])
    assert winner["status"] == "promoted" and winner["champion_after"] == "nightly:1"
    assert len(list((root / "runs").iterdir())) == 1


def test_unchanged_data_exits_with_no_change_without_ray_or_any_stage(nightly):
    root, cfg, _ = nightly
    # No --address and -X importtime: the "no change" path must not even import ray.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "workflows.cli", "retrain", str(cfg), "--json"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "no-change" and out["champion_before"] == "nightly:1"
    assert not any(line.rstrip().endswith("| ray") for line in proc.stderr.splitlines())
    assert len(list((root / "runs").iterdir())) == 1  # no new run


def test_a_worse_adapter_keeps_the_champion_and_the_decision_is_recorded(nightly, address):
    root, cfg, _ = nightly
    append_rows(root / "rows.jsonl", 40, seed=3)  # changed data: the retrain runs
    out = json.loads(cli("retrain", str(cfg), "--set", "train.lr=3.0", cwd=root, address=address).stdout)
    assert out["status"] == "kept-champion" and out["champion_before"] == "nightly:1", out
    reg = Registry(root / "registry")
    assert reg.alias_version("nightly", "champion") == 1
    decisions = reg.decisions("nightly", 2)
    assert decisions and decisions[-1]["promote"] is False

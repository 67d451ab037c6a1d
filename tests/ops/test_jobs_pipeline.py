"""`loraflow submit` end to end: the tiny pipeline runs as a Ray Job on a private head and lands
in the registry; only that head is stopped afterwards."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from workflows.ops import jobs
from workflows.ops.local_cluster import private_head
from workflows.registry.sqlite import Registry

pytestmark = pytest.mark.train_group

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "data"))
from make_demo_data import make_row  # noqa: E402


def test_submitted_pipeline_registers_a_champion(tmp_path):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    rng = random.Random(3)
    (project / "rows.jsonl").write_text("".join(json.dumps(make_row(rng)) + "\n" for _ in range(120)))
    outputs = tmp_path / "cluster-storage"  # the cluster runs on this machine: local paths are shared
    config = project / "configs" / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "tiny-llama"},
        "data": {"source": "../rows.jsonl", "format": "instruction", "max_seq_len": 128, "eval_fraction": 0.1},
        "lora": {"r": 4, "alpha": 8},
        "train": {"num_workers": 1, "batch_size": 4, "max_steps": 3, "log_every": 1},
        "registry": {"root": str(outputs / "registry"), "name": "jobbed"},
        "cluster": {"work_dir": str(outputs / "work"), "runs_dir": str(outputs / "runs")},
    }))
    log = io.StringIO()
    with private_head(num_cpus=4, auth_mode="disabled") as head:
        outcome = jobs.submit(config, head.dashboard_url, working_dir=project, out=log, timeout=600)
        processes = head.processes()
    assert outcome.status == "SUCCEEDED" and outcome.exit_code == 0, log.getvalue()[-3000:]
    assert "==> [train] running" in log.getvalue()  # the job's own output was followed
    reg = Registry(outputs / "registry")
    assert reg.alias_version("jobbed", "champion") == 1
    assert (reg.resolve("jobbed@champion") / "adapter_model.safetensors").is_file()
    assert processes and not any(p.is_running() for p in processes)

"""Session-wide test environment: a temporary HOME and cache, Ray settings, one Ray cluster.

Environment variables are set at import time, before any test module imports ray or
transformers, so every process the tests start (Ray workers, CLI subprocesses) inherits them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="loraflow-tests-"))

os.environ["HOME"] = str(_SESSION_TMP / "home")
os.environ.setdefault("LORAFLOW_CACHE", str(_SESSION_TMP / "cache"))
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_DEDUP_LOGS"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
Path(os.environ["HOME"]).mkdir(parents=True, exist_ok=True)


@pytest.fixture(scope="session")
def example_data() -> Path:
    """The real data sets shipped in the repository (GSM8K, SGD dialogues, Banking77): `data/`."""
    return REPO / "data"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session: 4 logical CPUs so Train workers leave room
    for Ray Data on a 2-core machine. Dashboard off (job tests start their own head)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a new cluster, never one some other process left running here.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'train'}"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP

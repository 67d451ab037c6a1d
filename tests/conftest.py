"""Session-wide test environment: a temporary HOME and cache, Ray settings, one Ray cluster.

Environment variables are set at import time, before any test module imports ray or
transformers, so every process the tests start (Ray workers, CLI subprocesses) inherits them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

REPO = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="loraflow-tests-"))

os.environ["HOME"] = str(_SESSION_TMP / "home")
# Workers of one `pytest -n` run (`make test-fast`) share one model cache (built under a file lock),
# so that SmolLM2's conversion runs once per run, not once per worker.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault("LORAFLOW_CACHE", str(Path(tempfile.gettempdir()) / f"loraflow-tests-run-{_RUN}" / "cache"
                                            if _RUN else _SESSION_TMP / "cache"))
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
# Ray Train 2.60 starts a preemption-watcher actor (a process) for every run, for spot nodes that
# Ray is told will drain; no test drains a node (node loss is a killed node), so it would only cost
# a process start per Train run.
os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
# Ray Train's own Prometheus gauges (controller and workers): no test reads them.
os.environ["RAY_TRAIN_METRICS_ENABLED"] = "0"
os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_DEDUP_LOGS"] = "0"
# Ray's log monitor globs the logs folder every 0.1 s while it holds under this many files; the
# suite starts hundreds of worker processes (each with its log files), so that glob cost each
# session's monitor ~20 CPU-seconds. At 0 it re-lists every 0.5 s (Ray's LOG_NAME_UPDATE_INTERVAL_S).
os.environ["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
Path(os.environ["HOME"]).mkdir(parents=True, exist_ok=True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two pytest workers share the machine's cores with their Ray clusters: torch in this process
    # (the in-process tests) on one thread, as Ray gives each 1-CPU worker, instead of one per core
    # (measured on tests/lora_core: 66 against 77 CPU-seconds).
    import torch

    torch.set_num_threads(1)


# The modules with the longest tests among those that start no Train group (`make test-fast`'s
# --durations: the 100k-row prepare, the real-model and evaluate modules), handed out right after the
# train_group ones so that the many short modules even out the two workers' ends.
LONG_MODULES = ("prepare/test_prepare_stage.py", "lora_core/test_lora_real_models.py",
                "evaluate/test_evaluate_stage.py", "evaluate/test_generation.py", "test_models.py",
                "test_cli_console.py", "test_shards.py")


def pytest_collection_modifyitems(config, items):
    """The modules that start Ray Train groups or pipelines (`train_group`) first, then the other long
    ones, each module's tests kept together and in order. `make test` and `make test-fast` hand whole
    modules to two pytest-xdist workers (`--dist loadfile`), one at a time as each finishes: the long
    ones handed out first, the many short ones then even out the two workers' ends."""
    heavy = {item.path for item in items if item.get_closest_marker("train_group")}
    long = {item.path for item in items if item.path.relative_to(REPO / "tests").as_posix() in LONG_MODULES}
    items.sort(key=lambda item: 0 if item.path in heavy else 1 if item.path in long else 2)  # stable


@pytest.fixture(scope="session")
def example_data() -> Path:
    """The real data sets shipped in the repository (GSM8K, SGD dialogues, Banking77): `data/`."""
    return REPO / "data"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole session: 4 logical CPUs so Train workers leave room
    for Ray Data on a 2-core machine, and one logical GPU, so that what requests GPUs can be checked
    against what Ray assigns (torch sees no GPU here: the work itself runs on the CPU). Dashboard
    off (job tests start their own head)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a new cluster, never one some other process left running here.
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'train'}"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    """The session cluster's address: CLI subprocesses join it with `--address` instead of starting one."""
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


# ---- a local S3 server (moto) --------------------------------------------------------------------

from s3_support import BUCKET, S3, free_port  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a free port (one per session), with AWS_* pointing this process and its
    children at it; `S3` reads and records what reaches it."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    recording = tmp_path_factory.mktemp("moto") / "recording.jsonl"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "MOTO_RECORDER_FILEPATH": str(recording)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(endpoint.rsplit(":", 1)[1]), verbose=False)
    server.start()
    pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(BUCKET)
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    yield S3(endpoint, fs, recording)
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

"""What a user sees: one clear line for a failure they can fix, a report anyway (the demo's quiet
console: tests/test_pipeline_e2e.py, whose first run is the demo)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def loraflow(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, **(env or {})})


def write_config(tmp_path: Path, data: dict, **extra) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny-llama"}, "data": data,
                                    "cluster": {"work_dir": str(tmp_path / "work"), "runs_dir": str(tmp_path / "runs")},
                                    "registry": {"root": str(tmp_path / "registry")}, **extra}))
    return path


@pytest.mark.parametrize("case", ["bad config", "missing file", "bad data", "unreachable store"])
def test_a_failure_the_user_can_fix_is_one_line_without_a_traceback(case, ray_address, tmp_path):
    env, code = {}, 2
    if case == "bad config":
        config, message = write_config(tmp_path, {"source": "rows.jsonl", "format": "instruction"},
                                       train={"lerning_rate": 1}), "train.lerning_rate: unknown key"
    elif case == "missing file":
        config, message = write_config(tmp_path, {"source": "nope.jsonl", "format": "instruction"}), "no such file"
    elif case == "bad data":
        config = write_config(tmp_path, {"source": str(FIXTURES / "chat_broken.jsonl"), "format": "chat",
                                         "max_seq_len": 64, "truncate": False})
        message, code = "9 of 13 rows (69.2%) were rejected", 1
    else:
        from s3_support import free_port

        config = write_config(tmp_path, {"source": "rows.jsonl", "format": "instruction"})
        config.write_text(config.read_text().replace(str(tmp_path / "work"), "s3://loraflow-test/work"))
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "x",
               "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
        message = "s3://loraflow-test/work: cannot reach the store"
    proc = loraflow("run", str(config), "--address", ray_address, cwd=tmp_path, env=env)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [i for i, line in enumerate(proc.stderr.splitlines()) if line.startswith("error: ")]
    assert len(errors) == 1 and message in "\n".join(proc.stderr.splitlines()[errors[0]:]), proc.stderr[-3000:]
    if case == "bad data":  # a failed run still writes its report
        (report,) = (tmp_path / "runs").glob("*/report.md")
        text = report.read_text()
        assert "## Failed" in text and "stage **prepare**: PrepareError: 9 of 13 rows" in text
        assert ".rejects" in text  # where the rejected rows are kept
        assert f"loraflow run {config}" in text  # the command that resumes
        assert (report.parent / "run.log").read_text().count("Traceback") == 1  # the details, in the log only
        assert f"details: {report.parent / 'run.log'}" in proc.stderr


def test_the_console_pump_drains_the_pipe_when_the_log_cannot_be_written(tmp_path):
    """A full disk must not stop the reader: the run's writers would block on a full pipe."""
    import io

    from workflows.cli.console import Console

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    lines = [b"(RayTrainWorker pid=1) noise %d\n" % i for i in range(5000)] + [b"==> [train] done\n"]
    source, console = io.BytesIO(b"".join(lines)), io.BytesIO()
    pump = Console(tmp_path / "run.log")
    pump._pump(source, console, FullDisk())
    assert source.read() == b"" and console.getvalue() == b"==> [train] done\n" and pump.lines_shown == 1


def test_a_line_behind_a_relayed_progress_bars_cursor_moves_is_still_shown():
    from workflows.cli.console import shown

    assert shown("\x1b[A\x1b[2K\rTrain: 40%|####  | 2/5\r==> [evaluate] running") == "==> [evaluate] running"
    assert shown("\x1b[1m\x1b[36m(TrainController pid=7)\x1b[0m [train] step 4/8") == "[train] step 4/8"
    assert shown("Train: 40%|####  | 2/5\x1b[A") is None

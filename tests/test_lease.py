"""The run lease on S3 (moto's real S3 API) under injected faults: a stalled PUT, a lost reply, a
skewed clock, a released or unreadable lease object, a failed DELETE. Time is a fake monotonic
clock the tests move, so nothing here waits for a ttl."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from botocore.exceptions import ClientError

from workflows.artifacts import SUCCESS, LockHeldError
from workflows.lease import MARGIN, S3Lease
from workflows.storage import WorkStore, committed_dir

sys.path.insert(0, str(Path(__file__).parent))
from s3_support import BUCKET  # noqa: E402

TTL = 30.0


class Clock:
    """A monotonic clock that moves only when slept on; `on_sleep` runs at every sleep (what the
    other driver does meanwhile)."""

    def __init__(self, on_sleep=lambda: None):
        self.t, self.on_sleep, self.slept = 1000.0, on_sleep, 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        self.slept += seconds
        self.on_sleep()


def lease(s3, prefix: str, run_id: str, clock: Clock | None = None, wall_offset: float = 0.0, client=None) -> S3Lease:
    held = S3Lease(WorkStore.open(s3.uri(prefix)), run_id, ttl_s=TTL, client=client)
    clock = clock or Clock()
    held.clock, held.sleep, held.wall = clock, clock.sleep, lambda: time.time() + wall_offset
    return held


def body(s3, prefix: str) -> dict:
    with s3.fs.open_input_stream(f"{BUCKET}/{prefix}/.lease") as f:
        return json.loads(f.read())


class Faulty:
    """The real boto3 client with one call replaced."""

    def __init__(self, client, **replaced):
        self._client, self._replaced = client, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._client, name)


def precondition_failed(**_):
    raise ClientError({"Error": {"Code": "PreconditionFailed", "Message": "At least one of the pre-conditions "
                                                                          "you specified did not hold"}}, "DeleteObject")


def lost_reply(client):
    """A PUT that lands but whose reply is lost, so the SDK sends it again: the retry meets 412."""
    def put_object(**kwargs):
        client.put_object(**kwargs)
        return client.put_object(**kwargs)
    return put_object


def test_a_stalled_renewal_fails_the_check_before_another_driver_could_take_over(s3):
    clock, stalled = Clock(), threading.Event()
    holder = lease(s3, "stalled", "holder", clock)
    holder.acquire()
    real = holder.client
    holder.client = Faulty(real, put_object=lambda **kw: stalled.wait() and real.put_object(**kw))
    renewal = threading.Thread(target=holder.renew_once)  # the renewal thread, stuck in its PUT
    renewal.start()
    clock.t += TTL * (1 - MARGIN) - 1
    holder.check()  # still inside the ttl less the margin
    clock.t += 2
    with pytest.raises(LockHeldError, match="not renewed for"):
        holder.check()
    stalled.set()
    renewal.join()


def test_client_timeouts_and_retries_stay_under_a_third_of_the_ttl(s3):
    config = lease(s3, "timeouts", "holder").client.meta.config
    attempts = config.retries["total_max_attempts"]
    assert attempts * (config.connect_timeout + config.read_timeout) < TTL / 3


def test_a_renewal_whose_reply_was_lost_is_recognised_as_ours(s3):
    holder = lease(s3, "lost-renewal", "holder")
    holder.acquire()
    real = holder.client
    holder.client = Faulty(real, put_object=lost_reply(real))
    holder.renew_once()
    holder.check()
    assert holder.lost is None
    holder.client = real
    holder.renew_once()  # the ETag adopted from the read is the object's: the next If-Match holds
    assert holder.lost is None and body(s3, "lost-renewal")["run_id"] == "holder"


def test_an_acquiring_write_whose_reply_was_lost_is_recognised_as_ours(s3):
    holder = lease(s3, "lost-acquire", "holder")
    holder.client = Faulty(holder.client, put_object=lost_reply(holder.client))
    holder.acquire()
    assert body(s3, "lost-acquire")["nonce"] == holder.nonce


def test_a_taker_whose_clock_runs_an_hour_ahead_does_not_take_a_live_lease(s3):
    holder = lease(s3, "skewed", "holder")
    holder.acquire()
    taker = lease(s3, "skewed", "taker", Clock(on_sleep=holder.renew_once), wall_offset=3600)
    with pytest.raises(LockHeldError, match="holder renewed it"):
        taker.acquire()
    holder.check()
    assert body(s3, "skewed")["run_id"] == "holder"


def test_a_dead_lease_is_taken_over_only_after_its_etag_stayed_unchanged_for_the_ttl(s3):
    lease(s3, "dead", "dead", wall_offset=-3600).acquire()  # expired, and nobody renews it
    clock = Clock()
    taker = lease(s3, "dead", "taker", clock)
    taker.acquire()
    assert clock.slept >= TTL
    assert body(s3, "dead")["run_id"] == "taker"


def test_a_lease_object_that_is_not_json_is_taken_over_after_the_ttl(s3):
    s3.put("garbled/.lease", b"\x00not json")
    taker = lease(s3, "garbled", "taker")
    taker.acquire()
    assert body(s3, "garbled")["run_id"] == "taker"


def test_a_lease_released_between_the_refused_write_and_the_read_is_created_afresh(s3):
    holder = lease(s3, "released", "holder")
    holder.acquire()
    taker = lease(s3, "released", "taker")
    real = taker.client
    reads = []

    def get_object(**kwargs):
        if not reads:  # the holder releases just before the taker reads
            holder.release()
        reads.append(kwargs)
        return real.get_object(**kwargs)

    taker.client = Faulty(real, get_object=get_object)
    taker.acquire()
    assert body(s3, "released")["run_id"] == "taker"


def test_a_failed_conditional_delete_is_reported(s3, capsys):
    holder = lease(s3, "undeleted", "holder")
    holder.acquire()
    holder.client = Faulty(holder.client, delete_object=precondition_failed)
    holder.release()
    assert "was not released" in holder.release_error and "PreconditionFailed" in holder.release_error


def test_a_lost_lease_stops_a_publish_before_it_writes(s3, tmp_path):
    from workflows.dag import StageRun

    store = WorkStore.open(s3.uri("publish-checked"))
    (store.local_of("train", "fp")).mkdir(parents=True)
    (store.local_of("train", "fp") / SUCCESS).write_text("{}")

    def lost():
        raise LockHeldError("lease lost")

    run = StageRun(SimpleNamespace(layout=SimpleNamespace(store=store)), SimpleNamespace(name="train", fingerprint="fp"),
                   {}, "run", lost)
    with pytest.raises(LockHeldError):
        run.publish()
    assert s3.keys("publish-checked/train") == []


def test_a_lost_lease_stops_the_prepare_commit(s3):
    def lost():
        raise LockHeldError("lease lost")

    with pytest.raises(LockHeldError), committed_dir(s3.uri("prepare-checked/prepare/fp"), lost) as root:
        assert root.startswith("s3://")
    assert f"prepare-checked/prepare/fp/{SUCCESS}" not in s3.keys("prepare-checked")


def test_the_best_trial_of_a_sweep_is_committed_only_under_the_lease(s3, tmp_path):
    from workflows.config import config_from_dict
    from workflows.tune import commit_best_trial_leased

    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    config = config_from_dict({"data": {"source": str(tmp_path / "rows.jsonl"), "format": "instruction"},
                               "cluster": {"work_dir": s3.uri("tuned-leased"), "runs_dir": str(tmp_path / "runs")}})
    other = lease(s3, "tuned-leased", "another-driver")
    other.acquire()
    with pytest.raises(LockHeldError, match="another-driver"):
        commit_best_trial_leased(config, str(tmp_path / "no-trial"), "tune-run")
    assert s3.keys("tuned-leased/train") == []


def test_a_driver_whose_lease_was_taken_over_stops_and_leaves_the_new_holders_lease_alone(s3):
    first = lease(s3, "stolen", "first")
    first.acquire()
    first.check()  # held
    s3.put("stolen/.lease", json.dumps({"run_id": "second", "expires": time.time() + 60}).encode())
    first.renew_once()  # its If-Match fails: another driver wrote the object
    with pytest.raises(LockHeldError, match="another driver took it over"):
        first.check()
    first.release()
    assert body(s3, "stolen")["run_id"] == "second"  # not deleted by the driver that lost it


def test_a_run_whose_lease_is_lost_mid_run_keeps_its_manifest_report_and_log(tmp_path):
    from workflows.artifacts import atomic_write_json
    from workflows.cli.commands import _run_console
    from workflows.config import config_from_dict

    config = config_from_dict({"data": {"source": "rows.jsonl", "format": "text"},
                               "cluster": {"runs_dir": str(tmp_path / "runs")}})
    with pytest.raises(LockHeldError), _run_console(SimpleNamespace(verbose=False), config) as run_id:
        run_dir = tmp_path / "runs" / run_id
        print("==> [prepare] running")
        atomic_write_json(run_dir / "manifest.json", {"stages": {"prepare": {"status": "ran"}}})
        (run_dir / "report.md").write_text("# run\n")
        raise LockHeldError("lease lost: another driver took it over")
    assert {p.name for p in run_dir.iterdir()} >= {"manifest.json", "report.md", "run.log"}


def test_a_run_refused_by_a_held_lease_leaves_no_run_directory(tmp_path):
    from workflows.cli.commands import _run_console
    from workflows.config import config_from_dict

    config = config_from_dict({"data": {"source": "rows.jsonl", "format": "text"},
                               "cluster": {"runs_dir": str(tmp_path / "runs")}})
    with pytest.raises(LockHeldError), _run_console(SimpleNamespace(verbose=False), config) as run_id:
        raise LockHeldError("another loraflow run holds the work directory's lease")
    assert not (tmp_path / "runs" / run_id).exists()

"""Run loraflow on a Ray cluster as a Ray Job: submit, follow, status, logs, stop.

`submit(config, address)` turns a pipeline config into the job `loraflow run <config>` whose
runtime env ships the working directory (code + config). Before anything is submitted it checks
that every input the config names can be reached from the cluster (`workflows.ops.submission`), so a
path that exists only on the submitting machine fails here, with a message, not an hour later in
a worker.

Token authentication: `workflows.ops.auth`.

Exit codes (`loraflow submit` and `loraflow jobs`): SUCCEEDED → 0; FAILED → the driver's own exit
code (1 when it has none, 128+N when signal N killed it); STOPPED → `EXIT_STOPPED` (143, as for
the SIGTERM Ray sends a stopped driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import psutil

from workflows.ops.auth import AuthError, auth_failure_message, auth_headers, open_url
from workflows.ops.submission import (
    DEFAULT_SHIP_LIMIT_BYTES,
    plan_submission,
)

EXIT_STOPPED = 143
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """A job request that cannot be made: unreachable server, auth, unknown job. The message says why."""


@dataclass(frozen=True)
class JobOutcome:
    """A job's state as the CLI reports it. `exit_code` is None while the job has not finished."""

    job_id: str
    status: str
    exit_code: int | None
    message: str | None = None


def exit_code_for(status: str, driver_exit_code: int | None) -> int | None:
    """The process exit code that stands for a job's outcome (None while it is not terminal)."""
    status = str(getattr(status, "value", status))
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return EXIT_STOPPED
    if status == "FAILED":
        if not driver_exit_code:  # None: the driver never ran (e.g. runtime env setup failed)
            return 1
        return 128 - driver_exit_code if driver_exit_code < 0 else min(driver_exit_code, 255)
    return None


# ---- the client ----

@contextlib.contextmanager
def _job_errors(address: str) -> Iterator[None]:
    """Turn Ray's connection and auth exceptions into JobsError messages a user can act on."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthError as e:  # no token where one is required
        raise JobsError(str(e)) from None
    except AuthenticationError as e:
        raise JobsError(auth_failure_message(address, e)) from None
    except ConnectionError as e:
        raise JobsError(f"cannot reach a Ray job server at {address} ({e}). Is the head running, and is this "
                        "its dashboard address (http://HOST:8265 by default)? cluster/README.md shows how "
                        "to start one.") from None


def connect(address: str):
    """A `JobSubmissionClient` for `address` that sends the auth token when there is one."""
    from ray.job_submission import JobSubmissionClient

    with _job_errors(address):
        return JobSubmissionClient(address, headers=auth_headers(address=address))


NODE_TABLE_WAIT_S = 60.0


def cluster_on_this_machine(address: str) -> bool:
    """Whether every node of the cluster runs on this machine, so local paths are visible to it.

    Asked of the cluster rather than read off the address: a remote dashboard reached through
    `kubectl port-forward` or `ray dashboard` is http://127.0.0.1:8265 too.
    """
    with _job_errors(address):
        headers = auth_headers(address=address)
    request = urllib.request.Request(f"{address.rstrip('/')}/nodes?view=summary", headers=headers)
    try:
        # A dashboard that just started fills its node table asynchronously: ask again for a while
        # (on a loaded 2-core machine 15 s was seen to fall short: the suite under pytest-xdist).
        deadline = time.monotonic() + NODE_TABLE_WAIT_S
        while True:
            with open_url(request, timeout=10) as r:
                nodes = json.load(r)["data"]["summary"]
            alive = [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]
            if alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise JobsError(auth_failure_message(address, e)) from None
        raise JobsError(f"the Ray dashboard at {address} answered {e.code} to a node query ({e.msg})") from None
    except (OSError, ValueError, KeyError) as e:
        raise JobsError(f"cannot reach a Ray job server at {address} ({e}). Is the head running, and is this "
                        "its dashboard address (http://HOST:8265 by default)?") from None
    # The node's host name and address as the GCS registered it (`raylet`), which the table holds as
    # soon as the node is ALIVE; the top-level `hostname` and `ip` come from the node's reporter agent
    # a moment later, and a node read before then looked remote (seen once in CI).
    own_ips = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return bool(alive) and all(n["raylet"].get("nodeManagerHostname") == socket.gethostname()
                               and n["raylet"].get("nodeManagerAddress") in own_ips for n in alive)


def _outcome(client, job_id: str) -> JobOutcome:
    info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    return JobOutcome(job_id, status, exit_code_for(status, info.driver_exit_code), info.message)


async def _print_log_stream(client, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_job(client, job_id: str, *, follow_logs: bool = True, out: TextIO | None = None,
                 poll_s: float = 0.5, timeout: float | None = None, drain_s: float = 5.0) -> JobOutcome:
    """Block until the job is terminal (printing its logs as they come when `follow_logs`), or raise
    TimeoutError once `timeout` seconds have passed. The job's status is polled beside the log stream:
    a stream that goes silent without closing (a dropped connection) cannot hold the wait, and once
    the job has ended the stream gets `drain_s` seconds to deliver its last lines."""
    out = out or sys.stdout
    deadline = None if timeout is None else time.monotonic() + timeout
    if follow_logs:
        return asyncio.run(_follow(client, job_id, out, poll_s, deadline, drain_s))
    while (outcome := _outcome(client, job_id)).status not in TERMINAL:
        _check_deadline(job_id, outcome, deadline)
        time.sleep(poll_s)
    return outcome


async def _follow(client, job_id: str, out: TextIO, poll_s: float, deadline: float | None,
                  drain_s: float) -> JobOutcome:
    stream = asyncio.ensure_future(_print_log_stream(client, job_id, out))
    try:
        while True:
            outcome = await asyncio.to_thread(_outcome, client, job_id)
            if outcome.status in TERMINAL:
                await asyncio.wait({stream}, timeout=drain_s)
                return outcome
            _check_deadline(job_id, outcome, deadline)
            if not stream.done():
                await asyncio.wait({stream}, timeout=poll_s)
                if stream.done() and stream.exception() is not None:  # broken off: the status decides
                    print(f"(log stream ended early: {stream.exception()}; waiting for the job)", file=out)
            else:
                await asyncio.sleep(poll_s)
    finally:
        stream.cancel()
        with contextlib.suppress(BaseException):
            await stream


def _check_deadline(job_id: str, outcome: JobOutcome, deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"job {job_id} still {outcome.status} when the wait's deadline passed; it keeps "
                           "running (`loraflow jobs status|logs|stop`)")


def submit_entrypoint(entrypoint: str, address: str, runtime_env: dict | None = None, wait: bool = True, *,
                      submission_id: str | None = None, metadata: dict[str, str] | None = None,
                      out: TextIO | None = None, timeout: float | None = None) -> JobOutcome:
    """Submit a shell command as a Ray Job. With `wait`, follow its logs to `out` and return the final
    outcome; otherwise return at once (status PENDING, exit_code None)."""
    out = out or sys.stdout
    client = connect(address)
    with _job_errors(address):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or {},
                                   submission_id=submission_id, metadata=metadata)
        print(f"submitted job {job_id} to {address}", file=out, flush=True)
        if not wait:
            return JobOutcome(job_id, "PENDING", None)
        try:
            outcome = wait_for_job(client, job_id, out=out, timeout=timeout)
        except KeyboardInterrupt:
            print(f"\nstopped following; job {job_id} keeps running "
                  f"(`loraflow jobs stop {job_id} --address {address}` stops it)", file=out)
            raise
    print(f"job {job_id} {outcome.status} (exit code {outcome.exit_code})"
          + (f": {outcome.message}" if outcome.status != "SUCCEEDED" and outcome.message else ""), file=out)
    return outcome


def submit(config_path: str | Path, address: str, *, overrides: Sequence[str] = (), wait: bool = True,
           working_dir: str | Path | None = None, env_vars: Mapping[str, str] | None = None,
           pip: Sequence[str] = (), shared_mounts: Sequence[str] = (), command: str = "run",
           ship_limit_bytes: int = DEFAULT_SHIP_LIMIT_BYTES, submission_id: str | None = None,
           out: TextIO | None = None, timeout: float | None = None) -> JobOutcome:
    """Submit `loraflow <command> <config>` as a Ray Job (see `workflows.ops.submission` for what is
    checked and shipped). Raises ConfigError / JobsError before submitting when it cannot run."""
    out = out or sys.stdout
    plan = plan_submission(config_path, address, local_cluster=cluster_on_this_machine(address), overrides=overrides, working_dir=working_dir,
                           env_vars=env_vars, pip=pip, shared_mounts=shared_mounts, command=command,
                           ship_limit_bytes=ship_limit_bytes)
    for note in plan.notes:
        print(f"note: {note}", file=out)
    return submit_entrypoint(plan.entrypoint, address, plan.runtime_env, wait, submission_id=submission_id,
                             metadata=plan.metadata, out=out, timeout=timeout)


def job_status(job_id: str, address: str) -> JobOutcome:
    client = connect(address)
    with _job_errors(address), _unknown_job(job_id, address):
        return _outcome(client, job_id)


def job_logs(job_id: str, address: str, *, follow: bool = False, out: TextIO | None = None) -> str:
    """The job's logs so far; with `follow`, stream them to `out` until the job ends."""
    client = connect(address)
    with _job_errors(address), _unknown_job(job_id, address):
        if follow:  # until the job ends, even if the stream goes silent without closing
            asyncio.run(_follow(client, job_id, out or sys.stdout, 0.5, None, 5.0))
            return ""
        return client.get_job_logs(job_id)


def stop_job(job_id: str, address: str, *, wait: bool = True, timeout: float = 60.0) -> JobOutcome:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL); with `wait`, return once it is terminal."""
    client = connect(address)
    with _job_errors(address), _unknown_job(job_id, address):
        client.stop_job(job_id)
        return wait_for_job(client, job_id, follow_logs=False, timeout=timeout) if wait else _outcome(client, job_id)


@contextlib.contextmanager
def _unknown_job(job_id: str, address: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise JobsError(f"no job {job_id!r} on {address} (`ray job list --address {address}` lists them)") from None
        raise

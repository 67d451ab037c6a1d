"""Run loraflow on a Ray cluster as a Ray Job: submit, follow, status, logs, stop.

`submit(config, address)` turns a pipeline config into the job `loraflow run <config>` whose
runtime env ships the working directory (code + config). Before anything is submitted it checks
that every input the config names can be reached from the cluster (`workflows.ops.submission`), so a
path that exists only on the submitting machine fails here, with a message, not an hour later in
a worker.

Token authentication (Ray 2.60): a cluster started with `RAY_AUTH_MODE=token` rejects requests
without its token. The client reads the token the way Ray does (`RAY_AUTH_TOKEN`, the file named by
`RAY_AUTH_TOKEN_PATH`, `~/.ray/auth_token`) and sends it whenever it finds one, unless
`RAY_AUTH_MODE=disabled`, so a first submit works without exporting anything; when the cluster
still refuses, the error says where the token comes from.

Exit codes (`loraflow submit` and `loraflow jobs`): SUCCEEDED → 0; FAILED → the driver's own exit
code (1 when it has none, 128+N when signal N killed it); STOPPED → `EXIT_STOPPED` (143, as for
the SIGTERM Ray sends a stopped driver).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from workflows.config import ConfigError
from workflows.ops.submission import (
    COMMANDS,
    DEFAULT_SHIP_LIMIT_BYTES,
    SubmissionPlan,
    UnreachableInputError,
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


# ---- token authentication ----

def auth_token(env: Mapping[str, str] = os.environ) -> str | None:
    """The Ray auth token this client has, looked up in Ray's order; None when there is none."""
    if env.get("RAY_AUTH_TOKEN", "").strip():
        return env["RAY_AUTH_TOKEN"].strip()
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or Path(env.get("HOME", "~")).expanduser() / ".ray" / "auth_token")
    if path.is_file() and (token := path.read_text().strip()):
        return token
    return None


def auth_headers(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """HTTP headers for the job server: the bearer token unless RAY_AUTH_MODE=disabled."""
    mode = env.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return {}
    token = auth_token(env)
    if token:
        return {"Authorization": f"Bearer {token}"}
    if mode == "token":
        raise JobsError("RAY_AUTH_MODE=token but no Ray auth token was found: export RAY_AUTH_TOKEN, point "
                        "RAY_AUTH_TOKEN_PATH at a token file, or save the cluster's token to ~/.ray/auth_token "
                        "(`ray get-auth-token` on the head prints it; on KubeRay it is in the Secret named "
                        "by authOptions).")
    return {}


def _auth_failure_message(address: str, error: Exception) -> str:
    sent = auth_token() is not None and os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled"
    problem = ("rejected the token this client sent (it is not the cluster's token)" if sent
               else "requires token authentication and this client has no token")
    return (f"the Ray cluster at {address} {problem}.\n"
            "  Get the cluster's token: `ray get-auth-token` on the head node (KubeRay: the Secret named by\n"
            "  spec.authOptions), then save it to ~/.ray/auth_token, or export RAY_AUTH_TOKEN=<token>, or\n"
            "  RAY_AUTH_TOKEN_PATH=<file>. A cluster started with RAY_AUTH_MODE=disabled needs none.\n"
            f"  (Ray said: {str(getattr(error, 'message', error)).splitlines()[0]})")


# ---- the client ----

@contextlib.contextmanager
def _job_errors(address: str) -> Iterator[None]:
    """Turn Ray's connection and auth exceptions into JobsError messages a user can act on."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise JobsError(_auth_failure_message(address, e)) from None
    except ConnectionError as e:
        raise JobsError(f"cannot reach a Ray job server at {address} ({e}). Is the head running, and is this "
                        "its dashboard address (http://HOST:8265 by default)? cluster/README.md shows how "
                        "to start one.") from None


def connect(address: str):
    """A `JobSubmissionClient` for `address` that sends the auth token when there is one."""
    from ray.job_submission import JobSubmissionClient

    with _job_errors(address):
        return JobSubmissionClient(address, headers=auth_headers())


def cluster_on_this_machine(address: str) -> bool:
    """Whether every node of the cluster runs on this machine, so local paths are visible to it.

    Asked of the cluster rather than read off the address: a remote dashboard reached through
    `kubectl port-forward` or `ray dashboard` is http://127.0.0.1:8265 too.
    """
    import psutil

    request = urllib.request.Request(f"{address.rstrip('/')}/nodes?view=summary", headers=auth_headers())
    try:
        # A dashboard that just started fills its node table asynchronously: ask again for a while.
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(request, timeout=10) as r:
                nodes = json.load(r)["data"]["summary"]
            alive = [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]
            if alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise JobsError(_auth_failure_message(address, e)) from None
        raise JobsError(f"the Ray dashboard at {address} answered {e.code} to a node query") from None
    except (OSError, ValueError, KeyError) as e:
        raise JobsError(f"cannot reach a Ray job server at {address} ({e}). Is the head running, and is this "
                        "its dashboard address (http://HOST:8265 by default)?") from None
    own_ips = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return bool(alive) and all(n.get("hostname") == socket.gethostname() and n.get("ip") in own_ips for n in alive)


def _outcome(client, job_id: str) -> JobOutcome:
    info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    return JobOutcome(job_id, status, exit_code_for(status, info.driver_exit_code), info.message)


async def _print_log_stream(client, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_job(client, job_id: str, *, follow_logs: bool = True, out: TextIO | None = None,
                 poll_s: float = 0.5, timeout: float | None = None) -> JobOutcome:
    """Block until the job is terminal (printing its logs as they come when `follow_logs`)."""
    if follow_logs:
        try:
            asyncio.run(_print_log_stream(client, job_id, out or sys.stdout))
        except RuntimeError as e:  # the log stream broke off; the job's state is still authoritative
            print(f"(log stream ended early: {e}; waiting for the job)", file=out or sys.stdout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while (outcome := _outcome(client, job_id)).status not in TERMINAL:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {outcome.status} after {timeout:.0f}s")
        time.sleep(poll_s)
    return outcome


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
        if follow:
            asyncio.run(_print_log_stream(client, job_id, out or sys.stdout))
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


# ---- CLI pieces registered by workflows/cli.py ----

def _default_address() -> str | None:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")


def _add_address(parser: argparse.ArgumentParser) -> None:
    default = _default_address()
    parser.add_argument("--address", default=default, required=default is None,
                        help="the cluster's job server, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `loraflow submit CONFIG --address URL ...`."""
    parser.add_argument("config", help="pipeline YAML (inside the working directory)")
    _add_address(parser)
    parser.add_argument("--no-wait", dest="wait", action="store_false",
                        help="print the job id and return instead of following the logs")
    parser.add_argument("--working-dir", help="directory shipped to the cluster (default: the current one)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="env var for the job (repeatable)")
    parser.add_argument("--pip", action="append", default=[], metavar="PKG", help="extra pip package (repeatable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. train.lr=1e-4 (repeatable)")
    parser.add_argument("--shared-mount", dest="shared_mounts", action="append", default=[], metavar="DIR",
                        help="a directory mounted at the same path on every cluster node (repeatable; "
                             "also $LORAFLOW_SHARED_MOUNTS)")
    parser.add_argument("--command", choices=COMMANDS, default="run",
                        help="the loraflow command the job runs (default: run; validate and dag are dry runs)")
    parser.add_argument("--ship-limit-mb", type=float, default=DEFAULT_SHIP_LIMIT_BYTES / 2**20,
                        help="largest total of local input data shipped with the working dir (default: %(default)s)")
    parser.add_argument("--submission-id", help="job id to use (default: generated by Ray)")


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `loraflow jobs status|logs|stop JOB_ID --address URL`."""
    parser.add_argument("action", choices=["status", "logs", "stop"])
    parser.add_argument("job_id")
    _add_address(parser)
    parser.add_argument("--follow", action="store_true", help="logs: stream until the job ends")


def _parse_env(items: Sequence[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    try:
        outcome = submit(args.config, args.address, overrides=args.overrides, wait=args.wait,
                         working_dir=args.working_dir, env_vars=_parse_env(args.env), pip=args.pip,
                         shared_mounts=args.shared_mounts, command=args.command,
                         ship_limit_bytes=int(args.ship_limit_mb * 2**20), submission_id=args.submission_id)
    except (ConfigError, JobsError, UnreachableInputError) as e:
        print(f"loraflow submit: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return outcome.exit_code or 0


def cmd_jobs(args: argparse.Namespace) -> int:
    try:
        if args.action == "logs":
            sys.stdout.write(job_logs(args.job_id, args.address, follow=args.follow))
            if not args.follow:
                return 0
            return job_status(args.job_id, args.address).exit_code or 0
        outcome = (job_status if args.action == "status" else stop_job)(args.job_id, args.address)
    except JobsError as e:
        print(f"loraflow jobs: {e}", file=sys.stderr)
        return 2
    code = "" if outcome.exit_code is None else f" (exit code {outcome.exit_code})"
    print(f"{outcome.job_id} {outcome.status}{code}" + (f": {outcome.message}" if outcome.message else ""))
    if args.action == "stop":
        return 0 if outcome.status in TERMINAL else 1
    return outcome.exit_code or 0


__all__ = [
    "EXIT_STOPPED", "JobOutcome", "JobsError", "SubmissionPlan", "add_jobs_arguments", "add_submit_arguments",
    "auth_headers", "auth_token", "cluster_on_this_machine", "cmd_jobs", "cmd_submit", "connect", "exit_code_for", "job_logs",
    "job_status", "plan_submission", "UnreachableInputError", "stop_job", "submit", "submit_entrypoint", "wait_for_job",
]

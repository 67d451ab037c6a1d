"""One driver at a time per work directory, across machines: the run lease.

A local work directory is guarded by an advisory file lock (`artifacts.file_lock`). A work
directory on S3 is guarded by a lease object, `<work>/.lease`, that only one driver can create:

- acquire: create it with a conditional write (`If-None-Match: *`); the store refuses a second one.
- renew: a thread rewrites it every `ttl_s / 3` with a later expiry, conditional on the ETag it
  wrote last (`If-Match`), so a driver that lost its lease finds out instead of overwriting.
- check (before each stage, and again right before each publish or commit): the lease counts as
  lost when another driver rewrote it (412), or when the last successful renewal was sent more than
  `ttl_s` minus a margin ago on this machine's monotonic clock, whatever the renewal thread is
  doing (one stalled PUT must not outlive the lease). Every S3 call is bounded: its timeouts and
  retries together stay under `ttl_s / 3`. A lost lease stops the run (LockHeldError).
- lost replies: every body carries this driver's nonce. A write that landed but whose reply was
  lost gets 412 when retried; the object is then read, and when it carries our nonce it is ours.
- take over: a lease whose expiry has passed by the taker's clock (its driver died without
  releasing it) is not trusted on that alone, as the machines' clocks may differ: the taker watches
  its ETag, and takes it over (conditionally on that ETag, so two waiting drivers cannot both take
  it) only after it stayed unchanged for `ttl_s` on the taker's own monotonic clock. A body that is
  not JSON is watched the same way; a lease released meanwhile is created afresh.
- release: deleted when the run ends, conditional on its ETag (never another driver's lease); a
  delete that fails is reported (`release_error`, printed as a warning by `run_lease`).

A second driver fails with LockHeldError (exit code 4) naming the holder (host, pid, run) and when
it started. Other object stores have no conditional writes through pyarrow: a run there is refused
unless `LORAFLOW_UNGUARDED_STORE=1` says one driver at a time is ensured some other way.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from workflows.artifacts import LockHeldError, file_lock
from workflows.config import ConfigError
from workflows.storage import WorkStore

LEASE = ".lease"
TTL_S = 120.0
RENEW_EVERY = 1 / 3  # of the ttl
MARGIN = 1 / 6  # of the ttl: a driver gives up this long before another one may take over
_PRECONDITION = ("PreconditionFailed", "ConditionalRequestConflict")


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def client_config(ttl_s: float) -> Any:
    """botocore settings whose worst case (2 attempts of connect + read timeout) is under `ttl_s / 3`:
    the defaults (60 s timeouts, several retries) let one call outlive the lease."""
    from botocore.config import Config

    timeout = ttl_s / 15
    return Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 2, "mode": "standard"})


def _code(error: Exception) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


class S3Lease:
    """The lease object of one S3 work directory (boto3: pyarrow cannot write conditionally).
    `clock` (monotonic), `wall` and `sleep` are attributes so that tests can skew them."""

    def __init__(self, store: WorkStore, run_id: str, ttl_s: float = TTL_S, client: Any = None):
        try:
            import boto3  # endpoint, region and credentials from the environment, as pyarrow's
        except ImportError:
            raise ConfigError(f"cluster.work_dir {store.uri}: the run lease on S3 needs boto3: "
                              "pip install 'loraflow[s3]'") from None

        self.bucket, _, prefix = store.root.partition("/")
        self.key = f"{prefix}/{LEASE}" if prefix else LEASE
        self.uri, self.ttl_s = store.uri_of(LEASE), ttl_s
        self.client = client or boto3.client("s3", config=client_config(ttl_s))
        self.clock: Callable[[], float] = time.monotonic
        self.wall: Callable[[], float] = time.time
        self.sleep: Callable[[float], None] = time.sleep
        self.nonce = uuid.uuid4().hex
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id,
                       "started": _stamp(self.wall()), "nonce": self.nonce}
        self.etag: str | None = None
        self.renewed_at: float | None = None  # monotonic time the last write that landed was sent
        self.last_error: Exception | None = None
        self.lost: str | None = None
        self.release_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one object, read and written conditionally ----------------------------------------------

    def _read(self) -> tuple[str, dict | None] | None:
        """(ETag, body or None when it is not a JSON object) of the lease object; None: no object."""
        try:
            current = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            body = json.loads(current["Body"].read())
        except ValueError:
            body = None
        return current["ETag"], body if isinstance(body, dict) else None

    def _put(self, **condition: str) -> bool:
        """Write our body under `condition`. True when it landed, also when the reply was lost and a
        retry met 412 on our own write (the object carries our nonce); False when the condition
        failed because of another writer."""
        sent = self.clock()
        body = json.dumps({**self.holder, "expires": self.wall() + self.ttl_s}).encode()
        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]
        except Exception as e:
            if _code(e) not in _PRECONDITION:
                raise
            current = self._read()
            if current is None or (current[1] or {}).get("nonce") != self.nonce:
                return False
            self.etag = current[0]
        self.renewed_at = sent
        return True

    # -- acquire and take over --------------------------------------------------------------------

    def acquire(self) -> None:
        """Create the lease, or take over a dead one; LockHeldError naming the holder otherwise.
        Starts nothing: `start` runs the renewals."""
        for _ in range(3):  # the holder may release it between our write and our read
            if self._put(IfNoneMatch="*"):
                return
            current = self._read()
            if current is not None:
                self._take_over(*current)
                return
        raise LockHeldError(f"the lease {self.uri} keeps changing hands; try again")

    def _take_over(self, etag: str, other: dict | None) -> None:
        expires = (other or {}).get("expires")
        if isinstance(expires, int | float) and expires > self.wall():
            raise LockHeldError(
                f"another loraflow run holds the work directory's lease {self.uri}: run {other.get('run_id')} "
                f"on {other.get('host')} (pid {other.get('pid')}), started {other.get('started')}, lease valid "
                f"until {_stamp(expires)}; wait for it, or delete the object if that run is gone")
        # Expired by this machine's clock (or unreadable): dead only if nobody renews it for a ttl.
        print(f"the lease {self.uri} has expired by this machine's clock: taking it over if it stays unchanged "
              f"for {self.ttl_s:.0f} s", file=sys.stderr, flush=True)
        watched = self.clock()
        while self.clock() - watched < self.ttl_s:
            self.sleep(self.ttl_s / 10)
            current = self._read()
            if current is None:
                if self._put(IfNoneMatch="*"):
                    return
                raise LockHeldError(f"another loraflow run took the released lease {self.uri} first")
            if current[0] != etag:
                holder = (current[1] or {}).get("run_id", "an unknown run")
                raise LockHeldError(f"the lease {self.uri} looked expired by this machine's clock, but {holder} "
                                    "renewed it: it is alive (the machines' clocks differ)")
        if not self._put(IfMatch=etag):
            raise LockHeldError(f"another loraflow run took over the expired lease {self.uri} first")

    # -- renew, check, release --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="loraflow-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while self.lost is None and not self._stop.wait(self.ttl_s * RENEW_EVERY):
            self.renew_once()

    def renew_once(self) -> None:
        """One renewal. A failure (network, throttling) is retried at the next tick; `check` counts
        the time since the last renewal that landed."""
        try:
            if not self._put(IfMatch=self.etag):
                self.lost = f"lease {self.uri} lost: another driver took it over"
        except Exception as e:
            self.last_error = e

    def check(self) -> None:
        """Raise LockHeldError when the lease is lost (or about to be): this run must stop writing."""
        if self.lost is None and self.renewed_at is not None:
            silent = self.clock() - self.renewed_at
            if silent > self.ttl_s * (1 - MARGIN):
                self.lost = (f"lease {self.uri} lost: not renewed for {silent:.0f} s of its {self.ttl_s:.0f} s "
                             f"(last error: {self.last_error}); another driver may take it over")
        if self.lost is not None:
            raise LockHeldError(f"{self.lost}; this run stops here (its finished stages stay committed)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is not None or self.etag is None:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as e:
            if _code(e) not in ("NoSuchKey", "404"):  # a retry after a lost reply finds it gone
                self.release_error = (f"the lease {self.uri} was not released ({e}); the next run on this work "
                                      f"directory takes it over {self.ttl_s:.0f} s after it expires")


def _held() -> None:
    """A local lock cannot be lost while its process lives."""


@contextlib.contextmanager
def run_lease(store: WorkStore, run_id: str, wait: bool = False, ttl_s: float = TTL_S) -> Iterator[Callable[[], None]]:
    """Hold the work directory for one run (see the module docstring). `wait` applies to the local
    lock only: a held store lease fails at once, naming its holder. Yields a check to call before
    each write: it raises LockHeldError once the lease is lost."""
    if not store.remote:
        with file_lock(store.local / ".lock", wait, held=f"another loraflow run holds {store.local / '.lock'}"):
            yield _held
        return
    if not store.uri.startswith("s3://"):
        if os.environ.get("LORAFLOW_UNGUARDED_STORE") != "1":
            raise LockHeldError(f"{store.uri}: no conditional writes on this store, so concurrent runs could not "
                                "be refused; set LORAFLOW_UNGUARDED_STORE=1 if only one driver ever runs on it")
        yield _held
        return
    lease = S3Lease(store, run_id, ttl_s)
    lease.acquire()
    lease.start()
    try:
        yield lease.check
    finally:
        lease.release()
        if lease.release_error:
            print(f"warning: {lease.release_error}", file=sys.stderr, flush=True)

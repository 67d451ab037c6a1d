"""One driver at a time per work directory, across machines: the run lease.

A local work directory is guarded by an advisory file lock (`artifacts.file_lock`). A work
directory on S3 is guarded by a lease object, `<work>/.lease`, that only one driver can create:

- acquire: create it with a conditional write (`If-None-Match: *`); the store refuses a second one.
- renew: a thread rewrites it every `ttl_s / 3` with a later expiry, conditional on the ETag it
  wrote last (`If-Match`), so a driver that lost its lease finds out instead of overwriting. A
  failed renewal (network, throttling) is retried; the lease counts as lost when another driver
  has rewritten it (412) or when it went `ttl_s` without a renewal. The pipeline checks before
  each stage and stops a run whose lease is lost (LockHeldError).
- expire: a lease whose expiry has passed (its driver died without releasing it) is taken over,
  conditionally on the ETag read, so two waiting drivers cannot both take it.
- release: deleted when the run ends, conditional on its ETag (never another driver's lease).

A second driver fails with LockHeldError (exit code 4) naming the holder (host, pid, run) and when
it started. Other object stores have no conditional writes through pyarrow: a run there is refused
unless `LORAFLOW_UNGUARDED_STORE=1` says one driver at a time is ensured some other way.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

from workflows.artifacts import LockHeldError, file_lock
from workflows.config import ConfigError
from workflows.storage import WorkStore

LEASE = ".lease"
TTL_S = 120.0


def _now() -> float:
    return time.time()


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


class S3Lease:
    """The lease object of one S3 work directory (boto3: pyarrow cannot write conditionally)."""

    def __init__(self, store: WorkStore, run_id: str, ttl_s: float = TTL_S):
        try:
            import boto3  # endpoint, region and credentials from the environment, as pyarrow's
        except ImportError:
            raise ConfigError(f"cluster.work_dir {store.uri}: the run lease on S3 needs boto3: "
                              "pip install 'loraflow[s3]'") from None

        self.bucket, _, prefix = store.root.partition("/")
        self.key = f"{prefix}/{LEASE}" if prefix else LEASE
        self.uri, self.ttl_s = store.uri_of(LEASE), ttl_s
        self.client = boto3.client("s3")
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, "started": _stamp(_now())}
        self.etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.holder, "expires": _now() + self.ttl_s}).encode()

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                               IfNoneMatch="*")["ETag"]
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            self._take_over_if_expired()
        self._thread = threading.Thread(target=self._renew, name="loraflow-lease", daemon=True)
        self._thread.start()

    def _take_over_if_expired(self) -> None:
        from botocore.exceptions import ClientError

        current = self.client.get_object(Bucket=self.bucket, Key=self.key)
        other = json.loads(current["Body"].read() or b"{}")
        if other.get("expires", 0) > _now():
            raise LockHeldError(
                f"another loraflow run holds the work directory's lease {self.uri}: run {other.get('run_id')} "
                f"on {other.get('host')} (pid {other.get('pid')}), started {other.get('started')}, lease valid "
                f"until {_stamp(other['expires'])}; wait for it, or delete the object if that run is gone")
        try:  # expired: its driver died without releasing it
            self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                               IfMatch=current["ETag"])["ETag"]
        except ClientError:
            raise LockHeldError(f"another loraflow run took over the expired lease {self.uri} first") from None

    def _renew(self) -> None:
        from botocore.exceptions import ClientError

        renewed = _now()
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.etag = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                   IfMatch=self.etag)["ETag"]
                renewed = _now()
                continue
            except ClientError as e:
                if e.response["Error"]["Code"] == "PreconditionFailed":  # another driver rewrote it
                    self.lost = f"lease {self.uri} lost: another driver took it over"
                    return
                error = e
            except Exception as e:  # network, endpoint, throttling: retried at the next tick
                error = e
            if _now() - renewed > self.ttl_s:
                self.lost = f"lease {self.uri} lost: not renewed for {self.ttl_s:.0f} s (last error: {error})"
                return

    def check(self) -> None:
        """Raise LockHeldError when the lease is lost: this run must stop writing."""
        if self.lost is not None:
            raise LockHeldError(f"{self.lost}; this run stops here (its finished stages stay committed)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self.etag is not None:
            with contextlib.suppress(Exception):
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)


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
    try:
        yield lease.check
    finally:
        lease.release()

"""What a user sees while a run works: loraflow's own lines on the console, everything in the run log.

While a run works, this process's stdout and stderr (file descriptors 1 and 2, so the output of
Ray, of the workers it relays, of transformers and of C libraries is caught as well as Python's)
go through a pipe. A reader thread writes every line to `runs/<id>/run.log` and lets through to
the console only loraflow's own lines: stage banners, the rank-0 progress line every
`train.log_every` steps (Ray's `(RayTrainWorker pid=...)` prefix removed), warnings and errors it
raises itself. `--verbose` lets everything through.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Lines loraflow itself prints (pipeline banners, stage summaries, the train workers' progress line).
OWN = re.compile(r"^(==> |\[(ray|prepare|train|evaluate|register|retrain|tune)\] |error: |warning: )")
RAY_PREFIX = re.compile(r"^\((?:[A-Za-z_]+ )?pid=\d+(?:, ip=[\d.]+)?\) ")
# Colours, and the cursor moves progress bars relayed from Ray workers put in front of the next line.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def shown(line: str) -> str | None:
    """The console form of a captured line, or None when it belongs in the log only (what a
    progress bar redrew with a carriage return before it is dropped)."""
    line = RAY_PREFIX.sub("", ANSI.sub("", line).rsplit("\r", 1)[-1])
    return line if OWN.match(line) else None


class Console:
    """Captures fds 1 and 2 for a block (see the module docstring); `log` is the run log's path."""

    def __init__(self, log: Path, verbose: bool = False):
        self.log, self.verbose = log, verbose
        self._saved: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self.lines_shown = 0

    def _pump(self, source: BinaryIO, console: BinaryIO, log: BinaryIO) -> None:
        """Until the pipe ends. A failed write (a full disk, a closed terminal) drops that sink but
        the pipe is still drained: a pump that stopped reading would block every writer of the run."""
        last, sinks = None, {"log": True, "console": True}
        for raw in source:
            if sinks["log"]:
                sinks["log"] = _write(log, raw)
            text = raw.decode("utf-8", "replace").rstrip("\n")
            keep = text if self.verbose else shown(text)
            if keep is None or (keep == last and not self.verbose):  # Ray may relay a line twice
                continue
            last = keep
            if sinks["console"]:
                sinks["console"] = _write(console, (keep + "\n").encode())
            self.lines_shown += 1

    def __enter__(self) -> Console:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self._saved = (os.dup(1), os.dup(2))
        read_fd, write_fd = os.pipe()
        console = os.fdopen(os.dup(self._saved[1]), "wb", buffering=0)
        log = open(self.log, "ab")  # noqa: SIM115 (closed by the pump's owner below)
        source = os.fdopen(read_fd, "rb")
        self._thread = threading.Thread(target=self._run, args=(source, console, log), daemon=True)
        self._thread.start()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        return self

    def _run(self, source: BinaryIO, console: BinaryIO, log: BinaryIO) -> None:
        with source, console, log:
            self._pump(source, console, log)

    def __exit__(self, *exc: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        assert self._saved is not None
        os.dup2(self._saved[0], 1)  # the pipe's last writers are gone: the pump sees its end
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        if self._thread is not None:
            self._thread.join(timeout=10)


def _write(sink: BinaryIO, data: bytes) -> bool:
    try:
        sink.write(data)
        sink.flush()
        return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def captured(log: Path, verbose: bool = False) -> Iterator[Console]:
    with Console(log, verbose) as console:
        yield console

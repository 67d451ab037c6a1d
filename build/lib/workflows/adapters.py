"""An adapter as bytes: how an adapter crosses from the driver to training workers and eval actors.

A LoRA adapter is a few MB (`adapter_config.json`, `adapter_model.safetensors`, `loraflow.json`).
The driver reads it once from wherever it lives (the registry on the driver's disk, a committed
work-store URI, a folder) and the bytes travel inside the worker's or actor's settings, through
Ray's object store. The receiving process writes them into a private temp folder (`materialized`)
and loads from there: no worker or actor ever opens a path that exists only on the driver's disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workflows import storage
from workflows.artifacts import UserError
from workflows.heads import pooling_of

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LINEAGE_FILE = "loraflow.json"
MAX_ADAPTER_BYTES = 2 * 2**30  # a LoRA adapter; anything bigger is not one (or needs another transport)


def content_sha256(config: bytes, weights: bytes) -> str:
    """An adapter's identity: its config and weights (not loraflow.json, whose lineage has times)."""
    h = hashlib.sha256()
    for name, data in ((CONFIG_FILE, config), (WEIGHTS_FILE, weights)):
        h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


class PoolingMismatchError(UserError, ValueError):
    """An adapter trained with one `model.pooling` meets a config that uses another (exit 2, as a
    config error)."""

    exit_code = 2


@dataclass(frozen=True)
class AdapterFiles:
    """The files of one adapter directory. `ref` says what it is in messages and metrics
    (`demo:3`, a folder, a URI); `files` maps relative POSIX paths to their bytes."""

    ref: str
    files: dict[str, bytes]

    @classmethod
    def read(cls, location: str | Path, ref: str | None = None) -> AdapterFiles:
        """Every file of the adapter directory `location` (a local folder or a store URI)."""
        fs, root = storage.resolve(location)
        found = storage.list_files(fs, root)
        if CONFIG_FILE not in found or WEIGHTS_FILE not in found:
            missing = CONFIG_FILE if CONFIG_FILE not in found else WEIGHTS_FILE
            raise FileNotFoundError(f"{storage.join(location, missing)}: missing (not an adapter directory)")
        total = sum(found.values())
        if total > MAX_ADAPTER_BYTES:
            raise ValueError(f"{location}: {total / 2**20:.0f} MiB is not a LoRA adapter's size")
        files = {rel: storage.read_from(fs, f"{root}/{rel}") for rel in sorted(found)}
        return cls(ref or str(location), files)

    @property
    def content_sha256(self) -> str:
        return content_sha256(self.files[CONFIG_FILE], self.files[WEIGHTS_FILE])

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    @property
    def pooling(self) -> str:
        """The `model.pooling` the adapter was trained with ("default" when loraflow.json has none)."""
        return pooling_of(json.loads(self.files.get(LINEAGE_FILE, b"{}")))

    def check_pooling(self, pooling: str, role: str) -> None:
        """The adapter goes onto a base whose head is fed with `pooling`: it must have been trained so."""
        if self.pooling != pooling:
            raise PoolingMismatchError(f"model.pooling: the {role} {self.ref} was trained with {self.pooling!r}, this "
                                       f"config uses {pooling!r}; its head would read other features. Use the "
                                       f"pooling it was trained with, or register under another registry.name")

    def write(self, directory: str | Path) -> Path:
        """Write the files into `directory` (created; existing files of the same names replaced)."""
        directory = Path(directory)
        for rel, data in self.files.items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_bytes(data)
        return directory

    @contextlib.contextmanager
    def materialized(self) -> Iterator[Path]:
        """The adapter as a private temporary folder of this process, removed after the block."""
        with tempfile.TemporaryDirectory(prefix="loraflow-adapter-") as tmp:
            yield self.write(Path(tmp) / "adapter")

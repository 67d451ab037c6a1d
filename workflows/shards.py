"""Reading a stage's Parquet shards (the files its manifest names) as a Ray Dataset."""

from __future__ import annotations

import os
from typing import Any

from workflows import storage

# Ray Data 2.60 lists Parquet files by reading every footer on a pool of FooterReader actors, 32
# by default, started afresh for each read (also for the schema sample at read time): a new Python
# process each, about 1.5 CPU-seconds apiece. A stage's manifest names its shards, a few to a few
# hundred small files, so one actor per 64 of them (at most 8) reads their footers in time.
_FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"


def ray_parquet(files: list[str]) -> Any:
    """`ray.data.read_parquet` over shards the manifest names, with a footer-reader pool sized to
    them (the user's own RAY_DATA_PARQUET_FOOTER_NUM_ACTORS wins)."""
    import ray

    paths, fs = storage.ray_paths(files)
    if _FOOTER_ACTORS in os.environ:
        return ray.data.read_parquet(paths, filesystem=fs)
    # The indexer reads the variable once, here on the driver, and travels with the plan. (Ray also
    # reads it into its module default when the indexer's module is first imported, which can be
    # here: later plain reads in this process then default to this size too.)
    os.environ[_FOOTER_ACTORS] = str(min(8, 1 + len(paths) // 64))
    try:
        return ray.data.read_parquet(paths, filesystem=fs)
    finally:
        del os.environ[_FOOTER_ACTORS]

"""Reading a stage's shards with Ray Data starts a footer-reader pool sized to them, not Ray's 32."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from workflows import shards


def _footer_readers() -> int:
    from ray._private.state import state

    return sum(1 for a in state.actor_table(None).values() if a["ActorClassName"].endswith("FooterReader"))


def test_a_read_of_a_few_shards_starts_one_footer_reader_per_listing(ray_session, tmp_path, monkeypatch):
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(pa.table({"x": list(range(i * 10, i * 10 + 10))}), files[-1])
    before = _footer_readers()
    assert sorted(shards.ray_parquet(files).to_pandas()["x"]) == list(range(30))
    ours = _footer_readers() - before
    assert "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS" not in os.environ  # set for the read only
    monkeypatch.setenv("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "32")  # Ray's default
    before = _footer_readers()
    assert len(ray_session.data.read_parquet(files).to_pandas()) == 30
    plain = _footer_readers() - before
    # At most one for the schema sample at read time and one for the listing when it runs; Ray's
    # default asks for 32 for each.
    assert ours <= 2 < plain, (ours, plain)

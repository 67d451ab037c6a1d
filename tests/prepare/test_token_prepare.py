"""The prepare stage with data.format token_classification: CoNLL files and JSONL rows of both shapes
read in one Ray Data pipeline, every bad row rejected and counted by its reason."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from workflows.config import config_from_dict
from workflows.prepare.stage import run_prepare

CONLL = """-DOCSTART- -X- O

EU B-ORG
rejects O
German B-MISC
call O

Peter B-PER
Blackburn I-PER

lonely
"""

GOOD = [
    {"tokens": ["Ada", "Lovelace", "lived", "in", "London"], "tags": ["B-PER", "I-PER", "O", "O", "B-LOC"]},
    {"text": "book Nopa in Paris", "entities": [{"start": 5, "end": 9, "label": "ORG"},
                                                {"start": 13, "end": 18, "label": "LOC"}]},
    {"tokens": ["Bob", "went", "to", "Rome"], "tags": ["S-PER", "O", "O", "B-LOC"]},  # BIOES in IOB2 data
    {"text": "book Nopa", "entities": [{"start": 5, "end": 99, "label": "ORG"}]},
    {"text": "book Nopa", "entities": [{"start": 6, "end": 9, "label": "ORG"}]},
    {"text": "book Nopa now", "entities": [{"start": 5, "end": 13, "label": "ORG"},
                                          {"start": 10, "end": 13, "label": "ORG"}]},
    {"tokens": ["a", "b"], "tags": ["O"]},
    {"tokens": ["Zed", "x"], "tags": ["B-TIME", "O"]},  # TIME is not in data.labels
]


def test_conll_and_jsonl_rows_of_both_shapes_prepare_together_with_every_reject_counted(ray_session, tmp_path):
    (tmp_path / "news.conll").write_text(CONLL)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    cfg = config_from_dict({"model": {"name": "tiny-bert", "task": "token_cls"},
                            "data": {"source": [str(tmp_path / "news.conll"), str(tmp_path / "rows.jsonl")],
                                     "format": "token_classification", "eval_fraction": 0.5,
                                     "max_reject_fraction": 1.0, "labels": ["PER", "LOC", "ORG", "MISC"]}})
    prepared = run_prepare(cfg, tmp_path / "prepared")
    m = prepared.manifest
    assert m["counts"]["rows_read"] == 11 and m["counts"]["rejected"] == {
        "bad_tag": 1, "length_mismatch": 2, "overlapping_spans": 1, "span_misaligned": 1, "span_out_of_range": 1,
        "unknown_tag": 1}
    assert m["task"] == "token_cls" and m["label_names"] == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG",
                                                               "I-ORG", "B-PER", "I-PER"]
    kept = [r for split in ("train", "eval") for f in m["shards"][split]
            for r in pq.read_table(prepared.root / f).to_pylist()]
    assert len(kept) == 4  # 2 CoNLL sentences, 2 good JSONL rows
    rejects = {(r["source"].rsplit("/", 1)[-1], r["row"]): r["reason"] for f in m["shards"]["rejects"]
               for r in pq.read_table(prepared.root / f).to_pylist()}
    assert rejects[("news.conll", 11)] == "length_mismatch"  # the line with a word and no tag
    for r in kept:
        labelled = [lab for lab in r["labels"] if lab != -100]
        assert labelled and len(labelled) <= len(r["input_ids"]) - 2  # [CLS] and [SEP] carry no label

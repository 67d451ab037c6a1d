"""The micro-batches a worker consumes: reshuffled per epoch, reproducibly, grouped by length."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from workflows.collate import ClassificationCollator
from workflows.train.batches import micro_batches

PAD = 0


def dataset(ray_session, rows: int = 96):
    rng = np.random.default_rng(0)
    items = [{"input_ids": list(range(1, int(n) + 1)), "label": i} for i, n in enumerate(rng.integers(2, 40, rows))]
    return ray_session.data.from_items(items).materialize()


def epoch_labels(ds, epoch: int, seed: int = 0, group: bool = False, shuffle: int = 32) -> list[list[int]]:
    batches = micro_batches(ds.iterator(), ClassificationCollator(PAD), 8, torch.device("cpu"), seed, epoch,
                            shuffle, group)
    return [b["labels"].tolist() for b in batches]


def test_each_epoch_sees_another_order_and_the_same_epoch_the_same_one(ray_session):
    ds = dataset(ray_session)
    first, second = epoch_labels(ds, 0), epoch_labels(ds, 1)
    assert sorted(itertools.chain(*first)) == sorted(itertools.chain(*second)) == list(range(96))
    assert first != second
    assert epoch_labels(ds, 1) == second  # what a resumed run replays
    assert epoch_labels(ds, 1, seed=7) != second


def test_without_a_shuffle_buffer_the_rows_come_in_stored_order(ray_session):
    ds = dataset(ray_session)
    assert list(itertools.chain(*epoch_labels(ds, 3, shuffle=0))) == list(range(96))


def test_grouping_by_length_keeps_every_row_and_cuts_the_padding(ray_session):
    ds = dataset(ray_session)

    def padding(group: bool) -> float:
        batches = micro_batches(ds.iterator(), ClassificationCollator(PAD), 8, torch.device("cpu"), 0, 0, 32, group)
        masks = [b["attention_mask"] for b in batches]
        return 1 - sum(float(m.sum()) for m in masks) / sum(m.numel() for m in masks)

    grouped = epoch_labels(ds, 0, group=True)
    assert sorted(itertools.chain(*grouped)) == list(range(96)) and all(len(b) == 8 for b in grouped)
    assert padding(True) < 0.5 * padding(False)

"""Token classification's scores: strict entity P/R/F1 (held equal to seqeval's strict IOB2 results),
and the windowed forward that scores every word of a row longer than max_seq_len (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workflows.evaluate.entity_metrics import per_type, row_counts, strict_scores
from workflows.evaluate.metrics import aggregate, paired_bootstrap
from workflows.evaluate.scorer import word_predictions
from workflows.evaluate.token_scoring import plan_row, token_logits, windows
from workflows.models import load_base


def test_strict_f1_equals_seqevals_readme_example():
    # seqeval README: f1_score(y_true, y_pred) == 0.50 (also with mode="strict", scheme=IOB2)
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert strict_scores(y_true, y_pred) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


def test_strict_mode_scores_no_entity_that_starts_with_an_i_tag():
    # seqeval: default mode gives 1.0 here, mode="strict", scheme=IOB2 gives 0.0
    assert strict_scores([["B-NP", "I-NP", "O"]], [["I-NP", "I-NP", "O"]])["f1"] == 0.0


def test_micro_scores_and_per_type_report_match_a_hand_count():
    gold = [["B-time", "I-time", "O", "B-city"], ["B-city", "O", "B-time"]]
    pred = [["B-time", "I-time", "O", "B-time"], ["B-city", "I-city", "B-time"]]
    # gold: time(0,2) city(3,4) | city(0,1) time(2,3); pred: time(0,2) time(3,4) | city(0,2) time(2,3)
    assert strict_scores(gold, pred) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    report = per_type(gold, pred)
    assert report["time"] | {} == {"support": 2, "predicted": 3, "correct": 2, "precision": 2 / 3, "recall": 1.0,
                                   "f1": 0.8}
    assert report["city"]["correct"] == 0 and report["city"]["f1"] == 0.0
    assert row_counts(gold[1], pred[1]) == {"entity_tp": 1, "entities_pred": 2, "entities_gold": 2, "words": 3,
                                            "correct_words": 2}


def test_aggregate_and_bootstrap_give_entity_f1_from_per_row_counts():
    names = ["O", "B-time", "I-time", "B-city", "I-city"]
    gold = [["B-time", "I-time", "O", "B-city"], ["B-city", "O", "B-time"]]
    pred = [["B-time", "I-time", "O", "B-time"], ["B-city", "I-city", "B-time"]]
    rows = {"example_id": np.array(["a", "b"], dtype=object), "loss_sum": np.array([1.0, 2.0]),
            "tokens": np.array([4, 3]), "gold_tags": np.array([" ".join(str(names.index(t)) for t in g) for g in gold],
                                                              dtype=object),
            "pred_tags": np.array([" ".join(str(names.index(t)) for t in p) for p in pred], dtype=object)}
    for k in ("entity_tp", "entities_pred", "entities_gold", "words", "correct_words"):
        rows[k] = np.array([row_counts(g, p)[k] for g, p in zip(gold, pred)])
    m = aggregate("token_cls", rows, names)
    assert m["entity_f1"] == 0.5 and m["entity_precision"] == 0.5 and m["token_accuracy"] == 5 / 7
    assert m["per_type"]["time"]["f1"] == 0.8 and m["entities"] == {"gold": 4, "predicted": 4, "correct": 2}
    diff = paired_bootstrap("token_cls", rows, rows, samples=20)
    assert diff["entity_f1"]["value"] == 0.0 and diff["entity_f1"]["ci95"] == [0.0, 0.0]


@pytest.mark.parametrize("content, size", [(5, 10), (10, 10), (11, 10), (57, 14), (100, 3)])
def test_windows_cover_every_content_token_within_the_size(content, size):
    spans = windows(content, size)
    assert all(b - a <= size for a, b in spans) and spans[0][0] == 0 and spans[-1][1] == content
    assert all(b2 > a2 >= a1 and a2 <= b1 for (a1, b1), (a2, b2) in zip(spans, spans[1:]))  # overlapping, in order


def test_a_row_longer_than_max_seq_len_is_scored_word_by_word_from_its_windows():
    model, tok = load_base("tiny-bert", task="token_cls", num_labels=5)
    text = " ".join(f"word{i}" for i in range(60))
    enc = tok(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    word_ids = [-1 if hi == lo else i for i, (lo, hi) in enumerate(enc["offset_mapping"])]
    max_len = 16
    assert len(ids) > 4 * max_len
    (logits,), width = token_logits(model, [(ids, word_ids)], max_len, tok.pad_token_id, batch_size=3)
    assert width == max_len and logits.shape == (len(ids), 5)
    # each token's logits are those of the window that holds it farthest from an edge, and every
    # token has a window
    owned = np.zeros(len(ids), bool)
    for fed, keep in plan_row(ids, word_ids, max_len):
        assert len(fed) <= max_len and fed[0] == tok.cls_token_id and fed[-1] == tok.sep_token_id
        with torch.no_grad():
            direct = model(input_ids=torch.tensor([fed])).logits[0].numpy()
        kept = np.flatnonzero(keep >= 0)
        np.testing.assert_allclose(logits[keep[kept]], direct[kept], atol=1e-5)
        assert not owned[keep[kept]].any()
        owned[keep[kept]] = True
    assert owned.all()
    # a row that fits is one plain forward
    short = ids[:10] + ids[-1:]
    (one,), _ = token_logits(model, [(short, word_ids[:10] + [-1])], max_len, tok.pad_token_id)
    with torch.no_grad():
        np.testing.assert_allclose(one, model(input_ids=torch.tensor([short])).logits[0].numpy(), atol=1e-5)


def test_each_word_is_predicted_at_its_first_sub_token():
    logits = np.zeros((6, 3))
    logits[[1, 2, 4], [1, 2, 2]] = 1.0  # token 2 (second piece of word 0) must not matter
    assert word_predictions(logits, [-1, 0, 0, 1, 2, -1], 4) == [1, 0, 2, 0]  # word 3 has no token: O

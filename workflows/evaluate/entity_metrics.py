"""Entity-level scores of token classification: strict IOB2 entities at word level, as `seqeval`
computes them with `mode="strict", scheme=IOB2` (a predicted entity counts when its type, first
and last word all equal a gold entity's).

Micro precision = correct / predicted, recall = correct / gold, F1 = 2 correct / (predicted + gold),
each a ratio of sums over rows: the per-row counts below add up over any split of the rows, and a
bootstrap resample of rows is a weighted sum (`workflows.evaluate.metrics`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from workflows.token_tags import entities


def row_counts(gold: Sequence[str], pred: Sequence[str]) -> dict[str, int]:
    """One row's `entity_tp`, `entities_pred`, `entities_gold`, `words`, `correct_words`."""
    g, p = set(entities(gold)), set(entities(pred))
    return {"entity_tp": len(g & p), "entities_pred": len(p), "entities_gold": len(g), "words": len(gold),
            "correct_words": sum(a == b for a, b in zip(gold, pred))}


def strict_scores(gold_rows: Sequence[Sequence[str]], pred_rows: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over rows of word tags (0.0 where a denominator is 0)."""
    tp = npred = ngold = 0
    for gold, pred in zip(gold_rows, pred_rows, strict=True):
        c = row_counts(gold, pred)
        tp, npred, ngold = tp + c["entity_tp"], npred + c["entities_pred"], ngold + c["entities_gold"]
    return {"precision": tp / npred if npred else 0.0, "recall": tp / ngold if ngold else 0.0,
            "f1": 2 * tp / (npred + ngold) if npred + ngold else 0.0}


def per_type(gold_rows: Sequence[Sequence[str]], pred_rows: Sequence[Sequence[str]]) -> dict[str, dict[str, Any]]:
    """Entity type -> support (gold), predicted, correct, precision, recall, f1 (seqeval's report)."""
    gold_n, pred_n, tp = Counter(), Counter(), Counter()
    for gold, pred in zip(gold_rows, pred_rows, strict=True):
        g, p = set(entities(gold)), set(entities(pred))
        gold_n.update(e[2] for e in g)
        pred_n.update(e[2] for e in p)
        tp.update(e[2] for e in g & p)
    out = {}
    for kind in sorted(gold_n | pred_n):
        s, n, c = gold_n[kind], pred_n[kind], tp[kind]
        out[kind] = {"support": s, "predicted": n, "correct": c, "precision": c / n if n else 0.0,
                     "recall": c / s if s else 0.0, "f1": 2 * c / (s + n) if s + n else 0.0}
    return out


def decode_tags(encoded: str, names: Sequence[str]) -> list[str]:
    """Tag names of a row's class ids as the scorer stores them (space-separated)."""
    return [names[int(i)] for i in encoded.split()] if encoded else []

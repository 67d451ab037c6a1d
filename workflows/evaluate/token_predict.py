"""`loraflow predict` for a token-classification adapter: the entities of each text.

The text is cut into words as the prepare stage cuts `text` + character spans rows
(`workflows.token_tags.split_words`), run through the model in windows when it is longer than the
adapter's `data.max_seq_len` (`token_scoring`, as evaluation does), and each word takes the argmax tag
at its first sub-token. Entities are the strict IOB2 chunks of those tags (evaluation's), each with
its label, text, character span [start, end) and a score: the mean, over its words, of the softmax
probability of the tag predicted for that word.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np

from workflows.evaluate.token_scoring import token_logits
from workflows.token_tags import entities, first_subtokens, split_words


def word_ids_of(tokenizer: Any, text: str, words: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the word of each token (-1: special), as the prepare stage maps them."""
    enc = tokenizer(text, return_offsets_mapping=True, return_attention_mask=False)
    starts = [s for s, _ in words]
    word_ids = []
    for lo, hi in enc["offset_mapping"]:
        w = bisect.bisect_right(starts, max(hi - 1, lo)) - 1 if hi > lo else -1
        word_ids.append(w if w >= 0 and words[w][1] > lo else -1)
    return list(enc["input_ids"]), word_ids


def entities_of(text: str, words: list[tuple[int, int]], word_ids: list[int], logits: np.ndarray,
                names: Sequence[str]) -> list[dict[str, Any]]:
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    tags, scores = ["O"] * len(words), [1.0] * len(words)
    for t in first_subtokens(word_ids):
        k = int(probs[t].argmax())
        tags[word_ids[t]], scores[word_ids[t]] = names[k], float(probs[t, k])
    found = []
    for a, b, kind in entities(tags):
        start, end = words[a][0], words[b - 1][1]
        found.append({"label": kind, "text": text[start:end], "start": start, "end": end,
                      "score": float(np.mean(scores[a:b]))})
    return found


def predict_entities(model: Any, tokenizer: Any, texts: Sequence[str], names: Sequence[str], max_len: int,
                     device: Any = "cpu", batch_size: int = 8) -> list[dict[str, Any]]:
    """One `{"text", "entities": [{"label", "text", "start", "end", "score"}]}` per text."""
    words = [split_words(t) for t in texts]
    rows = [word_ids_of(tokenizer, t, w) for t, w in zip(texts, words)]
    logits, _ = token_logits(model, rows, max_len, tokenizer.pad_token_id, batch_size, device)
    return [{"text": t, "entities": entities_of(t, w, ids, lg, names)}
            for t, w, (_, ids), lg in zip(texts, words, rows, logits)]

"""Token classification's forward over whole rows: every token of a row gets logits, however long.

A row longer than `max_len` tokens runs in overlapping windows: its leading and trailing special
tokens ([CLS], [SEP]) around successive slices of its content, each slice `max_len - specials`
long, starting half a slice after the previous one. Each content token takes its logits from the
window where it sits farthest from an edge (most context on both sides), so every word of every
row is scored, which is what published entity F1 figures count. The evaluate stage's scorer and
`loraflow predict` both call `token_logits`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def windows(content: int, size: int) -> list[tuple[int, int]]:
    """[start, end) slices of `content` tokens, each at most `size` long, every token in one or two."""
    if size < 1:
        raise ValueError(f"a window of {size} tokens holds no content (max_len too small for the special tokens)")
    if content <= size:
        return [(0, content)]
    stride = max(1, size // 2)
    starts = list(range(0, content - size, stride)) + [content - size]
    return [(a, a + size) for a in starts]


def _specials(word_ids: Sequence[int]) -> tuple[int, int]:
    """How many tokens lead and trail the row's words (special tokens: word id -1)."""
    real = [t for t, w in enumerate(word_ids) if w >= 0]
    if not real:
        return min(1, len(word_ids)), max(0, len(word_ids) - 1)
    return real[0], len(word_ids) - 1 - real[-1]


def plan_row(input_ids: Sequence[int], word_ids: Sequence[int], max_len: int) -> list[tuple[list[int], np.ndarray]]:
    """The windows of one row: (token ids fed, row position of each fed token's kept logits or -1)."""
    n = len(input_ids)
    if n <= max_len:
        return [(list(input_ids), np.arange(n))]
    lead, trail = _specials(word_ids)
    content = n - lead - trail
    spans = windows(content, max_len - lead - trail)
    # owner[p]: the window where content token p is farthest from an edge
    best = np.full(content, -1)
    margin = np.full(content, -1)
    for k, (a, b) in enumerate(spans):
        p = np.arange(a, b)
        m = np.minimum(p - a, b - 1 - p)
        better = m > margin[a:b]
        best[a:b][better], margin[a:b][better] = k, m[better]
    out = []
    for k, (a, b) in enumerate(spans):
        ids = list(input_ids[:lead]) + list(input_ids[lead + a: lead + b]) + list(input_ids[n - trail:])
        keep = np.full(len(ids), -1)
        own = np.flatnonzero(best[a:b] == k)
        keep[lead + own] = lead + a + own
        if k == 0:
            keep[:lead] = np.arange(lead)
        if k == len(spans) - 1:
            keep[len(ids) - trail:] = np.arange(n - trail, n)
        out.append((ids, keep))
    return out


@torch.inference_mode()
def token_logits(model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int, pad_token_id: int,
                 batch_size: int = 8, device: torch.device | str = "cpu") -> tuple[list[np.ndarray], int]:
    """float32 logits (tokens, classes) of each `(input_ids, word_ids)` row, and the widest forward."""
    pieces = [(r, ids, keep) for r, (ids, words) in enumerate(rows) for ids, keep in plan_row(ids, words, max_len)]
    pieces.sort(key=lambda p: len(p[1]))
    out = [np.zeros((len(ids), 0), np.float32) for ids, _ in rows]
    width = 0
    for i in range(0, len(pieces), batch_size):
        chunk = pieces[i:i + batch_size]
        longest = max(len(p[1]) for p in chunk)
        width = max(width, longest)
        ids = torch.full((len(chunk), longest), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        for j, (_, seq, _) in enumerate(chunk):
            ids[j, : len(seq)] = torch.as_tensor(seq)
            mask[j, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu().numpy()
        for j, (r, _, keep) in enumerate(chunk):
            if out[r].shape[1] == 0:
                out[r] = np.zeros((len(rows[r][0]), logits.shape[-1]), np.float32)
            fed = np.flatnonzero(keep >= 0)
            out[r][keep[fed]] = logits[j, fed]
    return out, width

"""Pack samples into fixed [rows, T] arrays without cross-document contamination.

Every document gets its own segment id (1, 2, ... within a row; 0 is padding), positions restart at
0 per document, and the target of the last token of a document has weight 0, so attention (masked
by segment in the model) and loss never cross a boundary. Shapes are static: one compile per run.
"""
from __future__ import annotations

import bisect

import numpy as np

from jaxtune.data.formats import Tokenized

ROW_FIELDS = ("tokens", "targets", "weights", "segment_ids", "positions")


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of sample indices, longest first, each into the fullest bin that still fits it
    (best-fit decreasing: a sorted list of free space makes each placement O(log bins))."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    free: list[tuple[int, int]] = []  # (free space, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            bins.append([int(i)])
            space, b = capacity - need, len(bins) - 1
        else:
            space, b = free.pop(at)
            bins[b].append(int(i))
            space -= need
        if space > 0:
            bisect.insort(free, (space, b))
    return bins


def pack(data: Tokenized, seq_len: int) -> dict[str, np.ndarray]:
    """Rows of packed documents: tokens, targets (next token), weights (float32), segment_ids,
    positions, each [rows, seq_len]."""
    lengths = data.lengths
    if len(lengths) and lengths.max() > seq_len:
        raise ValueError(f"a sample of {lengths.max()} tokens exceeds seq_len={seq_len}; apply the overlong policy first")
    bins = best_fit_decreasing(lengths, seq_len)
    rows = {name: np.zeros((len(bins), seq_len), np.int32) for name in ROW_FIELDS}
    rows["weights"] = np.zeros((len(bins), seq_len), np.float32)
    for r, members in enumerate(bins):
        at = 0
        for seg, i in enumerate(members, start=1):
            ids, w = data.sample(i)
            n = len(ids)
            rows["tokens"][r, at:at + n] = ids
            rows["targets"][r, at:at + n - 1] = ids[1:]
            rows["weights"][r, at:at + n - 1] = w[1:]  # predicting token t+1 is supervised iff it is
            rows["segment_ids"][r, at:at + n] = seg
            rows["positions"][r, at:at + n] = np.arange(n)
            at += n
    return rows


def efficiency(rows: dict[str, np.ndarray]) -> float:
    """Share of row slots holding real tokens (1.0 = no padding)."""
    seg = rows["segment_ids"]
    return float((seg > 0).sum() / max(seg.size, 1))

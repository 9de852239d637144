"""Pack samples into fixed [rows, T] arrays without cross-document contamination.

Every document gets its own segment id (1, 2, ... within a row; 0 is padding), positions restart at
0 per document, and the target of the last token of a document has weight 0, so attention (masked
by segment in the model) and loss never cross a boundary. Shapes are static: one compile per run.
"""
from __future__ import annotations

import bisect
import hashlib

import numpy as np

from jaxtune.data.formats import Selection, Tokenized

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


class Packed:
    """Packed rows as a plan: which samples each row holds, over the tokenized samples (memory-mapped from
    the cache). `take` builds the rows a step asks for, so a run holds one batch of rows, not the data set's
    (dense rows cost 20 bytes per token slot)."""

    def __init__(self, data: Tokenized | Selection, seq_len: int):
        lengths = data.lengths
        if len(lengths) and lengths.max() > seq_len:
            raise ValueError(f"a sample of {lengths.max()} tokens exceeds seq_len={seq_len}; apply the overlong policy first")
        bins = best_fit_decreasing(lengths, seq_len)
        self.data, self.seq_len = data, seq_len
        self.members = np.fromiter((i for members in bins for i in members), np.int64, len(lengths))
        self.row_offsets = np.zeros(len(bins) + 1, np.int64)
        np.cumsum([len(members) for members in bins], out=self.row_offsets[1:])
        self.tokens = int(lengths.sum())
        self.targets_per_row = (np.add.reduceat(data.target_counts[self.members], self.row_offsets[:-1])
                                if len(bins) else np.zeros(0, np.int64))

    def __len__(self):
        return len(self.row_offsets) - 1

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `rows`: tokens, targets (next token), weights (float32), segment_ids, positions, each
        [len(rows), seq_len]."""
        out = {name: np.zeros((len(rows), self.seq_len), np.int32) for name in ROW_FIELDS}
        out["weights"] = np.zeros((len(rows), self.seq_len), np.float32)
        for r, row in enumerate(rows):
            at = 0
            for seg, i in enumerate(self.members[self.row_offsets[row]:self.row_offsets[row + 1]], start=1):
                ids, w = self.data.sample(i)
                n = len(ids)
                out["tokens"][r, at:at + n] = ids
                out["targets"][r, at:at + n - 1] = ids[1:]
                out["weights"][r, at:at + n - 1] = w[1:]  # predicting token t+1 is supervised iff it is
                out["segment_ids"][r, at:at + n] = seg
                out["positions"][r, at:at + n] = np.arange(n)
                at += n
        return out

    def digest(self) -> str:
        """The rows' content in a sha256: the plan, and the samples' tokens and weights — by the token cache's
        key where they come from one (it is the content's: data, tokenizer, options), so that a run does not
        read the whole cache (its pages would count in the run's memory), else read in blocks."""
        h = hashlib.sha256(f"{self.seq_len}".encode())
        data = self.data
        if isinstance(data, Selection):
            h.update(data.index.tobytes())
            data = data.base
        arrays = [self.members, self.row_offsets, data.offsets]
        if data.key is None:
            arrays += [data.ids, data.weights]
        else:
            h.update(data.key.encode())
        for array in arrays:
            for a in range(0, len(array), 1 << 24):
                h.update(np.ascontiguousarray(array[a:a + (1 << 24)]).tobytes())
        return h.hexdigest()[:16]


class Dense:
    """Rows already built ([rows, seq_len] arrays by field), behind the interface of `Packed`."""

    def __init__(self, rows: dict[str, np.ndarray]):
        self.rows = rows
        self.targets_per_row = rows["weights"].sum(axis=1)
        self.tokens = int((rows["segment_ids"] > 0).sum()) if "segment_ids" in rows else rows["tokens"].size
        self.seq_len = rows["tokens"].shape[1]

    def __len__(self):
        return len(self.rows["tokens"])

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[rows] for k, v in self.rows.items()}


def as_rows(rows: Packed | Dense | dict) -> Packed | Dense:
    return Dense(rows) if isinstance(rows, dict) else rows


def pack(data: Tokenized, seq_len: int) -> dict[str, np.ndarray]:
    """All rows at once (small data, tests): tokens, targets, weights, segment_ids, positions."""
    packed = Packed(data, seq_len)
    return packed.take(np.arange(len(packed)))


def efficiency(rows: Packed | Dense | dict) -> float:
    """Share of row slots holding real tokens (1.0 = no padding)."""
    rows = as_rows(rows)
    return rows.tokens / max(len(rows) * rows.seq_len, 1)

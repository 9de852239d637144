"""The data report shown before any training, and the checks that stop a run that cannot learn."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxtune.data import packing
from jaxtune.data.formats import Selection, Tokenized
from jaxtune.errors import JaxtuneError


@dataclasses.dataclass
class DataReport:
    samples: int
    tokens: int
    supervised_tokens: int  # per epoch: what `train.lr = "auto"` needs
    truncated: int
    dropped: int
    split: int
    turn_ends_unlabelled: int
    special_text_kept: int  # special-token texts inside message content, encoded as plain text
    seq_len: int
    rows: int
    packing_efficiency: float
    length_histogram: list[tuple[int, int, int]]  # (low, high, count)

    @classmethod
    def build(cls, data: Tokenized | Selection, rows: packing.Packed | dict[str, np.ndarray],
              seq_len: int) -> "DataReport":
        lengths, rows = data.lengths, packing.as_rows(rows)
        edges = np.unique(np.linspace(0, max(seq_len, int(lengths.max(initial=1))), 9).astype(int))
        counts, _ = np.histogram(lengths, bins=edges)
        return cls(samples=len(data), tokens=int(lengths.sum()), supervised_tokens=int(rows.targets_per_row.sum()),
                   truncated=data.truncated, dropped=data.dropped, split=data.split,
                   turn_ends_unlabelled=data.turn_ends_unlabelled, special_text_kept=data.special_text_kept,
                   seq_len=seq_len, rows=len(rows),
                   packing_efficiency=packing.efficiency(rows),
                   length_histogram=[(int(lo), int(hi), int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)])

    def failures(self) -> list[str]:
        out = []
        if self.samples == 0:
            out.append("no samples: the data is empty after formatting (or every sample was dropped as over-long)")
        elif self.supervised_tokens == 0:
            out.append("no supervised token at all: every label is masked. Chat data needs assistant turns; "
                       "or set data.train_on_inputs=True")
        if self.turn_ends_unlabelled:
            out.append(f"{self.turn_ends_unlabelled} assistant turn(s) end with an end-of-turn token that carries "
                       "no label, so the model would never learn to stop. The chat template emits the end-of-turn "
                       "token outside the assistant message; fix the template or use data.chat_template='chatml'")
        return out

    def check(self):
        problems = self.failures()
        if problems:
            raise JaxtuneError("data preflight failed:\n  - " + "\n  - ".join(problems))

    def text(self) -> str:
        total_in = self.samples + self.dropped
        peak = max((c for _, _, c in self.length_histogram), default=1) or 1
        lines = [
            f"samples {self.samples:,}  tokens {self.tokens:,}  supervised {self.supervised_tokens:,} "
            f"({self.supervised_tokens / max(self.tokens, 1):.0%})",
            f"over-long: truncated {self.truncated} ({self.truncated / max(total_in, 1):.1%}), dropped "
            f"{self.dropped} ({self.dropped / max(total_in, 1):.1%}), split {self.split}",
            f"packed into {self.rows:,} rows of {self.seq_len}: efficiency {self.packing_efficiency:.1%}",
            "sample lengths:",
        ]
        if self.special_text_kept:
            lines.insert(2, f"special-token text inside messages (e.g. '<|im_end|>' written in a message), encoded as "
                            f"plain text, not as the token: {self.special_text_kept:,}")
        lines += [f"  {lo:>6}-{hi:<6} {c:>7,} {'#' * round(30 * c / peak)}" for lo, hi, c in self.length_histogram]
        return "\n".join(lines)


def debug_view(tokenizer, ids, weights, limit: int = 400) -> str:
    """One sample as token / label pairs; '-' marks a masked token (no loss), '+' a target."""
    pieces = [tokenizer.decode([int(i)]) for i in ids[:limit]]
    return "\n".join(f"{'+' if w else '-'} {int(i):>7} {p!r}" for i, w, p in zip(ids[:limit], weights[:limit], pieces))

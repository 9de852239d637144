"""Cleaning of training records: normalise the text, then drop boilerplate ("slop"), bad lengths and duplicates.

Works on the text fields of every record shape jaxtune trains on: `text`, `instruction`/`input`/`output`,
chat `messages[*].content` and ShareGPT `conversations[*].value`. Every removal is counted by reason
with a few examples, so a filter that is too eager shows itself in the report.
"""
from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Iterable

from jaxtune.errors import JaxtuneError

TEXT_FIELDS = ("text", "instruction", "input", "output")
TURN_FIELDS = (("messages", "content"), ("conversations", "value"))
REASONS = ("slop", "too short", "too long", "exact duplicate", "near duplicate")
DEFAULT_SLOP_FILE = Path(__file__).with_name("slop_phrases.txt")
NUM_PERM = 64
SHINGLE_WORDS = 5
EXAMPLES = 3
EXAMPLE_CHARS = 120
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


def load_phrases(path) -> list[str]:
    """Phrases from a file, one a line; blank lines and `#` comment lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise JaxtuneError(f"cannot read slop phrases from {path} ({e}); "
                           f"pass a UTF-8 text file, one phrase a line") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class CleanOptions:
    min_chars: int = 1  # over all text fields of a record
    max_chars: int | None = None
    slop: str = "drop"  # "drop" the record, or "strip" the sentences that hold a phrase
    slop_phrases: list[str] = field(default_factory=lambda: load_phrases(DEFAULT_SLOP_FILE))
    dedup: bool = True
    near_dup_threshold: float | None = 0.85  # Jaccard of word 5-gram shingles; None: exact duplicates only
    normalize: str | None = "NFC"

    def __post_init__(self):
        if self.slop not in ("drop", "strip"):
            raise JaxtuneError(f"slop must be 'drop' or 'strip', got {self.slop!r}")
        if self.near_dup_threshold is not None and not 0 < self.near_dup_threshold <= 1:
            raise JaxtuneError(f"near-dup threshold must be in (0, 1], got {self.near_dup_threshold}")


@dataclass
class CleanReport:
    """What cleaning removed and why, with up to three examples per reason."""
    kept: int = 0
    removed: Counter = field(default_factory=Counter)
    stripped_sentences: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def remove(self, reason: str, text: str, at: int = 0) -> None:
        self.removed[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(_excerpt(text, at))

    def summary(self) -> str:
        head = f"cleaning kept {self.kept} records, removed {sum(self.removed.values())}"
        if self.stripped_sentences:
            head += f", stripped {self.stripped_sentences} slop sentences"
        lines = [head]
        for reason in REASONS:
            if self.removed[reason]:
                lines.append(f"  {reason}: {self.removed[reason]}")
                lines += [f"    e.g. {example}" for example in self.examples[reason]]
        return "\n".join(lines)


def _excerpt(text: str, at: int = 0) -> str:
    """One line of at most EXAMPLE_CHARS characters, from `at` (where the slop phrase starts)."""
    line = ("..." if at else "") + " ".join(text[at:].split())
    if not line:
        return "(empty)"
    return line if len(line) <= EXAMPLE_CHARS else line[:EXAMPLE_CHARS - 3] + "..."


@cache
def _control_chars() -> re.Pattern:
    """Every Cc/Cf character except \\n and \\t: NULs, zero-width spaces, BOMs, bidi marks."""
    chars = (chr(c) for c in range(sys.maxunicode + 1))
    return re.compile("[" + re.escape("".join(
        c for c in chars if unicodedata.category(c) in ("Cc", "Cf") and c not in "\n\t")) + "]")


def _normalize(text: str, form: str | None) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # a bare \r still breaks the line
    if form:
        text = unicodedata.normalize(form, text)
    return _control_chars().sub("", text).strip()


def _phrase_pattern(phrases: list[str]) -> re.Pattern | None:
    if not phrases:
        return None
    alternatives = "|".join(re.escape(p).replace("'", "['’]") for p in phrases)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def _strip_sentences(text: str, pattern: re.Pattern) -> tuple[str, int]:
    """Drop the sentences that hold a phrase; line breaks stay, emptied lines go."""
    lines, dropped = [], 0
    for line in text.split("\n"):
        sentences = _SENTENCE_BREAK.split(line)
        kept = [s for s in sentences if not pattern.search(s)]
        dropped += len(sentences) - len(kept)
        if kept:
            lines.append(" ".join(kept))
    return "\n".join(lines).strip(), dropped


def _copy(record: dict) -> dict:
    """A copy deep enough that cleaning never edits the caller's turns."""
    turns = {key: [dict(t) if isinstance(t, dict) else t for t in record[key]]
             for key, _ in TURN_FIELDS if isinstance(record.get(key), list)}
    return {**record, **turns}


def _text_slots(record: dict) -> list[tuple[dict, str]]:
    """(container, key) of every string text field, so cleaning can rewrite it in place."""
    slots = [(record, key) for key in TEXT_FIELDS if isinstance(record.get(key), str)]
    for list_key, text_key in TURN_FIELDS:
        for turn in record.get(list_key) or []:
            if isinstance(turn, dict) and isinstance(turn.get(text_key), str):
                slots.append((turn, text_key))
    return slots


class _NearDuplicates:
    """MinHash LSH over word 5-gram shingles; the first text of a near-duplicate group is kept."""

    def __init__(self, threshold: float):
        from datasketch import MinHash, MinHashLSH  # imports scipy: slow, and only needed here

        self.threshold = threshold
        # Favour recall: candidates are checked against the threshold, so a false one costs a comparison.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM, weights=(0.1, 0.9))
        self.empty = MinHash(num_perm=NUM_PERM)  # copies share its permutations: 10x faster than new ones
        self.kept = []

    def seen(self, text: str) -> bool:
        """True if `text` is a near duplicate of an earlier one; otherwise remember it."""
        words = re.findall(r"\w+", text.lower())
        if not words:
            return False
        shingles = {" ".join(words[i:i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))}
        signature = self.empty.copy()
        signature.update_batch([s.encode() for s in shingles])
        if any(self.kept[key].jaccard(signature) >= self.threshold for key in self.lsh.query(signature)):
            return True
        self.lsh.insert(len(self.kept), signature)
        self.kept.append(signature)
        return False


def clean_records(records: Iterable[dict], opts: CleanOptions) -> tuple[list[dict], CleanReport]:
    """Normalise, filter slop and length, then drop exact and near duplicates (the first one seen stays)."""
    report = CleanReport()
    slop = _phrase_pattern(opts.slop_phrases)
    exact: set[bytes] = set()
    near = _NearDuplicates(opts.near_dup_threshold) if opts.dedup and opts.near_dup_threshold else None
    kept = []
    for n, record in enumerate(records, 1):
        record = _copy(record)
        slots = _text_slots(record)
        if not slots:
            raise JaxtuneError(f"record {n} has no text to clean (fields: {', '.join(map(str, record)) or 'none'}); "
                               f"records need {', '.join(TEXT_FIELDS)}, messages or conversations: map your "
                               f"columns onto them, e.g. --map instruction=question --map output=answer")
        for obj, key in slots:
            obj[key] = _normalize(obj[key], opts.normalize)
        text = "\n".join(obj[key] for obj, key in slots)
        if slop and (match := slop.search(text)):
            if opts.slop == "drop":
                report.remove("slop", text, match.start())
                continue
            for obj, key in slots:
                obj[key], dropped = _strip_sentences(obj[key], slop)
                report.stripped_sentences += dropped
            text = "\n".join(obj[key] for obj, key in slots)
        size = sum(len(obj[key]) for obj, key in slots)
        if size < opts.min_chars:
            report.remove("too short", text)
            continue
        if opts.max_chars is not None and size > opts.max_chars:
            report.remove("too long", text)
            continue
        if opts.dedup:
            key = "\x1f".join(" ".join(obj[k].lower().split()) for obj, k in slots)
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            if digest in exact:
                report.remove("exact duplicate", text)
                continue
            exact.add(digest)
            if near and near.seen(text):
                report.remove("near duplicate", text)
                continue
        kept.append(record)
    report.kept = len(kept)
    return kept, report

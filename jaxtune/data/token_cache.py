"""The tokenized data on disk: flat arrays that a run memory-maps, built chunk by chunk.

A cache is a directory of three raw arrays — `ids` (int32), `weights` (uint8, 1 = a training target) and
`lengths` (int64, one per sample) — and `ledger.json` (records read, samples, tokens, the data report's
counters). Plain files rather than Arrow (`datasets`) or .npz: appending a chunk is a write at the end of
three files, loading is `np.memmap` (no copy, no decompression, nothing held in RAM but the offsets), and
nothing new is needed to read them.

It is built in `NAME.partial/`: after each chunk the arrays are flushed and then the ledger is replaced
(atomically), so the ledger never counts bytes the arrays lack. An interrupted build is continued from
its ledger (the arrays cut back to it, the records it counts skipped) and only a finished build is renamed
to `NAME/`: no run can take a partial cache for a complete one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxtune.atomic import write_file
from jaxtune.data.formats import Tokenized

ARRAYS = {"ids": np.int32, "weights": np.uint8, "lengths": np.int64}


def load(path: Path) -> Tokenized | None:
    """The finished cache at `path`, memory-mapped; None if there is none."""
    ledger = path / "ledger.json"
    if not ledger.is_file():
        return None
    meta = json.loads(ledger.read_text())
    ids, weights, lengths = (_map(path / name, dtype) for name, dtype in ARRAYS.items())
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Tokenized(ids, weights, offsets, **{name: meta[name] for name in Tokenized.COUNTERS}, key=path.name)


def _map(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Builder:
    """Appends tokenized chunks to `NAME.partial/` (continuing one an earlier run left), then `finish`es."""

    EMPTY = {"records": 0, "samples": 0, "tokens": 0, **dict.fromkeys(Tokenized.COUNTERS, 0)}

    def __init__(self, path: Path, partial: str = ".partial"):
        self.path, self.partial = path, path.with_name(path.name + partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        ledger = self.partial / "ledger.json"
        self.meta = json.loads(ledger.read_text()) if ledger.is_file() else dict(self.EMPTY)
        self._open()

    def _open(self):
        sizes = {"ids": self.meta["tokens"] * 4, "weights": self.meta["tokens"], "lengths": self.meta["samples"] * 8}
        self.files = {}
        for name in ARRAYS:
            f = open(self.partial / name, "ab")
            f.truncate(sizes[name])  # what a crash wrote after the ledger's last update
            f.seek(sizes[name])
            self.files[name] = f

    def restart(self) -> None:
        """Drop what an earlier build wrote (the hosts of a pod disagree on where theirs stopped)."""
        for f in self.files.values():
            f.close()
        self.meta = dict(self.EMPTY)
        self._open()

    @property
    def records_done(self) -> int:
        """Records the ledger counts (an earlier, interrupted build's included): the reader skips them."""
        return self.meta["records"]

    def append(self, chunk: Tokenized, records: int) -> None:
        """A chunk tokenized from the next `records` records."""
        for name, values in (("ids", chunk.ids), ("weights", chunk.weights), ("lengths", chunk.lengths)):
            self.files[name].write(np.ascontiguousarray(values, ARRAYS[name]).tobytes())
            self.files[name].flush()
            os.fsync(self.files[name].fileno())
        self.meta["records"] += records
        self.meta["samples"] += len(chunk)
        self.meta["tokens"] += len(chunk.ids)
        for name in Tokenized.COUNTERS:
            self.meta[name] += int(getattr(chunk, name))
        write_file(self.partial / "ledger.json", lambda f: json.dump(self.meta, f))

    def finish(self) -> None:
        """The cache complete: renamed to its final name, where `load` finds it."""
        for f in self.files.values():
            f.close()
        try:
            os.replace(self.partial, self.path)
        except OSError:  # the hosts of a pod that share a cache directory each build it: the first one stays
            if not (self.path / "ledger.json").is_file():
                raise
            shutil.rmtree(self.partial)


@contextlib.contextmanager
def building(path: Path, partial: str = ".partial") -> Iterator[Builder | None]:
    """A Builder for the cache at `path` (in `path` + `partial` until it is finished), or None when it is
    complete (maybe by another process that held the build lock while this one waited)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + partial + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per cache on this machine; the others wait, then load
        yield None if (path / "ledger.json").is_file() else Builder(path, partial)

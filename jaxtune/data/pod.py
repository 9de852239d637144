"""Tokenizing on a pod: each host tokenizes 1/N of the records and the hosts join them over the job's
collectives, so that every host ends with the cache one process would build, on its own disk.

Chunk c of the record stream is tokenized by host c mod N (every host reads the whole stream: reading
is cheap next to tokenizing). In round k each host contributes its k-th chunk; the chunks are gathered
(jax's process_allgather: DCN/ICI on TPU, gloo on CPU) and every host appends chunks kN .. kN+N-1, in
order, to its cache (jaxtune.data.token_cache). No shared file system is needed, no host waits on a
file another one writes, and the cache is the single-process one byte for byte: the same batches follow.
A round is appended at once, so an interrupted build continues from a round boundary when the hosts'
ledgers agree (else they start over together).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np

from jaxtune.data import token_cache
from jaxtune.data.formats import Tokenized
from jaxtune.errors import JaxtuneError

HEAD = ("chunk", "records", "samples", "tokens", *Tokenized.COUNTERS)  # what a host says of its chunk in a round


def _gather(values: np.ndarray) -> np.ndarray:
    """[hosts, ...]: this host's int32 array next to every other host's (same shape on each)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))


def _bucket(n: int) -> int:
    """Payloads padded to a power of two: a handful of shapes, so a handful of gather programs compiled."""
    return 1 << max(16, (max(n, 1) - 1).bit_length())


def build(path: Path, located: Callable[[int], Iterator], tokenize: Callable, chunk_records: int,
          progress: Callable) -> None:
    """The cache at `path` on this host, tokenized by all hosts. `located(skip)` is the (where, record)
    stream past `skip` records; `tokenize(chunks)` yields (chunk, Tokenized) in order; `progress(done)`
    opens the bar."""
    me, hosts = jax.process_index(), jax.process_count()
    # Hosts that share a cache directory each build in their own partial directory (the first finished stays).
    with token_cache.building(path, partial=f".partial{me}") as builder:
        complete = _gather([builder is None])
        if complete.all():
            return
        done = _gather([builder.records_done if builder else 0])
        if builder and (done != done[0]).any():
            builder.restart()
        skip = int(done[0, 0]) if (done == done[0]).all() else 0
        stream = located(skip)
        chunks = iter(lambda: list(itertools.islice(stream, chunk_records)), [])
        mine = iter(tokenize(chunk for c, chunk in enumerate(chunks) if c % hosts == me))
        with progress(skip) as bar:
            while (joined := _round(_next(mine))) is not None:
                tokenized, records = joined
                if builder:
                    builder.append(tokenized, records)
                bar.advance(records, len(tokenized.ids))
        if builder:
            builder.finish()


def _next(mine: Iterator) -> tuple[list, Tokenized] | JaxtuneError | None:
    """This host's next chunk, tokenized; None when it has no more; the error of bad data in it (which the
    other hosts must hear of, or they would wait for this one in the next gather)."""
    try:
        return next(mine, None)
    except JaxtuneError as e:
        return e


def _round(result: tuple[list, Tokenized] | JaxtuneError | None) -> tuple[Tokenized, int] | None:
    """Every host's chunk of this round, in host order, as one (Tokenized, records); None once no host has one.
    A host's data error is raised on every host."""
    head = np.zeros(len(HEAD), np.int64)
    payload = np.zeros(0, np.int32)
    if isinstance(result, JaxtuneError):
        payload = np.frombuffer(str(result).encode(), np.uint8).astype(np.int32)
        head[[0, 3]] = -1, len(payload)
    elif result is not None:
        chunk, tokenized = result
        head[:] = [1, len(chunk), len(tokenized), len(tokenized.ids), *tokenized.counters().values()]
        # ids and weights as one int32 per token (id * 2 + weight): vocabularies stay far below 2**30
        payload = np.concatenate([tokenized.lengths, tokenized.ids.astype(np.int64) * 2 + tokenized.weights])
    heads = _gather(head)
    if not heads[:, 0].any():
        return None
    padded = np.zeros(_bucket(int((heads[:, 2] + heads[:, 3]).max())), np.int32)
    padded[:len(payload)] = payload
    payloads = _gather(padded)
    for host, ((state, _, _, size, *_), values) in enumerate(zip(heads, payloads)):
        if state < 0:
            message = values[:size].astype(np.uint8).tobytes().decode(errors="replace")
            raise JaxtuneError(message if host == jax.process_index() else f"host {host}: {message}")
    lengths, tokens = [], []
    for (_, _, samples, n_tokens, *_), values in zip(heads, payloads):
        lengths.append(values[:samples])
        tokens.append(values[samples:samples + n_tokens])
    tokens = np.concatenate(tokens)
    counters = dict(zip(Tokenized.COUNTERS, heads[:, 4:].sum(axis=0).tolist()))
    joined = Tokenized(tokens >> 1, (tokens & 1).astype(np.uint8),
                       np.concatenate([[0], np.cumsum(np.concatenate(lengths), dtype=np.int64)]), **counters)
    return joined, int(heads[:, 1].sum())

"""Records from files / the hub / TFDS -> tokenized (cached on disk) -> packed rows -> global batches.

The tokenization cache is keyed by the content of the data files, the tokenizer files and the format
options, so the second run starts at once and any change to one of them re-tokenizes. Batches are
shuffled deterministically per (seed, epoch); the state (epoch, position) is two ints that
checkpoints save. Each process reads only its slice of every global batch (`Batches.next_step`; the
processes of a context group that spans hosts read the same slice); the trainer joins the slices into one
global array, each process putting its own devices' pieces (`Steps.to_device`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import jax
import numpy as np

from jaxtune import distributed
from jaxtune.cache import cache_dir as default_cache_dir
from jaxtune.data import packing, pod, records, token_cache
from jaxtune.data.formats import Formatter, FormatOptions, Selection, Tokenized
from jaxtune.data.preflight import DataReport
from jaxtune.errors import JaxtuneError

CACHE_VERSION = 4  # 2: chat spans must follow the assistant header (a short turn could match earlier text);
# 3: special-token text inside message content is plain text; a tokenizer without a template gets adapted ChatML;
# 4: a directory of flat arrays, built chunk by chunk (jaxtune.data.token_cache)
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(source: str) -> list[dict]:
    """Local .jsonl/.json/.csv/.parquet, `tfds:NAME[:split]`, or a hub dataset name (online)."""
    return [record for _, record in iter_located(source)]


def iter_located(source: str) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs of a source, read as they are used (a JSONL file line by line, csv/parquet/hub
    through Arrow's memory map, tfds example by example). `where` names the file:line or item of a JSON/JSONL
    record, so that data errors point into the file, else "SOURCE record N" (1-based)."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json") and path.is_file():  # file:line errors for hand-made data
        hint = f"or run `jaxtune prepare {path} --skip-bad-rows --out CLEAN.jsonl` to write a copy without them"
        yield from records.read_located(path, skip_hint=hint)
        return
    for n, record in enumerate(_other_records(source), 1):
        yield f"{source} record {n}", record


def _other_records(source: str) -> Iterable[dict]:
    if source.startswith("tfds:"):
        return _tfds_records(source[5:])
    path = Path(source).expanduser()
    import datasets

    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise JaxtuneError(f"{path}: no such data file")
        return datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train")
    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline or unknown name
        raise JaxtuneError(f"{source}: not a local data file ({', '.join(LOCAL_SUFFIXES)}) and not loadable "
                           f"from the hub ({type(e).__name__}: {str(e)[:200]})") from None


def _tfds_records(spec: str) -> Iterator[dict]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise JaxtuneError("tfds: sources need the optional extra: pip install 'jaxtune[tfds]'") from None
    name, _, split = spec.partition(":")
    data_dir = os.environ.get("TFDS_DATA_DIR")
    ds = tfds.load(name, split=split or "train", data_dir=data_dir)

    def plain(value):
        value = value.decode() if isinstance(value, bytes) else value
        return value.tolist() if isinstance(value, np.ndarray) else value

    return ({k: plain(v) for k, v in ex.items()} for ex in tfds.as_numpy(ds))


def _fingerprint(sources: list[str], tokenizer_dir: str | None, opts: FormatOptions) -> str:
    h = hashlib.sha256(json.dumps([CACHE_VERSION, dataclasses.asdict(opts)]).encode())
    for src in sources:
        path = Path(src).expanduser()
        if path.is_file():
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        else:
            h.update(src.encode())  # hub / tfds names: keyed by name
    for fname in sorted(Path(tokenizer_dir).glob("*")) if tokenizer_dir else []:
        if fname.name.startswith(("tokenizer", "special_tokens", "chat_template", "added_tokens")):
            h.update(fname.name.encode() + fname.read_bytes())
    return h.hexdigest()[:24]


CHUNK_RECORDS = 4096  # records tokenized at a time: what the build holds in memory, whatever the data's size


def tokenize_sources(sources: list[str], tokenizer_dir: str, opts: FormatOptions, *, cache_dir: Path | None = None,
                     chunk_records: int = CHUNK_RECORDS, workers: int | None = None, progress: bool = True) -> Tokenized:
    """Every record of `sources`, tokenized, through an on-disk cache (jaxtune.data.token_cache) that is
    built chunk by chunk and then memory-mapped, so memory does not grow with the data; a build that was
    interrupted continues where it stopped. Each chunk's chat templates are rendered once per conversation
    and its texts encoded by one batch call into the Rust tokenizer; past the first chunk, `workers`
    processes (default: one per two cores; on 2 cores this process alone was fastest) tokenize the chunks
    (jaxtune.data.tokenize_worker). In a job of several processes (the hosts of a pod) each tokenizes 1/N of
    the chunks and all join them into the same cache (jaxtune.data.pod)."""
    path = Path(cache_dir or default_cache_dir() / "tokenized") / _fingerprint(sources, tokenizer_dir, opts)

    def located(skip: int) -> Iterator[tuple[str, dict]]:
        return itertools.islice(itertools.chain.from_iterable(map(iter_located, sources)), skip, None)

    def tokenize(chunks: Iterator[list]):
        return _tokenized(chunks, tokenizer_dir, opts, workers)

    def bar(done: int):
        return _progress(sources, done, progress)

    if jax.distributed.is_initialized() and jax.process_count() > 1:  # the hosts of a pod: each does 1/N
        pod.build(path, located, tokenize, chunk_records, bar)
        return token_cache.load(path)
    with token_cache.building(path) as builder:
        if builder is not None:
            stream = located(builder.records_done)
            with bar(builder.records_done) as progress_bar:
                for chunk, tokenized in tokenize(iter(lambda: list(itertools.islice(stream, chunk_records)), [])):
                    builder.append(tokenized, len(chunk))
                    progress_bar.advance(len(chunk), len(tokenized.ids))
            builder.finish()
    return token_cache.load(path)


def _tokenized(chunks: Iterator[list], tokenizer_dir: str, opts: FormatOptions, workers: int | None):
    """(chunk, Tokenized) in order: the first chunk here (small data needs no process), the rest by the
    worker processes."""
    from jaxtune.data import tokenize_worker
    from jaxtune.models.hf import load_tokenizer

    first = next(chunks, None)
    if first is None:
        return
    formatter = Formatter(load_tokenizer(tokenizer_dir), opts)
    wheres, records = zip(*first)
    yield first, formatter.tokenize(list(records), wheres=list(wheres))
    workers = workers or max(1, len(os.sched_getaffinity(0)) // 2)  # the Rust tokenizer keeps ~2 cores busy
    if workers == 1:
        for chunk in chunks:
            wheres, records = zip(*chunk)
            yield chunk, formatter.tokenize(list(records), wheres=list(wheres))
        return
    yield from tokenize_worker.tokenized(chunks, tokenizer_dir, opts, workers)


def _progress(sources: list[str], done: int, enabled: bool):
    """A bar over the records being tokenized (`done` already): records/s, tokens/s, and an ETA where the
    count is known (JSONL files: their lines, counted at disk speed). `advance(records, tokens)` moves it."""
    from tqdm import tqdm

    class Bar(tqdm):
        tokens = 0

        def advance(self, records: int, tokens: int):
            self.tokens += tokens
            self.update(records)
            self.set_postfix_str(f"{self.tokens / max(self.format_dict['elapsed'], 1e-9):,.0f} tokens/s", refresh=False)

    total = 0
    for src in sources:
        path = Path(src).expanduser()
        if path.suffix != ".jsonl" or not path.is_file():
            total = None
            break
        with open(path, "rb") as f:
            total += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
    return Bar(total=total, initial=done, unit=" records", desc="tokenizing", smoothing=0.1,
               disable=not (enabled and distributed.is_main()), mininterval=1.0, delay=2)


def split_validation(data: Tokenized, fraction: float, seed: int) -> tuple[Selection, Selection]:
    """Hold out a deterministic `fraction` of samples (at least one) for validation: two selections of
    sample numbers over the same (memory-mapped) arrays, no token copied.

    The training part keeps the source's counters (truncated, unlabelled turn ends, ...): they
    describe the data as a whole, and the preflight check must see them."""
    n = len(data)
    n_val = max(1, int(round(n * fraction))) if fraction > 0 else 0
    if n_val >= n:
        raise JaxtuneError(f"data.val_fraction={fraction} leaves no training samples out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    return data.select(np.sort(order[n_val:]), **data.counters()), data.select(np.sort(order[:n_val]))


@dataclasses.dataclass
class PackedData:
    """What a run trains and evaluates on, with the reports shown before it starts."""

    train: packing.Packed
    val: packing.Packed | None
    train_report: DataReport
    val_report: DataReport | None
    train_tokenized: Tokenized | Selection
    chat_template: str | None = None  # the Jinja source the records were rendered with (None: no template)


def overlap(train, val) -> int:
    """Validation samples that are also training samples, token for token (compared by digest: a set of
    16-byte digests, not of the training tokens)."""
    def digests(data):
        return (hashlib.blake2b(data.sample(i)[0].tobytes(), digest_size=16).digest() for i in range(len(data)))

    seen = set(digests(train))
    return sum(d in seen for d in digests(val))


def build(train_sources: list[str], tokenizer_dir: str, opts: FormatOptions, *, val_sources: list[str] = (),
          val_fraction: float = 0.0, seed: int = 0, cache_dir: Path | None = None, progress: bool = True) -> PackedData:
    """Tokenize (cached; a progress bar while it runs), hold out validation (separate files, or a fraction),
    pack, report."""
    template = chat_template(tokenizer_dir, opts)
    train = tokenize_sources(list(train_sources), tokenizer_dir, opts, cache_dir=cache_dir, progress=progress)
    if val_sources:
        val = tokenize_sources(list(val_sources), tokenizer_dir, opts, cache_dir=cache_dir, progress=progress)
        shared = overlap(train, val)
        if shared:
            print(f"warning: {shared} of {len(val.offsets) - 1} validation samples ({', '.join(val_sources)}) are "
                  f"also training samples, token for token: the held-out loss flatters the run there; hold out "
                  "other records (or data.val_fraction)")
    elif val_fraction > 0:
        train, val = split_validation(train, val_fraction, seed)
    else:
        val = None
    train_rows = packing.Packed(train, opts.seq_len)
    val_rows = packing.Packed(val, opts.seq_len) if val is not None else None
    return PackedData(train_rows, val_rows, DataReport.build(train, train_rows, opts.seq_len),
                      DataReport.build(val, val_rows, opts.seq_len) if val is not None else None, train, template)


def chat_template(tokenizer_dir: str, opts: FormatOptions) -> str | None:
    """The template chat records are rendered with, said in the log (a warning where jaxtune picked it because
    the tokenizer has none): the run trains on it, so its exports and its eval prompt must use it too."""
    if opts.format not in ("chat", "alpaca"):
        return None
    from jaxtune.models.hf import load_tokenizer

    formatter = Formatter(load_tokenizer(tokenizer_dir), opts)
    print(f"{'warning: ' * formatter.template_is_fallback}chat template: {formatter.template_note}")
    return formatter.template_source


class Batches:
    """Deterministic, resumable sequence of global batches over packed rows (`next_step`).

    Epoch e visits the rows in `permutation(seed, e)`; `state` = {"epoch", "position"} is all a
    checkpoint needs to continue exactly. An incomplete final batch of an epoch is dropped (static
    shapes); `len(rows) < global_batch` is an error.
    """

    def __init__(self, rows: packing.Packed | dict[str, np.ndarray], global_batch: int, *, seed: int = 0,
                 feed: tuple[int, int] | None = None):
        self.rows, self.global_batch, self.seed = packing.as_rows(rows), global_batch, seed
        self._feed = feed
        self.n_rows = len(self.rows)
        if self.n_rows < global_batch:
            raise JaxtuneError(f"only {self.n_rows} packed rows for a global batch of {global_batch}: "
                               "use more data, a smaller batch or a shorter data.seq_len")
        self.steps_per_epoch = self.n_rows // global_batch
        self.state = {"epoch": 0, "position": 0}
        if global_batch % self.feed[1]:
            raise JaxtuneError(f"global batch {global_batch} is not divisible by {self.feed[1]} processes")

    @property
    def feed(self) -> tuple[int, int]:
        """(this process's share of each batch, shares): one per process, unless a context group spans hosts
        (jaxtune.sharding.row_feeds): its processes are given the same rows."""
        return self._feed or (jax.process_index(), jax.process_count())

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def local_indices(self, epoch: int, position: int) -> np.ndarray:
        """This process's rows of global batch `position` of `epoch`."""
        batch = self.order(epoch)[position * self.global_batch:(position + 1) * self.global_batch]
        feed, feeds = self.feed
        per_feed = self.global_batch // feeds
        return batch[feed * per_feed:(feed + 1) * per_feed]

    def next_step(self) -> tuple[dict, int]:
        """(this process's rows of the next global batch, supervised tokens in the whole global batch).

        Every process knows the targets of every row (the packing plan), so the global count needs no
        communication; the loss divides by it, which makes accumulation over uneven micro-batches exact.
        Only this process's rows are built (from the memory-mapped cache)."""
        epoch, position = self.state["epoch"], self.state["position"]
        global_rows = self.order(epoch)[position * self.global_batch:(position + 1) * self.global_batch]
        supervised = int(self.rows.targets_per_row[global_rows].sum())
        idx = self.local_indices(epoch, position)
        position += 1
        if position == self.steps_per_epoch:
            epoch, position = epoch + 1, 0
        self.state = {"epoch": epoch, "position": position}
        return self.rows.take(idx), supervised

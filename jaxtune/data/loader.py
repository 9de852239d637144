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
import json
import os
from pathlib import Path

import jax
import numpy as np

from jaxtune.atomic import write_file
from jaxtune.cache import cache_dir as default_cache_dir
from jaxtune.data import packing, records
from jaxtune.data.formats import Formatter, FormatOptions, Tokenized
from jaxtune.data.preflight import DataReport
from jaxtune.errors import JaxtuneError

CACHE_VERSION = 3  # 2: chat spans must follow the assistant header (a short turn could match earlier text);
# 3: special-token text inside message content is plain text; a tokenizer without a template gets adapted ChatML
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(source: str) -> list[dict]:
    """Local .jsonl/.json/.csv/.parquet, `tfds:NAME[:split]`, or a hub dataset name (online)."""
    return load_located(source)[0]


def load_located(source: str) -> tuple[list[dict], list[str] | None]:
    """Records and, for JSONL/JSON files, where each one is (file:line, or item, 1-based), so that data errors
    point into the file; None for other sources, whose errors count records from 1."""
    path = Path(source).expanduser()
    if path.suffix in (".jsonl", ".json") and path.is_file():  # file:line errors for hand-made data
        hint = f"or run `jaxtune prepare {path} --skip-bad-rows --out CLEAN.jsonl` to write a copy without them"
        located = list(records.read_located(path, skip_hint=hint))
        return [record for _, record in located], [where for where, _ in located]
    return _other_records(source), None


def _other_records(source: str) -> list[dict]:
    if source.startswith("tfds:"):
        return _tfds_records(source[5:])
    path = Path(source).expanduser()
    import datasets

    if path.suffix in LOCAL_SUFFIXES:
        if not path.is_file():
            raise JaxtuneError(f"{path}: no such data file")
        return list(datasets.load_dataset(LOCAL_SUFFIXES[path.suffix], data_files=str(path), split="train"))
    name, _, split = source.partition(":")
    try:
        return list(datasets.load_dataset(name, split=split or "train"))
    except Exception as e:  # offline or unknown name
        raise JaxtuneError(f"{source}: not a local data file ({', '.join(LOCAL_SUFFIXES)}) and not loadable "
                           f"from the hub ({type(e).__name__}: {str(e)[:200]})") from None


def _tfds_records(spec: str) -> list[dict]:
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

    return [{k: plain(v) for k, v in ex.items()} for ex in tfds.as_numpy(ds)]


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


def _concat(parts: list[Tokenized]) -> Tokenized:
    offsets = [np.zeros(1, np.int64)]
    total = 0
    for p in parts:
        offsets.append(p.offsets[1:] + total)
        total += p.offsets[-1]
    return Tokenized(np.concatenate([p.ids for p in parts]), np.concatenate([p.weights for p in parts]),
                     np.concatenate(offsets), **{f: sum(getattr(p, f) for p in parts) for f in Tokenized.COUNTERS})


def tokenize_sources(sources: list[str], tokenizer_dir: str, opts: FormatOptions, *,
                     cache_dir: Path | None = None) -> Tokenized:
    """Tokenize every record of `sources` through an on-disk cache.

    Tokenization is one batch call per source into the Rust tokenizer, which encodes in parallel on
    all cores; chat templates are rendered once per conversation (see Formatter.chat_spans), so no
    Python process pool is needed (and none can deadlock on JAX's threads after a fork)."""
    cache = Path(cache_dir or default_cache_dir() / "tokenized") / f"{_fingerprint(sources, tokenizer_dir, opts)}.npz"
    if cache.is_file():
        z = np.load(cache)
        return Tokenized(z["ids"], z["weights"], z["offsets"], **{f: int(z[f]) for f in Tokenized.COUNTERS})
    from jaxtune.models.hf import load_tokenizer

    formatter = Formatter(load_tokenizer(tokenizer_dir), opts)
    parts = []
    for src in sources:
        located, wheres = load_located(src)
        parts.append(formatter.tokenize(located, src, wheres))
    data = _concat(parts) if parts else Tokenized.from_samples([])
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_file(cache, lambda f: np.savez(f, ids=data.ids, weights=data.weights, offsets=data.offsets,
                                         **data.counters()), binary=True)
    return data


def split_validation(data: Tokenized, fraction: float, seed: int) -> tuple[Tokenized, Tokenized]:
    """Hold out a deterministic `fraction` of samples (at least one) for validation.

    The training part keeps the source's counters (truncated, unlabelled turn ends, ...): they
    describe the data as a whole, and the preflight check must see them."""
    n = len(data)
    n_val = max(1, int(round(n * fraction))) if fraction > 0 else 0
    if n_val >= n:
        raise JaxtuneError(f"data.val_fraction={fraction} leaves no training samples out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    train = Tokenized.from_samples([data.sample(i) for i in np.sort(order[n_val:])], **data.counters())
    return train, Tokenized.from_samples([data.sample(i) for i in np.sort(order[:n_val])])


@dataclasses.dataclass
class PackedData:
    """What a run trains and evaluates on, with the reports shown before it starts."""

    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray] | None
    train_report: DataReport
    val_report: DataReport | None
    train_tokenized: Tokenized
    chat_template: str | None = None  # the Jinja source the records were rendered with (None: no template)


def overlap(train, val) -> int:
    """Validation samples that are also training samples, token for token."""
    seen = {train.ids[a:b].tobytes() for a, b in zip(train.offsets[:-1], train.offsets[1:])}
    return sum(val.ids[a:b].tobytes() in seen for a, b in zip(val.offsets[:-1], val.offsets[1:]))


def build(train_sources: list[str], tokenizer_dir: str, opts: FormatOptions, *, val_sources: list[str] = (),
          val_fraction: float = 0.0, seed: int = 0, cache_dir: Path | None = None) -> PackedData:
    """Tokenize (cached), hold out validation (separate files, or a fraction), pack, report."""
    template = chat_template(tokenizer_dir, opts)
    train = tokenize_sources(list(train_sources), tokenizer_dir, opts, cache_dir=cache_dir)
    if val_sources:
        val = tokenize_sources(list(val_sources), tokenizer_dir, opts, cache_dir=cache_dir)
        shared = overlap(train, val)
        if shared:
            print(f"warning: {shared} of {len(val.offsets) - 1} validation samples ({', '.join(val_sources)}) are "
                  f"also training samples, token for token: the held-out loss flatters the run there; hold out "
                  "other records (or data.val_fraction)")
    elif val_fraction > 0:
        train, val = split_validation(train, val_fraction, seed)
    else:
        val = None
    train_rows = packing.pack(train, opts.seq_len)
    val_rows = packing.pack(val, opts.seq_len) if val is not None else None
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

    def __init__(self, rows: dict[str, np.ndarray], global_batch: int, *, seed: int = 0,
                 feed: tuple[int, int] | None = None):
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        self._feed = feed
        self.n_rows = len(rows["tokens"])
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

        Every process holds all packed rows, so the global count needs no communication; the loss
        divides by it, which makes accumulation over uneven micro-batches exact."""
        epoch, position = self.state["epoch"], self.state["position"]
        global_rows = self.order(epoch)[position * self.global_batch:(position + 1) * self.global_batch]
        supervised = int(self.rows["weights"][global_rows].sum())
        idx = self.local_indices(epoch, position)
        position += 1
        if position == self.steps_per_epoch:
            epoch, position = epoch + 1, 0
        self.state = {"epoch": epoch, "position": position}
        return {k: v[idx] for k, v in self.rows.items()}, supervised

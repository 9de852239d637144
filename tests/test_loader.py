"""Sources, the tokenization cache, validation split, and the resumable per-host batch iterator."""
import json
import time

import jax
import numpy as np
import pytest

from jaxtune import JaxtuneError, sharding
from jaxtune.data import loader, packing
from jaxtune.data.formats import FormatOptions, Tokenized

RECORDS = [{"text": f"document number {i} " + "word " * (i % 13)} for i in range(60)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def toy_rows(n=10, t=8):
    return {name: np.arange(n * t, dtype=np.int32).reshape(n, t) + 1000 * k
            for k, name in enumerate(packing.ROW_FIELDS)}


def test_sources_jsonl_csv_parquet(tmp_path):
    import pandas as pd

    write_jsonl(tmp_path / "a.jsonl", RECORDS[:3])
    pd.DataFrame(RECORDS[:3]).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(RECORDS[:3]).to_parquet(tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.csv", "a.parquet"):
        assert [r["text"] for r in loader.load_records(str(tmp_path / name))] == [r["text"] for r in RECORDS[:3]]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "ok"}\n')
    with pytest.raises(JaxtuneError, match=r"bad.jsonl:2: malformed JSON .*broken"):
        loader.load_records(str(path))


def test_bad_line_advice_fits_training(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(JaxtuneError) as e:
        loader.load_records(str(path))
    assert str(e.value) == (f"{path}:2: expected an object, got [1, 2]; fix or remove the line, or run "
                            f"`jaxtune prepare {path} --skip-bad-rows --out CLEAN.jsonl` to write a copy without them")


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
NULL_CONTENT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None}]}


def test_data_errors_name_the_line_or_item_and_field(tmp_path, smollm2_dir):
    opts = FormatOptions("chat", seq_len=64)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(CHAT) + "\n\n" + json.dumps(NULL_CONTENT) + "\n")  # the bad record is on line 3
    with pytest.raises(JaxtuneError, match=rf"^{jsonl}:3: messages\[1\]\.content is null, expected a string"):
        loader.tokenize_sources([str(jsonl)], str(smollm2_dir), opts, cache_dir=tmp_path / "c")
    items = tmp_path / "d.json"
    items.write_text(json.dumps([CHAT, {"text": "no messages"}]))
    with pytest.raises(JaxtuneError, match=rf"^{items} item 2: a chat record needs 'messages'"):
        loader.tokenize_sources([str(items)], str(smollm2_dir), opts, cache_dir=tmp_path / "c")


def test_a_bad_record_tokenized_by_a_worker_process_names_its_line(tmp_path, smollm2_dir):
    """Past the first chunk, records are tokenized by other processes: their errors still name the file:line."""
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(CHAT if n != 30 else NULL_CONTENT) + "\n" for n in range(1, 41)))
    with pytest.raises(JaxtuneError, match=rf"^{jsonl}:30: messages\[1\]\.content is null, expected a string"):
        loader.tokenize_sources([str(jsonl)], str(smollm2_dir), FormatOptions("chat", seq_len=64),
                                cache_dir=tmp_path / "c", chunk_records=7, workers=2)
    assert not [p for p in (tmp_path / "c").iterdir() if p.is_dir() and not p.name.endswith(".partial")]


def test_preflight_errors_are_one_line(tmp_path, smollm2_dir, capsys, monkeypatch):
    from jaxtune.cli import main

    monkeypatch.setenv("JAXTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", [CHAT, NULL_CONTENT])
    broken = tmp_path / "broken_template"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((smollm2_dir / name).read_bytes())
    (broken / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    for model, expected in [(smollm2_dir, f"{data}:2: messages[1].content is null, expected a string"),
                            (broken, f"the chat template of the tokenizer in {broken} is not valid Jinja: "
                                     f"template line 2: unexpected '}}'")]:
        assert main(["preflight", str(data), "--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().split("\n")) <= 3
        assert err.startswith(f"jaxtune preflight: error: {expected}"), err


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(JaxtuneError, match="no such data file"):
        loader.load_records(str(tmp_path / "nope.jsonl.csv"))


def test_tfds_source(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyTexts(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, r in enumerate(RECORDS[:4]):
                yield i, r

    TinyTexts(data_dir=str(tmp_path)).download_and_prepare()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert sorted(r["text"] for r in loader.load_records("tfds:tiny_texts")) == sorted(r["text"] for r in RECORDS[:4])


def test_tokenization_cache_is_keyed_by_content(tmp_path, smollm2_dir, monkeypatch):
    src = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    opts = FormatOptions("completion", seq_len=64)
    first = loader.tokenize_sources([str(src)], str(smollm2_dir), opts, cache_dir=tmp_path / "c")
    assert len(first) == 60 and len([p for p in (tmp_path / "c").iterdir() if p.is_dir()]) == 1

    def no_reading(_):
        raise AssertionError("cache miss")

    monkeypatch.setattr(loader, "iter_located", no_reading)
    start = time.perf_counter()
    again = loader.tokenize_sources([str(src)], str(smollm2_dir), opts, cache_dir=tmp_path / "c")
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(again.ids, first.ids)
    np.testing.assert_array_equal(again.offsets, first.offsets)
    with pytest.raises(AssertionError, match="cache miss"):  # new options or new content: re-tokenize
        loader.tokenize_sources([str(src)], str(smollm2_dir), FormatOptions("completion", seq_len=32), cache_dir=tmp_path / "c")
    write_jsonl(src, RECORDS[:-1])
    with pytest.raises(AssertionError, match="cache miss"):
        loader.tokenize_sources([str(src)], str(smollm2_dir), opts, cache_dir=tmp_path / "c")


def test_the_cache_built_in_chunks_is_the_whole_tokenization_and_an_interrupted_build_continues(
        tmp_path, smollm2_dir, chat_data, monkeypatch):
    """100 chitchat conversations in chunks of 7: the ids, labels and counters of tokenizing them all at once
    (the in-memory path the cache replaced), in one process or three, hence the same packed batches. A build that dies after two
    chunks leaves no cache a run would load; the next run tokenizes only the records after those chunks."""
    from jaxtune.data.formats import Formatter
    from jaxtune.models.hf import load_tokenizer

    src = str(chat_data / "train.jsonl")
    opts = FormatOptions("chat", seq_len=256, overlong="split")
    whole = Formatter(load_tokenizer(str(smollm2_dir)), opts).tokenize(loader.load_records(src))
    calls, tokenize = [], Formatter.tokenize

    def dies_on_the_third_chunk(self, records, *args, **kwargs):
        calls.append(len(records))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return tokenize(self, records, *args, **kwargs)

    monkeypatch.setattr(Formatter, "tokenize", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        loader.tokenize_sources([src], str(smollm2_dir), opts, cache_dir=tmp_path / "c", chunk_records=7, workers=1)
    assert [p.name.endswith(".partial") for p in (tmp_path / "c").iterdir() if p.is_dir()] == [True]
    calls.clear()
    monkeypatch.setattr(Formatter, "tokenize", lambda self, records, *a, **k: (calls.append(len(records)),
                                                                              tokenize(self, records, *a, **k))[1])
    built = loader.tokenize_sources([src], str(smollm2_dir), opts, cache_dir=tmp_path / "c", chunk_records=7,
                                    workers=1)
    assert sum(calls) == 100 - 14 and isinstance(built.ids, np.memmap)
    for name in ("ids", "weights", "offsets"):
        np.testing.assert_array_equal(getattr(built, name), getattr(whole, name))
    assert built.counters() == whole.counters() and whole.split > 0
    pooled = loader.tokenize_sources([src], str(smollm2_dir), opts, cache_dir=tmp_path / "pool", chunk_records=7,
                                     workers=2)  # chunks 2-15 by two tokenizing processes
    for name in ("ids", "weights", "offsets"):
        np.testing.assert_array_equal(getattr(pooled, name), getattr(whole, name))
    rows, again = packing.pack(built, 256), packing.pack(whole, 256)
    for name in packing.ROW_FIELDS:
        np.testing.assert_array_equal(rows[name], again[name])


def test_batches_built_per_step_from_the_memory_map_are_those_of_the_rows_packed_in_memory(
        tmp_path, smollm2_dir, chat_data):
    """The training path (a packing plan over the memory-mapped cache, validation held out by sample numbers,
    each step's rows built when asked) against the one it replaced (every sample copied, every row built
    before training): the same report, the same batches and supervised counts, the same validation rows."""
    from jaxtune.data.formats import Formatter
    from jaxtune.data.preflight import DataReport
    from jaxtune.models.hf import load_tokenizer

    src = str(chat_data / "train.jsonl")
    opts = FormatOptions("chat", seq_len=256, overlong="split")
    whole = Formatter(load_tokenizer(str(smollm2_dir)), opts).tokenize(loader.load_records(src))
    packed = loader.build([src], str(smollm2_dir), opts, val_fraction=0.1, seed=5, cache_dir=tmp_path, progress=False)
    assert isinstance(packed.train.data.base.ids, np.memmap) and len(packed.train) > 8
    order = np.random.default_rng(5).permutation(len(whole))
    n_val = round(len(whole) * 0.1)
    copied = [Tokenized.from_samples([whole.sample(i) for i in np.sort(part)], **counters)
              for part, counters in ((order[n_val:], whole.counters()), (order[:n_val], {}))]
    dense = [packing.pack(part, 256) for part in copied]
    assert packed.train_report == DataReport.build(copied[0], dense[0], 256)
    assert packed.val_report == DataReport.build(copied[1], dense[1], 256)
    planned, in_memory = loader.Batches(packed.train, 4, seed=1), loader.Batches(dense[0], 4, seed=1)
    for _ in range(len(packed.train) // 4 + 2):  # into the second epoch
        (rows, supervised), (expected, expected_supervised) = planned.next_step(), in_memory.next_step()
        assert supervised == expected_supervised
        for name in packing.ROW_FIELDS:
            np.testing.assert_array_equal(rows[name], expected[name])
    for got, expected in zip(loop_eval_batches(packed.val), loop_eval_batches(dense[1])):
        for name in packing.ROW_FIELDS:
            np.testing.assert_array_equal(got[name], expected[name])


def loop_eval_batches(rows):
    from jaxtune.train.loop import eval_batches

    return list(eval_batches(rows, 4, 0))


def test_validation_split_is_deterministic_and_disjoint():
    lengths = np.arange(1, 21)
    data = Tokenized(np.arange(lengths.sum(), dtype=np.int32), np.ones(lengths.sum(), np.uint8),
                     np.concatenate([[0], np.cumsum(lengths)]), turn_ends_unlabelled=2, truncated=3)
    train, val = loader.split_validation(data, 0.2, seed=3)
    train2, val2 = loader.split_validation(data, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    np.testing.assert_array_equal(val.ids, val2.ids)
    assert set(train.ids.tolist()).isdisjoint(val.ids.tolist())
    assert len(train.ids) + len(val.ids) == len(data.ids)
    # the preflight counters survive the split on the side that is checked
    assert (train.turn_ends_unlabelled, train.truncated) == (2, 3)


def first_tokens(batches: loader.Batches) -> list[int]:
    local, _ = batches.next_step()
    return local["tokens"][:, 0].tolist()


def test_batches_deterministic_and_resumable():
    rows = toy_rows(n=9)
    a = loader.Batches(rows, 3, seed=7)
    seen = [first_tokens(a) for _ in range(7)]  # 3 steps/epoch: crosses two epochs
    assert seen[0] != seen[3]  # new order each epoch
    assert sorted(sum(seen[:3], [])) == sorted(sum(seen[3:6], []))  # same rows, reshuffled
    b = loader.Batches(rows, 3, seed=7)
    for _ in range(4):
        b.next_step()
    state = dict(b.state)
    c = loader.Batches(rows, 3, seed=7)
    c.state = state
    assert [first_tokens(c) for _ in range(3)] == seen[4:7]


def test_next_step_counts_supervised_tokens_of_the_global_batch():
    rows = toy_rows(n=6)
    rows["weights"] = (np.arange(6 * 8).reshape(6, 8) % 3 == 0).astype(np.float32)
    batches = loader.Batches(rows, 3, seed=2)
    _, supervised = batches.next_step()
    assert supervised == int(rows["weights"][batches.order(0)[:3]].sum())


def test_each_process_reads_its_slice(monkeypatch):
    rows = toy_rows(n=12)
    batches = loader.Batches(rows, 4, seed=1)
    whole = batches.order(0)[:4]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for p in range(2):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        parts.append(batches.local_indices(0, 0))
    assert [len(x) for x in parts] == [2, 2]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_global_batches_are_sharded_over_data_and_fsdp():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    batch_sharding = sharding.named_sharding(("batch", "length"), (8, 8), mesh)
    batches = loader.Batches(toy_rows(n=16), 8, seed=0)
    local, _ = batches.next_step()  # as the trainer does: this process's rows, then one global array
    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
    assert batch["tokens"].shape == (8, 8) and batch["tokens"].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), toy_rows(16)["tokens"][batches.order(0)[:8]])


def test_too_few_rows():
    with pytest.raises(JaxtuneError, match="only 10 packed rows for a global batch of 16"):
        loader.Batches(toy_rows(), 16)


def test_validation_that_repeats_training_samples_is_named(tmp_path, tiny_dir, chat_data, capsys):
    """Before: a validation file equal to (or overlapping) the training file was accepted silently. (The
    fixture's own split shares a few short samples with training: chitchat repeats some exchanges.)"""
    import re

    opts = FormatOptions(seq_len=128, overlong="split")
    train = str(chat_data / "train.jsonl")

    def shared(val_file) -> int:
        loader.build([train], str(tiny_dir), opts, val_sources=[str(val_file)], cache_dir=tmp_path)
        found = re.search(r"warning: (\d+) of (\d+) validation samples .* are also training samples, token for "
                          r"token", capsys.readouterr().out)
        return int(found.group(1)) if found else 0

    baseline = shared(chat_data / "val.jsonl")
    mixed = tmp_path / "val.jsonl"
    mixed.write_text((chat_data / "val.jsonl").read_text() + (chat_data / "train.jsonl").read_text().splitlines()[0]
                     + "\n")
    assert shared(mixed) > baseline
    loader.build([train], str(tiny_dir), opts, val_sources=[train], cache_dir=tmp_path)
    out = capsys.readouterr().out
    n = int(re.search(r"warning: (\d+) of (\d+) validation", out).group(1))
    assert f"warning: {n} of {n} validation samples" in out  # the training file itself: every sample


def test_the_run_identity_of_packed_data_follows_the_data_the_split_and_the_packing(tmp_path, smollm2_dir):
    """A resumed run is refused when its packed rows differ: the fingerprint of a plan over the cache (by its
    key, not by reading every token) changes with the records, the held-out split and seq_len, not on reload."""
    from jaxtune.train.run_dir import data_fingerprint

    def fingerprint(src, seed=0, seq_len=64):
        packed = loader.build([str(src)], str(smollm2_dir), FormatOptions("completion", seq_len=seq_len),
                              val_fraction=0.1, seed=seed, cache_dir=tmp_path / "c", progress=False)
        assert packed.train.data.base.key is not None
        return data_fingerprint(packed.train)

    src, fewer = write_jsonl(tmp_path / "a.jsonl", RECORDS), write_jsonl(tmp_path / "b.jsonl", RECORDS[:-1])
    first = fingerprint(src)
    assert fingerprint(src) == first
    assert len({first, fingerprint(fewer), fingerprint(src, seed=1), fingerprint(src, seq_len=32)}) == 4

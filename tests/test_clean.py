"""Cleaning: normalised text, slop dropped or stripped, lengths, exact and near duplicates, with a report."""
import argparse
import json
from pathlib import Path

import pytest

from jaxtune.ingest.clean import DEFAULT_SLOP_FILE, CleanOptions, clean_records, load_phrases
from jaxtune.errors import JaxtuneError
from jaxtune.ingest.commands import register_cli

RAW = Path(__file__).parent / "fixtures" / "raw"
RECORDS = [json.loads(line) for line in (RAW / "clean_input.jsonl").read_text().splitlines()]


def test_drop_mode_report_and_survivors():
    kept, report = clean_records(RECORDS, CleanOptions())
    assert report.removed == {"slop": 4, "exact duplicate": 1, "near duplicate": 1, "too short": 1}
    assert report.kept == len(kept) == 6 and report.stripped_sentences == 0
    assert kept[0] == {"instruction": "What is the capital of France?", "output": "The capital of France is Paris."}
    assert kept[1] == {"instruction": "Say hello politely.", "output": "Hello, nice to meet you!\nHow are you?"}
    assert kept[2] == RECORDS[4] and kept[3] == RECORDS[6]  # the first of the near-duplicate pair stays
    assert report.examples["slop"] == [
        "...As an AI language model, I don't have a garden. Photosynthesis turns light, water and carbon dioxide "
        "into sugar an...",
        "...I'm sorry, but I cannot tell jokes. Just kidding! Why did the scarecrow win an award? Because he was "
        "outstanding i...",
        "...I hope this helps!",
    ]
    assert all(len(e) <= 120 for examples in report.examples.values() for e in examples)
    assert report.examples["exact duplicate"] == ["what is the capital of France? The capital of France is Paris."]
    assert report.examples["too short"] == ["(empty)"]  # only zero-width and control characters
    summary = report.summary()
    assert summary.startswith("cleaning kept 6 records, removed 7\n  slop: 4\n    e.g. ...As an AI language model")
    assert "  near duplicate: 1\n    e.g. Sourdough bread relies on" in summary


def test_strip_mode_and_length_limits():
    kept, report = clean_records(RECORDS, CleanOptions(slop="strip", min_chars=10, max_chars=1000))
    assert report.removed == {"too short": 2, "too long": 1, "exact duplicate": 1, "near duplicate": 1}
    assert report.stripped_sentences == 4
    assert report.examples["too short"] == ["ok", "(empty)"]
    assert report.examples["too long"][0].startswith("Server log: 2024-03-01T10:00:00Z INFO")
    assert "stripped 4 slop sentences" in report.summary()
    assert {"instruction": "Explain photosynthesis in one sentence.",
            "output": "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen."} in kept
    assert {"instruction": "Summarise the memo.", "output": "It asks staff to file expenses by Friday."} in kept
    chat = next(r for r in kept if "messages" in r)
    assert chat["messages"][1]["content"] == ("Just kidding! Why did the scarecrow win an award? "
                                              "Because he was outstanding in his field.")
    sharegpt = next(r for r in kept if "conversations" in r)
    assert sharegpt["conversations"][1]["value"] == ("Use my_list.reverse() to reverse in place, "
                                                     "or reversed(my_list) for an iterator.")
    assert "I'm sorry" in RECORDS[8]["messages"][1]["content"]  # the input is left as it was


def test_dedup_switches():
    kept, report = clean_records(RECORDS, CleanOptions(near_dup_threshold=None))
    assert report.removed["exact duplicate"] == 1 and report.removed["near duplicate"] == 0
    kept, report = clean_records(RECORDS, CleanOptions(dedup=False))
    assert len(kept) == 8 and "exact duplicate" not in report.removed
    with pytest.raises(JaxtuneError, match="near-dup threshold must be in"):
        CleanOptions(near_dup_threshold=1.5)
    with pytest.raises(JaxtuneError, match="slop must be 'drop' or 'strip'"):
        CleanOptions(slop="delete")


def test_shipped_phrases_match_case_and_curly_apostrophes(tmp_path):
    phrases = load_phrases(DEFAULT_SLOP_FILE)
    assert len(phrases) >= 30 and "As an AI language model" in phrases and not any(p.startswith("#") for p in phrases)
    records = [{"text": "AS AN AI LANGUAGE MODEL I must say"}, {"text": "I\u2019m sorry, but I can\u2019t do that"},
               {"text": "Hash maps find keys in constant time on average"}]
    kept, report = clean_records(records, CleanOptions())
    assert kept == records[2:] and report.removed == {"slop": 2}

    extra = tmp_path / "mine.txt"
    extra.write_text("# house style\ntangy flavour\n")
    kept, report = clean_records(RECORDS, CleanOptions(slop_phrases=phrases + load_phrases(extra)))
    assert report.removed["slop"] == 6 and report.removed["near duplicate"] == 0  # both sourdough texts


def test_record_without_text_fields_is_an_error():
    with pytest.raises(JaxtuneError, match=r"record 2 has no text to clean \(fields: question, answer\).*--map"):
        clean_records([{"text": "fine"}, {"question": "q", "answer": "a"}], CleanOptions())


def cli(argv):
    parser = argparse.ArgumentParser(prog="jaxtune")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_clean(tmp_path, capsys):
    out = tmp_path / "clean.jsonl"
    cli(["clean", str(RAW / "clean_input.jsonl"), "--out", str(out), "--slop", "strip", "--max-chars", "1000",
         "--no-dedup"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 11  # 13 less the empty one and the long log
    summary = capsys.readouterr().out
    assert "rows in: 13\nrows out: 11\nrows skipped: 0\ncleaning kept 11 records, removed 2, stripped 4" in summary

    bad_out = tmp_path / "bad.jsonl"
    with pytest.raises(JaxtuneError, match="records_bad.jsonl:3: malformed JSON"):
        cli(["clean", str(RAW / "records_bad.jsonl"), "--out", str(bad_out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl"]  # no output, no temp file

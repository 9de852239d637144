"""JSON and JSONL records with errors that name their file:line (or item): the reader training uses,
and the base that `jaxtune prepare` (jaxtune.ingest) builds its other readers on.

A reader yields (where, row) pairs, `row` a dict or a `BadRow`; `usable` turns them into records, raising
on a bad row (with advice that fits the command) or, with skip_bad_rows, counting it in a `Tally`.
Empty rows are counted and skipped either way: nothing is dropped without a count.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from jaxtune.atomic import write_file
from jaxtune.errors import JaxtuneError


@dataclass
class BadRow:
    """A row or statement that cannot be used. With a message it stops the run (unless skip_bad_rows);
    without one (an empty row, a statement with no readable rows) it is only counted."""
    reason: str  # the key it is counted under
    message: str | None = None  # the error, without the advice on skipping


@dataclass
class Tally:
    """Rows read and rows skipped by reason, so a run that drops data says how much and why."""
    rows_in: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: str | None = None  # "file:line: reason", for --strict

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped = self.first_skipped or f"{where}: {reason}"


def read_text(path: Path) -> str:
    """A file's UTF-8 text (a BOM dropped); unreadable, undecodable or blank files are errors."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise JaxtuneError(f"cannot read {path}: {e.strerror}; check the path") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise JaxtuneError(f"{path} is not valid UTF-8: byte {data[e.start]:#04x} at offset {e.start} (line {line}); "
                           f"re-encode it, e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}"
                           ) from None
    if not text.strip():
        raise JaxtuneError(f"{path} is empty; check the export that wrote it, or leave it out")
    return text


def json_rows(path: Path, text: str) -> Iterator[tuple[str, dict | BadRow]]:
    """Items of a JSON list, or of the one list an object holds."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise JaxtuneError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno}); fix it "
                           f"(one object a line needs the .jsonl suffix)") from None
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list):
        raise JaxtuneError(f"{path}: expected a list of objects, or an object holding one such list; convert it")
    for i, item in enumerate(data, 1):
        where = f"{path} item {i}"
        yield where, item if isinstance(item, dict) else BadRow(
            "not an object", f"{where}: expected an object, got {json.dumps(item)[:200]}; fix or remove the item")


def jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, dict | BadRow]]:
    """One object a line; blank lines are skipped."""
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold \u2028
        if line.strip():
            yield jsonl_row(path, n, line)


def jsonl_row(path: Path, n: int, line: str) -> tuple[str, dict | BadRow]:
    """Line `n` of a JSONL file, not blank."""
    where = f"{path}:{n}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        return where, BadRow("malformed JSON", f"{where}: malformed JSON ({e.msg}, column {e.colno}): "
                                               f"{line.strip()[:200]}; fix or remove the line")
    return where, item if isinstance(item, dict) else BadRow(
        "not an object", f"{where}: expected an object, got {line.strip()[:200]}; fix or remove the line")


def streamed_jsonl_rows(path: Path) -> Iterator[tuple[str, dict | BadRow]]:
    """`jsonl_rows` of a file read line by line (memory does not grow with the file), with read_text's errors."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise JaxtuneError(f"cannot read {path}: {e.strerror}; check the path") from None
    with f:
        offset, blank = 0, True
        for n, raw in enumerate(f, 1):  # binary lines end at b"\n" only, as str.split("\n") did
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JaxtuneError(f"{path} is not valid UTF-8: byte {raw[e.start]:#04x} at offset {offset + e.start} "
                                   f"(line {n}); re-encode it, e.g. iconv -f latin1 -t utf-8 {path} > "
                                   f"{path.stem}.utf8{path.suffix}") from None
            offset += len(raw)
            line = line.removeprefix("\ufeff") if n == 1 else line
            if line.strip():
                blank = False
                yield jsonl_row(path, n, line.rstrip("\n"))
    if blank:
        raise JaxtuneError(f"{path} is empty; check the export that wrote it, or leave it out")


JSON_READERS = {".json": json_rows, ".jsonl": jsonl_rows}


def _is_empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or value == [] or value == {}


def usable(rows: Iterable[tuple[str, dict | BadRow]], *, skip_hint: str, skip_bad_rows: bool = False,
           tally: Tally) -> Iterator[tuple[str, dict]]:
    """(where, record) for every usable row. A bad row raises with `skip_hint` (the advice that fits the
    command) or, with skip_bad_rows, is counted in `tally`; an empty row is counted."""
    for where, row in rows:
        tally.rows_in += 1
        if not isinstance(row, BadRow) and all(_is_empty(v) for v in row.values()):
            row = BadRow("empty")
        if isinstance(row, BadRow):
            if row.message and not skip_bad_rows:
                raise JaxtuneError(f"{row.message}, {skip_hint}")
            tally.skip(where, row.reason)
        else:
            yield where, row


def read_located(path: str | Path, *, skip_hint: str) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs of a .json or .jsonl file, `where` naming its file:line (1-based) or item;
    a bad row raises with `skip_hint`, an empty one is skipped."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        return usable(streamed_jsonl_rows(path), skip_hint=skip_hint, tally=Tally())
    reader = JSON_READERS.get(path.suffix.lower())
    if reader is None:
        raise JaxtuneError(f"{path}: not a JSON or JSONL file ({', '.join(JSON_READERS)})")
    return usable(reader(path, read_text(path)), skip_hint=skip_hint, tally=Tally())


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write records as JSONL atomically (a failed run leaves no partial file); returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f) -> int:
        n = 0
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        return n

    return write_file(path, write)

"""`jaxtune prepare`: raw files (HTML, CSV/TSV, SQL dumps, JSON, JSONL) to training records in one JSONL file.

Every reader yields plain dicts; a field mapping turns source columns into the fields training expects
(`instruction`, `output`, ...). A bad row stops the run with its file and line, or, with
--skip-bad-rows, is skipped and counted. Rows and SQL statements that hold nothing usable (an empty row, an
INSERT ... SELECT) are skipped and counted too: nothing is dropped without a line in the summary, and
--strict fails the run if anything was skipped.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from jaxtune.data.records import Tally, write_jsonl
from jaxtune.errors import JaxtuneError
from jaxtune.ingest.clean import CleanOptions, CleanReport, clean_records
from jaxtune.ingest.read import read_records


@dataclass
class Stats(Tally):
    """What happened to the rows of a prepare or clean run: read, written, skipped by reason, cleaned."""
    rows_out: int = 0
    clean: CleanReport | None = None

    def summary(self) -> str:
        lines = [f"rows in: {self.rows_in}", f"rows out: {self.rows_out}",
                 f"rows skipped: {sum(self.skipped.values())}"]
        lines += [f"  {reason}: {n}" for reason, n in self.skipped.most_common()]
        if self.clean is not None:
            lines.append(self.clean.summary())
        return "\n".join(lines)


def _strict(records: Iterable[dict], stats: Stats) -> Iterator[dict]:
    """Fail after the last record, when the count is complete and before the output is renamed into place."""
    found = 0
    for record in records:
        found += 1
        yield record
    if stats.skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in stats.skipped.most_common())
        raise JaxtuneError(f"--strict: could not use {sum(stats.skipped.values())} of {stats.rows_in} rows or "
                           f"statements ({reasons}), the first at {stats.first_skipped}; fix the input, or leave "
                           f"out --strict to write the rest")
    if not found:
        raise JaxtuneError(f"--strict: nothing usable was found in the input ({stats.rows_in} rows or pages read, "
                           "0 records): an HTML page of scripts and navigation only, an empty table? Check the "
                           "input, or --selector for HTML")


def prepare(inputs: list[str | Path], out: str | Path, *, mapping: dict[str, str] | None = None,
            selector: str | None = None, table: str | None = None, skip_bad_rows: bool = False,
            strict: bool = False, clean: CleanOptions | None = None, progress: bool = True) -> Stats:
    """Read every input, optionally clean, write one JSONL file; print and return what happened."""
    stats = Stats()
    records = chain.from_iterable(
        read_records(p, mapping=mapping, selector=selector, table=table, skip_bad_rows=skip_bad_rows, stats=stats)
        for p in inputs)
    if strict:
        records = _strict(records, stats)
    records = tqdm(records, desc="prepare", unit=" records", disable=not progress)
    if clean is not None:
        records, stats.clean = clean_records(records, clean)
    stats.rows_out = write_jsonl(out, records)
    print(stats.summary())
    if not stats.rows_out:
        print(f"warning: nothing usable was found: {out} has no records (an HTML page of scripts and navigation "
              "only, an empty table, or cleaning removed everything?); --strict makes this an error")
    return stats


def clean_file(path: str | Path, out: str | Path, opts: CleanOptions, *, skip_bad_rows: bool = False) -> Stats:
    """`jaxtune clean`: clean the records of one file into `out`; print and return what happened."""
    stats = Stats()
    records = read_records(path, skip_bad_rows=skip_bad_rows, stats=stats)
    kept, stats.clean = clean_records(records, opts)
    stats.rows_out = write_jsonl(out, kept)
    print(stats.summary())
    return stats

"""One raw file (by suffix) to records, with a field mapping applied: the readers that
`jaxtune prepare` and `jaxtune clean` share. JSON and JSONL come from jaxtune.data.records, the reader
training uses, so a file gives the same records and the same file:line errors everywhere."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from jaxtune.data.records import JSON_READERS, BadRow, Tally, read_text, usable
from jaxtune.errors import JaxtuneError
from jaxtune.ingest.delimited import csv_rows
from jaxtune.ingest.html import html_rows

SUFFIXES = (".html", ".htm", ".csv", ".tsv", ".sql", ".json", ".jsonl")
SKIP_HINT = "or skip such rows with --skip-bad-rows"


def _mapped(row: dict, mapping: dict[str, str] | None, where: str) -> dict | BadRow:
    """The row's mapped columns under their field names; a missing column or a NULL (SQL NULL, JSON null)
    in one is a bad row (a record field that is null would only fail much later, in preflight)."""
    if not mapping:
        return row
    for name, column in mapping.items():
        if column not in row:
            return BadRow(f"missing field {name}",
                          f"{where}: field {name!r} maps to column {column!r}, which this row does not have "
                          f"(it has: {', '.join(map(str, row)) or 'nothing'}); fix --map {name}=COLUMN")
        if row[column] is None:
            return BadRow(f"NULL in column {column}",
                          f"{where}: column {column!r} (field {name!r}) is NULL; fill it in the source")
    return {name: row[column] for name, column in mapping.items()}


def _rows(path: Path, suffix: str, selector: str | None, table: str | None):
    text = read_text(path)
    match suffix:
        case ".html" | ".htm":
            return html_rows(path, text, selector)
        case ".csv" | ".tsv":
            return csv_rows(path, text)
        case ".sql":
            from jaxtune.ingest.sql import sql_rows  # sqlparse loads only when a dump is read

            return sql_rows(path, text, table)
        case _:
            return JSON_READERS[suffix](path, text)


def read_records(path: str | Path, *, mapping: dict[str, str] | None = None, selector: str | None = None,
                 table: str | None = None, skip_bad_rows: bool = False, stats: Tally) -> Iterator[dict]:
    """Records of one raw file (by suffix), mapped. A bad row raises naming its file:line (1-based) or
    item, or, with skip_bad_rows, is counted in `stats`, as every empty row is."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise JaxtuneError(f"{path}: cannot read {suffix or 'files without a suffix'}; "
                           f"supported: {', '.join(SUFFIXES)}")
    rows = ((where, row if isinstance(row, BadRow) else _mapped(row, mapping, where))
            for where, row in _rows(path, suffix, selector, table))
    for _, record in usable(rows, skip_hint=SKIP_HINT, skip_bad_rows=skip_bad_rows, tally=stats):
        yield record

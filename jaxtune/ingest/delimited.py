"""CSV and TSV files to records: the dialect is sniffed, the header names the fields."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from jaxtune.data.records import BadRow
from jaxtune.errors import JaxtuneError


def csv_rows(path: Path, text: str):
    try:
        dialect = csv.Sniffer().sniff(text[:65536], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    try:
        header = [name.strip() for name in next(reader)]
        start = reader.line_num + 1
        for row in reader:
            where, start = f"{path}:{start}", reader.line_num + 1  # a quoted field may span lines
            if not row:
                continue
            if len(row) > len(header):
                yield where, BadRow("extra columns", f"{where}: {len(row)} values but the header has {len(header)} "
                                                     "columns; quote fields that hold the delimiter")
            else:
                yield where, dict(zip(header, row))  # a short row lacks the last columns
    except csv.Error as e:
        raise JaxtuneError(f"{path}:{reader.line_num}: {e}; check the quoting") from None

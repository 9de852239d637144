"""`jaxtune prepare`: raw files (HTML, CSV/TSV, SQL dumps, JSON, JSONL) to training records in one JSONL file.

Every reader yields plain dicts; a field mapping turns source columns into the fields training expects
(`instruction`, `output`, ...). A bad row stops the run with its file and line, or, with
--skip-bad-rows, is skipped and counted. Rows and SQL statements that hold nothing usable (an empty row, an
INSERT ... SELECT) are skipped and counted too: nothing is dropped without a line in the summary, and
--strict fails the run if anything was skipped.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator

from bs4 import BeautifulSoup
from soupsieve import SelectorSyntaxError
from sqlparse import keywords
from sqlparse import tokens as T
from sqlparse.lexer import Lexer
from tqdm import tqdm

from jaxtune.data.clean import (CLEAN_FLAGS, CleanOptions, CleanReport, add_clean_arguments, clean_records,
                                options_from_args)
from jaxtune.errors import JaxtuneError

SUFFIXES = (".html", ".htm", ".csv", ".tsv", ".sql", ".json", ".jsonl")
DEFAULT_SELECTOR = "main, article, [role=main]"
HIDDEN_TAGS = ["head", "script", "style", "template", "noscript", "nav", "header", "footer", "aside"]
BLOCK_TAGS = ["p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
              "dl", "dt", "dd", "blockquote", "pre", "table", "tr", "figcaption", "br", "hr"]
PARAGRAPH = "\u2029"  # marks block boundaries while the text's own whitespace is collapsed
# Words that open a table constraint, not a column, inside CREATE TABLE ( ... ).
CONSTRAINT_WORDS = {"PRIMARY", "KEY", "UNIQUE", "CONSTRAINT", "INDEX", "FOREIGN", "CHECK", "FULLTEXT", "SPATIAL",
                    "EXCLUDE"}
# Statements of a dump that hold no rows; any other statement prepare does not read is counted as skipped.
NO_DATA_STATEMENTS = {"ALTER", "ANALYZE", "BEGIN", "COMMENT", "COMMIT", "CREATE", "DELIMITER", "DROP", "END", "GRANT",
                      "LOCK", "PRAGMA", "REVOKE", "ROLLBACK", "SELECT", "SET", "START", "TRUNCATE", "UNLOCK", "USE",
                      "VACUUM"}
INSERT_TAILS = {"ON", "RETURNING", "AS"}  # what may follow the rows: ON DUPLICATE KEY / ON CONFLICT, ...
SQL_LITERALS = {"NULL": None, "TRUE": True, "FALSE": False}
MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a", "%": "\\%", "_": "\\_"}
SKIP_HINT = "or skip such rows with --skip-bad-rows"


@dataclass
class BadRow:
    """A row or statement prepare cannot use. With a message it stops the run (unless --skip-bad-rows);
    without one (an empty row, a statement with no readable rows) it is only counted."""
    reason: str  # the key it is counted under
    message: str | None = None  # the error, without the advice on skipping


@dataclass
class Stats:
    """What happened to the rows, so a run that drops data says how much and why."""
    rows_in: int = 0
    rows_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: str | None = None  # "file:line: reason", for --strict
    clean: CleanReport | None = None

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        self.first_skipped = self.first_skipped or f"{where}: {reason}"

    def summary(self) -> str:
        lines = [f"rows in: {self.rows_in}", f"rows out: {self.rows_out}",
                 f"rows skipped: {sum(self.skipped.values())}"]
        lines += [f"  {reason}: {n}" for reason, n in self.skipped.most_common()]
        if self.clean is not None:
            lines.append(self.clean.summary())
        return "\n".join(lines)


def _read_text(path: Path) -> str:
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


def _is_empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return value is None or value == [] or value == {}


def _mapped(row: dict, mapping: dict[str, str] | None, where: str) -> dict | BadRow:
    if not mapping:
        return row
    for name, column in mapping.items():
        if column not in row:
            return BadRow(f"missing field {name}",
                          f"{where}: field {name!r} maps to column {column!r}, which this row does not have "
                          f"(it has: {', '.join(map(str, row)) or 'nothing'}); fix --map {name}=COLUMN")
    return {name: row[column] for name, column in mapping.items()}


def read_records(path: str | Path, **kwargs) -> Iterator[dict]:
    """Records of one raw file (by suffix), mapped; see read_located."""
    return (record for _, record in read_located(path, **kwargs))


def read_located(path: str | Path, *, mapping: dict[str, str] | None = None, selector: str | None = None,
                 table: str | None = None, skip_bad_rows: bool = False, skip_hint: str = SKIP_HINT,
                 stats: Stats) -> Iterator[tuple[str, dict]]:
    """(where, record) pairs of one raw file, `where` naming its file:line (1-based) or item. A bad row raises
    with `skip_hint` (the advice that fits the command) or, with skip_bad_rows, is counted in `stats`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise JaxtuneError(f"{path}: cannot read {suffix or 'files without a suffix'}; "
                           f"supported: {', '.join(SUFFIXES)}")
    text = _read_text(path)
    match suffix:
        case ".html" | ".htm":
            rows = _html_rows(path, text, selector)
        case ".csv" | ".tsv":
            rows = _csv_rows(path, text)
        case ".sql":
            rows = _sql_rows(path, text, table)
        case ".json":
            rows = _json_rows(path, text)
        case _:
            rows = _jsonl_rows(path, text)
    for where, row in rows:
        stats.rows_in += 1
        if not isinstance(row, BadRow):
            row = _mapped(row, mapping, where)
        if not isinstance(row, BadRow) and all(_is_empty(v) for v in row.values()):
            row = BadRow("empty")
        if isinstance(row, BadRow):
            if row.message and not skip_bad_rows:
                raise JaxtuneError(f"{row.message}, {skip_hint}")
            stats.skip(where, row.reason)
        else:
            yield where, row


# --- HTML ---------------------------------------------------------------------------------------

def _visible_text(element) -> str:
    """Text as a reader sees it: runs of whitespace collapsed, one line per paragraph."""
    for tag in element.find_all(BLOCK_TAGS):
        tag.insert_before(PARAGRAPH)
        tag.insert_after(PARAGRAPH)
    paragraphs = (" ".join(p.split()) for p in element.get_text().split(PARAGRAPH))
    return "\n".join(p for p in paragraphs if p)


def _html_rows(path: Path, text: str, selector: str | None):
    soup = BeautifulSoup(text, "html.parser")
    for tag in soup.find_all(HIDDEN_TAGS):
        tag.decompose()
    try:
        elements = soup.select(selector or DEFAULT_SELECTOR)
    except SelectorSyntaxError as e:
        raise JaxtuneError(f"--selector {selector!r} is not valid CSS: {e.args[0]}") from None
    if not elements:
        if selector:
            yield str(path), BadRow("selector matched nothing", f"{path}: --selector {selector!r} matched nothing; "
                                                                "check it against the page")
            return
        elements = [soup.body or soup]
    chosen = {id(e) for e in elements}
    outermost = [e for e in elements if not any(id(p) in chosen for p in e.parents)]  # <main><article> once
    for i, element in enumerate(outermost, 1):
        yield f"{path} element {i} (<{element.name}>)", {"text": _visible_text(element)}


# --- CSV / TSV ----------------------------------------------------------------------------------

def _csv_rows(path: Path, text: str):
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


# --- SQL dumps ----------------------------------------------------------------------------------

@cache
def _sql_lexer(mysql: bool) -> Lexer:
    """sqlparse's lexer with exact string rules: its own misreads a string that ends in an escaped backslash.

    MySQL strings take backslash escapes; standard SQL (PostgreSQL, SQLite) strings keep backslashes.
    """
    if mysql:
        strings = [(r"'(?:''|\\[\s\S]|[^'\\])*'", T.String.Single), (r'"(?:""|\\[\s\S]|[^"\\])*"', T.String.Symbol)]
    else:
        strings = [(r"'(?:''|[^'])*'", T.String.Single), (r'"(?:""|[^"])*"', T.String.Symbol)]
    lexer = Lexer()
    lexer.default_initialization()
    lexer.set_SQL_REGEX(strings + list(keywords.SQL_REGEX))
    return lexer


def _unquote(name: str) -> str:
    return name[1:-1].replace(name[0] * 2, name[0]) if name[0] in '`"[' else name


def _sql_string(token: str, mysql: bool) -> str:
    quote, body = token[0], token[1:-1]
    if not mysql:
        return body.replace(quote * 2, quote)
    return re.sub(rf"\\([\s\S])|{quote}{quote}",
                  lambda m: quote if m[1] is None else MYSQL_ESCAPES.get(m[1], m[1]), body)


def _sql_value(tokens: list[tuple], mysql: bool):
    """One VALUES entry: string, int, float, None or bool; anything else (NOW(), 0x41) as its SQL text.

    Adjacent string literals are one string, as SQL reads them: 'abc' 'def' (also across lines) is 'abcdef'."""
    strings = tokens[1:] if tokens and tokens[0][0] in T.Name else tokens  # MySQL's _utf8mb4'..' introducer
    if strings and all(ttype in T.String for ttype, _, _ in strings):
        return "".join(_sql_string(value, mysql) for _, value, _ in strings)
    if len(tokens) == 1:
        ttype, value, _ = tokens[0]
        if ttype in T.Number.Integer:
            return int(value)
        if ttype in T.Number.Float:
            return float(value)
        if value.upper() in SQL_LITERALS:
            return SQL_LITERALS[value.upper()]
    return "".join(value for _, value, _ in tokens)


def _create_table(tokens: list[tuple]) -> tuple[str, list[str]] | None:
    """(table, column names in order) of a CREATE TABLE, or None when it has no column list."""
    opening = next((i for i, (_, value, _) in enumerate(tokens) if value == "("), None)
    if opening is None:
        return None
    columns, depth, expect = [], 0, True
    for _, value, _ in tokens[opening:]:
        if value in ("(", ")"):
            depth += 1 if value == "(" else -1
            if depth == 0:
                break
        elif depth == 1 and value == ",":
            expect = True
        elif depth == 1 and expect:
            if value.split()[0].upper() not in CONSTRAINT_WORDS:
                columns.append(_unquote(value))
            expect = False
    return _unquote(tokens[opening - 1][1]), columns


def _insert_rows(path: Path, tokens: list[tuple], mysql: bool, created: dict[str, list[str]], table: str | None,
                 inserted: dict[str, None]):
    """Rows of an INSERT INTO t [(cols)] VALUES (..), (..) statement."""
    line = tokens[0][2]
    words = [value.upper() for _, value, _ in tokens]
    if "INTO" not in words or "VALUES" not in words:  # INSERT ... SELECT, MySQL's INSERT ... SET
        yield f"{path}:{line}", BadRow(f"{words[0]} without INTO ... VALUES")
        return
    into, values_at = words.index("INTO"), words.index("VALUES")
    name_end = words.index("(", into) if "(" in words[into:values_at] else values_at
    name = _unquote(tokens[name_end - 1][1])
    inserted.setdefault(name)
    if table and name != table:
        return
    columns = [_unquote(v) for _, v, _ in tokens[name_end + 1:values_at - 1] if v != ","] or created.get(name)
    if not columns:
        raise JaxtuneError(f"{path}:{line}: INSERT INTO {name} has no column list and no CREATE TABLE {name} comes "
                           f"before it; dump with column names (mysqldump --complete-insert, pg_dump --column-inserts)")
    depth, n = 0, 0
    for ttype, value, at in tokens[values_at + 1:]:
        punct = value if ttype in T.Punctuation else ""
        if depth == 0:
            if punct == "(":
                depth, row, current, row_line = 1, [], [], at
            elif punct != ",":
                if value.upper() not in INSERT_TAILS:
                    yield f"{path}:{at}", BadRow(f"unreadable rest of {words[0]}")
                break
            continue
        if depth == 1 and punct in (",", ")"):
            row.append(_sql_value(current, mysql))
            current = []
            if punct == ")":
                depth, n = 0, n + 1
                where = f"{path}:{row_line} (row {n} of INSERT INTO {name})"
                if len(row) == len(columns):
                    yield where, dict(zip(columns, row))
                else:
                    yield where, BadRow("wrong column count", f"{where}: {len(row)} values for {len(columns)} "
                                                              f"columns ({', '.join(columns)})")
            continue
        depth += {"(": 1, ")": -1}.get(punct, 0)  # a function call such as NOW()
        current.append((ttype, value, at))
    if depth:
        raise JaxtuneError(f"{path}:{row_line}: row {n + 1} of INSERT INTO {name} never ends; the dump is cut off "
                           f"or a quote is not closed: dump it again")


def _sql_rows(path: Path, text: str, table: str | None):
    mysql = "`" in text or "/*!" in text  # mysqldump quotes names with backticks and writes /*!40101 ... */
    created: dict[str, list[str]] = {}
    inserted: dict[str, None] = {}  # tables that have INSERTs, in order
    statement, line, command = [], 1, False
    for ttype, value in chain(_sql_lexer(mysql).get_tokens(text), [(T.Punctuation, ";")]):
        if command or (ttype in T.Generic.Command and not statement):  # psql's \connect, \restrict: one line
            command = "\n" not in value
        elif ttype in T.Punctuation and value == ";":
            head = statement[0][1].upper() if statement else ""
            if head == "CREATE" and any(v.upper() == "TABLE" for _, v, _ in statement[1:4]):
                if definition := _create_table(statement):
                    created[definition[0]] = definition[1]
            elif head in ("INSERT", "REPLACE"):
                yield from _insert_rows(path, statement, mysql, created, table, inserted)
            elif head and head not in NO_DATA_STATEMENTS:  # e.g. UPDATE, or COPY data that swallowed an INSERT
                reason = f"{head} statement" if statement[0][0] in T.Keyword else "unreadable statement"
                yield f"{path}:{statement[0][2]}", BadRow(reason)
            statement = []
        elif ttype not in T.Whitespace and ttype not in T.Comment:
            statement.append((ttype, value, line))
        line += value.count("\n")
    if not inserted:
        raise JaxtuneError(f"{path}: no INSERT INTO statements; pg_dump writes COPY blocks unless run with --inserts "
                           f"or --column-inserts, so re-dump with one of those")
    if table and table not in inserted:
        raise JaxtuneError(f"{path}: no INSERT INTO {table}; tables with rows: {', '.join(inserted)}")


# --- JSON / JSONL -------------------------------------------------------------------------------

def _json_rows(path: Path, text: str):
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


def _jsonl_rows(path: Path, text: str):
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold \u2028
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            yield where, BadRow("malformed JSON", f"{where}: malformed JSON ({e.msg}, column {e.colno}): "
                                                  f"{line.strip()[:200]}; fix or remove the line")
            continue
        yield where, item if isinstance(item, dict) else BadRow(
            "not an object", f"{where}: expected an object, got {line.strip()[:200]}; fix or remove the line")


# --- output and CLI -----------------------------------------------------------------------------

def write_jsonl_atomic(path: str | Path, records: Iterable[dict]) -> int:
    """Write JSONL through a temp file renamed into place: a failed run leaves no (partial) file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def _strict(records: Iterable[dict], stats: Stats) -> Iterator[dict]:
    """Fail after the last record, when the count is complete and before the output is renamed into place."""
    yield from records
    if stats.skipped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in stats.skipped.most_common())
        raise JaxtuneError(f"--strict: could not use {sum(stats.skipped.values())} of {stats.rows_in} rows or "
                           f"statements ({reasons}), the first at {stats.first_skipped}; fix the input, or leave "
                           f"out --strict to write the rest")


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
    stats.rows_out = write_jsonl_atomic(out, records)
    print(stats.summary())
    return stats


def _parse_map(items: list[str]) -> dict[str, str] | None:
    mapping = {}
    for item in items:
        name, _, column = item.partition("=")
        if not name or not column:
            raise JaxtuneError(f"--map {item!r}: expected FIELD=COLUMN, e.g. --map instruction=question")
        mapping[name] = column
    return mapping or None


def _run(args: argparse.Namespace) -> None:
    wants_clean = args.clean or args.no_dedup or any(getattr(args, name) is not None for name in CLEAN_FLAGS)
    prepare(args.inputs, args.out, mapping=_parse_map(args.map), selector=args.selector, table=args.table,
            skip_bad_rows=args.skip_bad_rows, strict=args.strict,
            clean=options_from_args(args) if wants_clean else None)


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("prepare",
                              help="turn raw files (HTML, CSV/TSV, SQL dumps, JSON, JSONL) into JSONL records")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=f"files ending in {', '.join(SUFFIXES)}")
    p.add_argument("--out", required=True, metavar="records.jsonl",
                   help="written atomically: a failed run leaves no file")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="record field FIELD takes source column COLUMN (repeatable); only mapped fields are kept")
    p.add_argument("--selector", help=f"HTML: CSS selector of the elements to keep, one record each "
                                      f"(default: {DEFAULT_SELECTOR}, else body)")
    p.add_argument("--table", help="SQL dumps: only the rows of this table")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip and count bad rows instead of stopping at the first")
    p.add_argument("--strict", action="store_true",
                   help="fail, writing nothing, if any row or statement was skipped (empty, unreadable, or bad)")
    p.add_argument("--clean", action="store_true",
                   help="clean the records as `jaxtune clean` does (any cleaning flag implies it)")
    add_clean_arguments(p)
    p.set_defaults(func=_run)

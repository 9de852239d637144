"""SQL dumps to records: the rows of INSERT statements (mysqldump / mariadb-dump, the sqlite3 shell's
.dump, pg_dump --inserts) and of pg_dump's default `COPY ... FROM stdin` blocks, their columns from the
statement's column list, the COPY header or the CREATE TABLE before it. Values are evaluated
(jaxtune.ingest.sql_values), never kept as expression text. Statements that hold no usable rows are
counted, never silently dropped."""
from __future__ import annotations

import re
from functools import cache
from itertools import chain
from pathlib import Path

from sqlparse import keywords
from sqlparse import tokens as T
from sqlparse.lexer import Lexer

from jaxtune.data.records import BadRow
from jaxtune.errors import JaxtuneError
from jaxtune.ingest.sql_values import c_escapes, evaluate

# Unquoted words that open a table constraint, not a column, inside CREATE TABLE ( ... ); MySQL's index forms
# only in its dumps (which quote every column name), so a PostgreSQL or SQLite column may be called `key`.
CONSTRAINT_WORDS = {"PRIMARY", "UNIQUE", "CONSTRAINT", "FOREIGN", "CHECK", "EXCLUDE"}
MYSQL_CONSTRAINT_WORDS = CONSTRAINT_WORDS | {"KEY", "INDEX", "FULLTEXT", "SPATIAL"}
# Statements of a dump that hold no rows; any other statement prepare does not read is counted as skipped.
NO_DATA_STATEMENTS = {"ALTER", "ANALYZE", "BEGIN", "COMMENT", "COMMIT", "CREATE", "DELIMITER", "DROP", "END", "GRANT",
                      "LOCK", "PRAGMA", "REVOKE", "ROLLBACK", "SELECT", "SET", "START", "TRUNCATE", "UNLOCK", "USE",
                      "VACUUM"}
INSERT_TAILS = {"ON", "RETURNING", "AS"}  # what may follow the rows: ON DUPLICATE KEY / ON CONFLICT, ...
_NAME = r'(?:"(?:[^"]|"")*"|[^\s(."]+)'  # one part of a table name, quoted or not
COPY_HEADER = re.compile(rf"COPY\s+(?P<table>{_NAME}(?:\.{_NAME})*)\s*(?:\((?P<columns>[^)]*)\))?\s+FROM\s+stdin\s*;"
                         r"[ \t]*\r?\n", re.IGNORECASE)
COPY_END = re.compile(r"^\\\.\r?$", re.MULTILINE)  # the line `\.` after a COPY block's rows


@cache
def _sql_lexer(mysql: bool) -> Lexer:
    """sqlparse's lexer with exact string rules: its own misreads a string that ends in an escaped backslash.

    MySQL strings take backslash escapes; standard SQL (PostgreSQL, SQLite) strings keep backslashes.
    """
    if mysql:
        strings = [(r"'(?:''|\\[\s\S]|[^'\\])*'", T.String.Single), (r'"(?:""|\\[\s\S]|[^"\\])*"', T.String.Symbol)]
    else:  # PostgreSQL's E'..' takes backslash escapes
        strings = [(r"[eE]'(?:''|\\[\s\S]|[^'\\])*'", T.String.Escape), (r"'(?:''|[^'])*'", T.String.Single),
                   (r'"(?:""|[^"])*"', T.String.Symbol)]
    numbers = [(r"(?:\d+\.\d*|\.\d+|\d+)[eE][-+]?\d+(?![\w.])", T.Number.Float)]  # 1.0e+20: sqlparse splits it
    lexer = Lexer()
    lexer.default_initialization()
    lexer.set_SQL_REGEX(strings + numbers + list(keywords.SQL_REGEX))
    return lexer


def _unquote(name: str) -> str:
    return name[1:-1].replace(name[0] * 2, name[0]) if name[0] in '`"[' else name


def _create_table(tokens: list[tuple], mysql: bool) -> tuple[str, dict[str, str]] | None:
    """(table, {column: its type's first word, upper case} in order) of a CREATE TABLE, or None when it
    has no column list."""
    opening = next((i for i, (_, value, *_) in enumerate(tokens) if value == "("), None)
    if opening is None:
        return None
    columns, depth, column = {}, 0, ""
    for _, value, *_ in tokens[opening:]:
        if value in ("(", ")"):
            depth += 1 if value == "(" else -1
            if depth == 0:
                break
        elif depth == 1 and value == ",":
            column = ""
        elif depth == 1 and column == "":
            constraint = value.split()[0].upper() in (MYSQL_CONSTRAINT_WORDS if mysql else CONSTRAINT_WORDS)
            column = None if constraint else _unquote(value)
            if column is not None:
                columns[column] = ""
        elif depth == 1 and column and not columns[column]:
            columns[column] = value.split()[0].upper()
    return _unquote(tokens[opening - 1][1]), columns


_BOOLEAN = {"t": True, "f": False}
COPY_TYPES = {**dict.fromkeys(("INTEGER", "INT", "BIGINT", "SMALLINT", "SERIAL", "BIGSERIAL", "INT4", "INT8", "INT2"), int),
              **dict.fromkeys(("REAL", "DOUBLE", "NUMERIC", "DECIMAL", "FLOAT4", "FLOAT8"), float),
              "BOOLEAN": _BOOLEAN.__getitem__, "BOOL": _BOOLEAN.__getitem__}  # COPY's text -> what an INSERT gives


def _typed(kind, text: str):
    """A COPY field as its column's type (an array, NaN or other text the type does not parse stays text)."""
    try:
        return kind(text)
    except (ValueError, KeyError):
        return text


def _insert_rows(path: Path, tokens: list[tuple], mysql: bool, created: dict[str, dict[str, str]], table: str | None,
                 inserted: dict[str, None]):
    """Rows of an INSERT INTO t [(cols)] VALUES (..), (..) statement; tokens are (type, text, line, column)."""
    line = tokens[0][2]
    words = [value.upper() for _, value, *_ in tokens]
    if "INTO" not in words or "VALUES" not in words:  # INSERT ... SELECT, MySQL's INSERT ... SET
        yield f"{path}:{line}", BadRow(f"{words[0]} without INTO ... VALUES")
        return
    into, values_at = words.index("INTO"), words.index("VALUES")
    if words[values_at - 1] == "DEFAULT":  # a row of defaults only: nothing to train on
        yield f"{path}:{line}", BadRow(f"{words[0]} ... DEFAULT VALUES")
        return
    name_end = words.index("(", into) if "(" in words[into:values_at] else values_at
    name = _unquote(tokens[name_end - 1][1])
    inserted.setdefault(name)
    if table and name != table:
        return
    columns = [_unquote(v) for _, v, *_ in tokens[name_end + 1:values_at - 1] if v != ","] or list(created.get(name, ()))
    if not columns:
        raise JaxtuneError(f"{path}:{line}: INSERT INTO {name} has no column list and no CREATE TABLE {name} comes "
                           f"before it; dump with column names (mysqldump --complete-insert, pg_dump --column-inserts)")
    depth, n, row_line = 0, 0, line

    def value_at(token) -> str:
        """Where a value (or one of its tokens) is, for its evaluation's errors: path:line:column (row n ...)."""
        place = f"{path}:{token[2]}:{token[3]}" if token else f"{path}:{row_line}"
        return f"{place} (row {n + 1} of INSERT INTO {name})"

    for token in tokens[values_at + 1:]:
        ttype, value, at = token[:3]
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
            row.append(evaluate(current, mysql, value_at))
            current = []
            if punct == ")":
                depth, n = 0, n + 1
                where = f"{path}:{row_line} (row {n} of INSERT INTO {name})"
                yield where, _row(columns, row, where)
            continue
        depth += {"(": 1, ")": -1}.get(punct, 0)  # a function call such as replace(..)
        current.append(token)
    if depth:
        raise JaxtuneError(f"{path}:{row_line}: row {n + 1} of INSERT INTO {name} never ends; the dump is cut off "
                           f"or a quote is not closed: dump it again")


def _row(columns: list[str], values: list, where: str) -> dict | BadRow:
    if len(values) == len(columns):
        return dict(zip(columns, values))
    return BadRow("wrong column count", f"{where}: {len(values)} values for {len(columns)} columns ({', '.join(columns)})")


def _copy_rows(path: Path, text: str, header: re.Match, line: int, created: dict[str, dict[str, str]], table: str | None,
               inserted: dict[str, None]):
    """The rows of pg_dump's `COPY t (cols) FROM stdin;` block that `header` matched (`line`: its line): one
    line a row, fields split by tabs, `\\N` for NULL, PostgreSQL's text-format escapes, up to the line `\\.`.
    Returns the offset and line after the block."""
    name = _unquote(re.split(r"\.(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", header["table"])[-1])
    columns = [_unquote(c.strip()) for c in header["columns"].split(",")] if header["columns"] else list(created.get(name, ()))
    kinds = created.get(name, {})
    types = [str if kinds.get(c, "").endswith("[]") else COPY_TYPES.get(kinds.get(c), str) for c in columns]
    end = COPY_END.search(text, header.end())
    if end is None:
        raise JaxtuneError(f"{path}:{line}: COPY {name} never ends (no line \\. after its rows); the dump is cut off: "
                           "dump it again")
    if not columns and name not in created:
        raise JaxtuneError(f"{path}:{line}: COPY {name} has no column list and no CREATE TABLE {name} comes before it")
    inserted.setdefault(name)
    lines = text[header.end():end.start()].split("\n")[:-1]  # the block ends with a newline before \.
    if not table or name == table:
        for n, raw in enumerate(lines, 1):
            fields = raw.removesuffix("\r").split("\t")
            where = f"{path}:{line + n} (row {n} of COPY {name})"
            if len(fields) == len(columns):
                fields = [None if f == "\\N" else _typed(kind, c_escapes(f, unicode=False, where=where))
                          for kind, f in zip(types, fields)]
            yield where, _row(columns, fields, where)
    return end.end(), line + len(lines) + 1


def _dialect_is_mysql(text: str) -> bool:
    """mysqldump / mariadb-dump: their header, or backticks / /*! comments before the first string literal
    (the text of the rows may hold anything)."""
    start = text.lstrip()
    if start.startswith(("PRAGMA foreign_keys", "BEGIN TRANSACTION")) or "-- PostgreSQL database dump" in text[:500]:
        return False  # the sqlite3 shell and pg_dump (a backtick in a CREATE TABLE they repeat says nothing)
    head = text[:text.find("'")] if "'" in text else text
    return start.startswith(("-- MySQL dump", "-- MariaDB dump")) or any(m in head for m in ("`", "/*!", "/*M!"))


def _statements(path: Path, text: str, pos: int, line: int, mysql: bool, created, table, inserted):
    """Rows of the statements from offset `pos` (on line `line`) on. Returns where to go on
    after a COPY ... FROM stdin block (its rows are not SQL: the lexer starts again after them), else None."""
    statement, command, offset, line_start = [], False, pos, pos
    for ttype, value in chain(_sql_lexer(mysql).get_tokens(text[pos:]), [(T.Punctuation, ";")]):
        if command or (ttype in T.Generic.Command and not statement):  # psql's \connect, \restrict: one line
            command = "\n" not in value
        elif ttype in T.Punctuation and value == ";":
            head = statement[0][1].upper() if statement else ""
            if head == "CREATE" and any(v.upper() == "TABLE" for _, v, *_ in statement[1:4]):
                if definition := _create_table(statement, mysql):
                    created[definition[0]] = definition[1]
            elif head in ("INSERT", "REPLACE"):
                yield from _insert_rows(path, statement, mysql, created, table, inserted)
            elif head == "COPY" and (header := COPY_HEADER.match(text, statement[0][4])):
                return (yield from _copy_rows(path, text, header, statement[0][2], created, table, inserted))
            elif head and head not in NO_DATA_STATEMENTS:  # e.g. UPDATE, COPY from a file
                reason = f"{head} statement" if statement[0][0] in T.Keyword else "unreadable statement"
                yield f"{path}:{statement[0][2]}", BadRow(reason)
            statement = []
        elif ttype not in T.Whitespace and ttype not in T.Comment:
            statement.append((ttype, value, line, offset - line_start + 1, offset))
        offset += len(value)
        if "\n" in value:
            line += value.count("\n")
            line_start = offset - len(value) + value.rindex("\n") + 1
    return None


def sql_rows(path: Path, text: str, table: str | None):
    mysql = _dialect_is_mysql(text)
    created: dict[str, dict[str, str]] = {}
    inserted: dict[str, None] = {}  # tables that have rows, in order
    at = (0, 1)
    while at is not None:
        at = yield from _statements(path, text, *at, mysql, created, table, inserted)
    if not inserted:
        raise JaxtuneError(f"{path}: no INSERT INTO statement and no COPY ... FROM stdin block: nothing here holds rows")
    if table and table not in inserted:
        raise JaxtuneError(f"{path}: no INSERT INTO {table} or COPY {table}; tables with rows: {', '.join(inserted)}")

"""SQL dumps to records: the rows of INSERT statements (mysqldump, SQLite, PostgreSQL with --inserts),
their columns from the statement's column list or the CREATE TABLE before it. Statements that hold no
usable rows are counted, never silently dropped."""
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


def sql_rows(path: Path, text: str, table: str | None):
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

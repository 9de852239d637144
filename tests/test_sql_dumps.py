"""SQL dumps as the real tools write them (tests/fixtures/dumps, made by make_dumps.py with sqlite3, pg_dump and
mariadb-dump), constant expressions evaluated or refused, and any string round-tripping through each
dialect's own quoting."""
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxtune.errors import JaxtuneError
from jaxtune.ingest.prepare import Stats, prepare
from jaxtune.ingest.read import read_records
from jaxtune.ingest.sql import sql_rows

DUMPS = Path(__file__).parent / "fixtures" / "dumps"
TABLE = json.loads((DUMPS / "rows.json").read_text())  # [id, prompt, response] as stored in the databases
PRODUCERS = ["chats_sqlite.sql", "chats_pg_dump.sql", "chats_pg_dump_inserts.sql", "chats_mariadb.sql",
             "chats_mariadb_single.sql"]


def rows_of(text: str, name="dump.sql", table=None) -> list:
    return [row for _, row in sql_rows(Path(name), text, table)]


@pytest.mark.parametrize("dump", PRODUCERS)
def test_real_dumps_come_back_exactly_as_stored(dump, tmp_path, capsys):
    stats = Stats()
    rows = list(read_records(DUMPS / dump, table="chats", stats=stats))
    assert rows == [{"id": i, "prompt": p, "response": r} for i, p, r in TABLE]  # NULLs too, unmapped
    out = tmp_path / "out.jsonl"
    stats = prepare([DUMPS / dump], out, mapping={"prompt": "prompt", "response": "response"}, skip_bad_rows=True,
                    progress=False)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]]  # \u2028 is text
    assert written == [{"prompt": p, "response": r} for _, p, r in TABLE if p is not None and r is not None]
    assert stats.skipped == {"NULL in column response": 1, "NULL in column prompt": 1}
    assert "  NULL in column response: 1" in capsys.readouterr().out


def test_a_null_in_a_mapped_column_stops_with_file_line_and_column(tmp_path):
    with pytest.raises(JaxtuneError, match=r"chats_pg_dump\.sql:67 \(row 25 of COPY chats\): column 'response' "
                                           r"\(field 'output'\) is NULL; fill it in the source, or skip such rows"):
        prepare([DUMPS / "chats_pg_dump.sql"], tmp_path / "out.jsonl", mapping={"output": "response"}, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sql, value", [
    ("replace(replace('a\\r\\nb','\\r',char(13)),'\\n',char(10))", "a\r\nb"),  # the sqlite3 shell
    ("char(104, 105) || '!' || char(10)", "hi!\n"),
    ("unistr('line\\000aone \\u00e9 \\+01F642 \\\\ end')", "line\none é 🙂 \\ end"),  # sqlite3 >= 3.50
    ("X'68c3a9'", "hé"),
    ("E'tab\\there \\'q\\' \\\\ \\x41\\101 \\u00e9 \\U0001F642'", "tab\there 'q' \\ AA é 🙂"),
    ("'a' 'b' || NULL", None),
    ("-5", -5),
    ("replace('abc', '', 'x')", "abc"),
])
def test_constant_expressions_are_evaluated(sql, value):
    assert rows_of(f"CREATE TABLE t (v text);\nINSERT INTO t VALUES ({sql});\n") == [{"v": value}]


@pytest.mark.parametrize("sql, value", [
    ("_binary 'a\\0b'", "a\0b"), ("_utf8mb4'caf\\xc3'", "cafxc3"), ("0x68c3a9", "hé"), ("X'4142'", "AB"),
    ("_binary 0x4142", "AB"), ("'it\\'s' \"and\"", "it'sand"),
])
def test_mysql_values_are_evaluated(sql, value):
    assert rows_of(f"INSERT INTO `t` (`v`) VALUES ({sql});\n") == [{"v": value}]


@pytest.mark.parametrize("sql, where, what", [
    ("NOW()", "3:26", "calls now()"),
    ("'2024-01-01'::date", "3:38", "is not a value jaxtune can evaluate"),
    ("upper('x')", "3:26", "calls upper()"),
    ("X'ff'", "3:26", "binary data (0xff) is not UTF-8 text"),
    ("price", "3:26", "holds 'price', which is not a value"),
])
def test_expressions_jaxtune_does_not_evaluate_are_errors_and_write_nothing(tmp_path, sql, where, what):
    dump = tmp_path / "d.sql"
    dump.write_text(f"CREATE TABLE t (id int, v text);\n\nINSERT INTO t VALUES (1, {sql});\n")
    with pytest.raises(JaxtuneError) as e:
        prepare([dump], tmp_path / "out.jsonl", progress=False)
    assert f"d.sql:{where} (row 1 of INSERT INTO t)" in str(e.value) and what in str(e.value)
    assert list(tmp_path.iterdir()) == [dump]


def test_what_real_dumps_also_write():
    """Found by review: a sqlite3 dump whose CREATE TABLE has backticks, exponents with a sign, a column named
    key, a quoted COPY table name with a space, an array column, bit strings, rows of defaults only."""
    sqlite = "PRAGMA foreign_keys=OFF;\nCREATE TABLE `c` (`p` TEXT, x REAL);\nINSERT INTO c VALUES('C:\\new',1.0e+20);\n"
    assert rows_of(sqlite) == [{"p": "C:\\new", "x": 1e20}]
    pg = ('CREATE TABLE public.kv (key text, n integer[], b bit(3));\nINSERT INTO public.kv VALUES (\'k\', NULL, B\'101\');\n'
          'CREATE TABLE public."Chat Log" (prompt text, n integer[]);\n'
          'COPY public."Chat Log" (prompt, n) FROM stdin;\nit\'s\t{1,2}\n\\.\nINSERT INTO public.kv DEFAULT VALUES;\n')
    assert rows_of(pg)[:2] == [{"key": "k", "n": None, "b": "101"}, {"prompt": "it's", "n": "{1,2}"}]
    assert rows_of(pg)[2].reason == "INSERT ... DEFAULT VALUES"  # counted, not an error
    with pytest.raises(JaxtuneError, match="0x110000 is not a Unicode code point"):
        rows_of("CREATE TABLE t (v text);\nINSERT INTO t VALUES (char(1114112));\n")
    assert rows_of("CREATE TABLE t (v text);\nINSERT INTO t VALUES (E'\\uD83D\\uDE00');\n") == [{"v": "😀"}]


def test_copy_blocks_escapes_nulls_types_and_tables():
    dump = ("CREATE TABLE public.a (id integer, ok boolean, score numeric, t text);\n"
            "CREATE TABLE public.b (t text);\n"
            "COPY public.a (id, ok, score, t) FROM stdin;\n"
            "1\tt\t2.5\tx\\ty\\\\z\\b\\f\\v\\101\\x41\\u0041\n"
            "2\tf\t\\N\t\\N\n"
            "\\.\n"
            "COPY public.b (t) FROM stdin;\n"
            "only b\n"
            "\\.\n")
    assert rows_of(dump, table="a") == [{"id": 1, "ok": True, "score": 2.5, "t": "x\ty\\z\b\f\vAAu0041"},
                                        {"id": 2, "ok": False, "score": None, "t": None}]
    assert rows_of(dump, table="b") == [{"t": "only b"}]
    with pytest.raises(JaxtuneError, match="no INSERT INTO c or COPY c; tables with rows: a, b"):
        rows_of(dump, table="c")


# --- any string, in each dialect's own quoting ------------------------------------------------------------

def sqlite_literal(s: str) -> str:
    """As the sqlite3 shell writes text: quotes doubled, CR and LF as replace() of a token not in the text."""
    out = "'" + s.replace("'", "''") + "'"
    for char, code, tokens in (("\r", 13, ("\\r", "\\015")), ("\n", 10, ("\\n", "\\012"))):
        if char in s:
            token = next((t for t in tokens if t not in s), None) or next(f"\\{k}" for k in range(999) if f"\\{k}" not in s)
            out = f"replace({out.replace(char, token)},'{token}',char({code}))"
    return out


def unistr_literal(s: str) -> str:
    """As sqlite3 >= 3.50 may: unistr() with control characters as \\uXXXX, backslashes doubled."""
    body = "".join(f"\\u{ord(c):04x}" if ord(c) < 32 else "\\\\" if c == "\\" else "''" if c == "'" else c for c in s)
    return f"unistr('{body}')"


def pg_literal(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def pg_e_literal(s: str) -> str:
    body = "".join({"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, f"\\x{ord(c):02x}"
                   if ord(c) < 32 else c) for c in s)
    return f"E'{body}'"


def mysql_literal(s: str) -> str:
    escapes = {"\\": "\\\\", "'": "\\'", '"': '\\"', "\0": "\\0", "\n": "\\n", "\r": "\\r", "\x1a": "\\Z"}
    return "'" + "".join(escapes.get(c, c) for c in s) + "'"


def copy_field(s: str) -> str:
    return re.sub(r"[\\\t\n\r]", lambda m: {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}[m[0]], s)


TEXTS = st.lists(st.one_of(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=12),
                           st.sampled_from(["');", "\\", "\\n", "''", "\\N", "\r\n", "\\.", "🙂", "char(10)"])),
                 min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(TEXTS)
def test_any_string_round_trips_through_every_dialect(texts):
    rows = [{"v": t} for t in texts]
    header = "CREATE TABLE t (v text);\n"
    for literal in (sqlite_literal, unistr_literal, pg_literal, pg_e_literal):
        dump = header + "".join(f"INSERT INTO t VALUES({literal(t)});\n" for t in texts)
        assert rows_of(dump) == rows, literal.__name__
    mysql = "-- MariaDB dump 10.19\n" + f"INSERT INTO `t` (`v`) VALUES {','.join(f'({mysql_literal(t)})' for t in texts)};\n"
    assert rows_of(mysql) == rows
    copy = header + "COPY public.t (v) FROM stdin;\n" + "".join(copy_field(t) + "\n" for t in texts) + "\\.\n"
    assert rows_of(copy) == rows

"""`jaxtune prepare`: each raw format gives the exact records, bad rows fail with file:line or are counted."""
import argparse
import json
from pathlib import Path

import pytest

from jaxtune.errors import JaxtuneError
from jaxtune.ingest.commands import register_cli
from jaxtune.ingest.prepare import Stats, prepare
from jaxtune.ingest.read import read_records

RAW = Path(__file__).parent / "fixtures" / "raw"
ARTICLE = ("Sourdough starter basics\n"
           "A starter is flour and water that wild yeast and lactobacilli have colonised.\n"
           "Feed it twice a day at room temperature, discarding half before each feed.\n"
           "It is ready when it doubles within six hours.\n"
           "100 g flour\n"
           "100 g water")


def read(path, **kwargs):
    stats = Stats()
    return list(read_records(path, stats=stats, **kwargs)), stats


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_html_keeps_the_article_text_only():
    records, stats = read(RAW / "article.html")
    assert records == [{"text": ARTICLE}]  # <main><article> is one record; chrome, scripts, comments gone
    assert stats.rows_in == 1


@pytest.mark.parametrize("page", ["rustdoc_mem_swap.html", "rustdoc_iter.html"])
def test_html_keeps_every_line_of_preformatted_code(page):
    """Real rustdoc pages (Debian's rust-doc 1.63, MIT/Apache-2.0): each multi-line <pre> block, highlighted
    code in <span>s, comes out with every line and indent; the prose around it is still collapsed."""
    from bs4 import BeautifulSoup

    html = (RAW / page).read_text(encoding="utf-8")
    blocks = [pre.get_text().removeprefix("\n").rstrip() for pre in BeautifulSoup(html, "html.parser").main.find_all("pre")]
    blocks = [b for b in blocks if "\n" in b]
    assert len(blocks) >= 1
    [text] = [r["text"] for r in read(RAW / page)[0]]
    assert [b for b in blocks if b not in text] == []
    assert "let mut x = 5;\nlet mut y = 42;\n\nmem::swap(&mut x, &mut y);" in text or page != "rustdoc_mem_swap.html"
    prose = [line for line in text.split("\n") if line and not any(line in b for b in blocks)]
    assert prose and not [line for line in prose if "  " in line or line != line.strip()]


def test_html_table_rows_one_per_line_cells_apart(tmp_path):
    page = tmp_path / "prices.html"
    page.write_text("<main><p>Prices</p><table><tr><th>item</th><th>price</th></tr><tr><td>tea</td><td>2 &euro;</td>"
                    "</tr><tr><td><b>cake</b> slice</td><td>3</td></tr></table><pre>\n  kept   as\n    is</pre></main>")
    assert read(page)[0] == [{"text": "Prices\nitem | price\ntea | 2 €\ncake slice | 3\n  kept   as\n    is"}]
    page.write_text("<main><table><tr><th><p>Name</p></th><td><p>a</p><p>b</p></td></tr></table><p>\ue0000\ue000</p>"
                    "<pre>one<br>two<br/>  three</pre></main>")  # Sphinx wraps cells in <p>; a <br> in a <pre>
    assert read(page)[0] == [{"text": "Name | a b\n\ue0000\ue000\none\ntwo\n  three"}]


def test_html_selector_and_body_fallback(tmp_path):
    records, _ = read(RAW / "article.html", selector="article p")
    assert [r["text"] for r in records] == ARTICLE.split("\n")[1:4]

    page = tmp_path / "plain.htm"
    page.write_text("<html><head><title>T</title></head><body><nav>Menu</nav><div>One <b>bold</b> line"
                    "<br>Two</div><footer>(c)</footer></body></html>")
    assert read(page)[0] == [{"text": "One bold line\nTwo"}]

    with pytest.raises(JaxtuneError, match=r"plain\.htm: --selector '\.missing' matched nothing"):
        read(page, selector=".missing")
    records, stats = read(page, selector=".missing", skip_bad_rows=True)
    assert records == [] and stats.skipped == {"selector matched nothing": 1}


def test_csv_sniffs_semicolons_and_quoting():
    records, stats = read(RAW / "qa.csv", mapping={"instruction": "question", "output": "answer"})
    assert records == [
        {"instruction": "What is 2+2?", "output": "4"},
        {"instruction": "Name a fruit; any fruit", "output": "An apple, or a pear"},
        {"instruction": 'Who wrote "Hamlet"?', "output": "Shakespeare, in about 1600"},
        {"instruction": "Two lines?", "output": "Line one\r\nline two"},
        {"instruction": "What is the capital of Peru?", "output": "Lima"},
    ]
    assert stats.rows_in == 6 and stats.skipped == {"empty": 1}  # row 5 has only an id


def test_tsv_and_short_rows(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("prompt\tcompletion\nhello\tworld\nonly a prompt\n", encoding="utf-8")
    with pytest.raises(JaxtuneError) as e:
        read(path, mapping={"text": "completion"})
    assert "pairs.tsv:3: field 'text' maps to column 'completion'" in str(e.value)
    records, stats = read(path, mapping={"text": "completion"}, skip_bad_rows=True)
    assert records == [{"text": "world"}] and stats.skipped == {"missing field text": 1}


def test_missing_mapped_column_names_field_column_file_and_line():
    with pytest.raises(JaxtuneError) as e:
        read(RAW / "qa.csv", mapping={"instruction": "question", "output": "answr"})
    message = str(e.value)
    assert "qa.csv:2: field 'output' maps to column 'answr'" in message
    assert "id, question, answer" in message and "--map output=COLUMN" in message


def test_mysqldump_rows_with_escapes_and_create_table_columns():
    records, _ = read(RAW / "qa_mysql.sql", table="qa")
    assert records == [
        {"id": 1, "question": 'What\'s a "closure"?', "score": 4.5, "created_at": "2024-03-01 10:00:00",
         "answer": "A function that captures variables from its scope.\nExample: counter = make_counter()"},
        {"id": 2, "question": "Where does Windows keep fonts?", "answer": "In C:\\Windows\\Fonts\\", "score": None,
         "created_at": "2024-03-02 11:30:00"},
        {"id": 3, "question": "Is 0 falsy in Python?", "answer": "Yes; so are '' and [].", "score": -1.0,
         "created_at": "2024-03-03 09:15:00"},
    ]
    assert read(RAW / "qa_mysql.sql", table="users")[0] == [{"id": 1, "name": "alice"}, {"id": 2, "name": "bob"}]
    assert len(read(RAW / "qa_mysql.sql")[0]) == 5  # every table without --table
    with pytest.raises(JaxtuneError, match=r"no INSERT INTO faq or COPY faq; tables with rows: qa, users"):
        read(RAW / "qa_mysql.sql", table="faq")


def test_sqlite_style_dump_keeps_backslashes_and_doubles_quotes():
    mapping = {"instruction": "question", "output": "answer"}
    records, stats = read(RAW / "qa_sqlite.sql", mapping=mapping, skip_bad_rows=True)
    assert records == [
        {"instruction": "it's raining; what now?", "output": "Take an umbrella."},
        {"instruction": "Path separator on Windows?", "output": "A backslash: \\"},
        {"instruction": "Two lines?", "output": "first\nsecond"},
    ]
    assert stats.skipped == {"NULL in column answer": 1}  # no column list: columns of the CREATE TABLE
    with pytest.raises(JaxtuneError, match=r"qa_sqlite\.sql:12 \(row 1 of INSERT INTO qa\): column 'answer' \(field "
                                           r"'output'\) is NULL; fill it in the source, or skip such rows"):
        read(RAW / "qa_sqlite.sql", mapping=mapping)


def test_sql_dump_errors(tmp_path):
    bare = tmp_path / "bare.sql"
    bare.write_text("-- no schema\nINSERT INTO t VALUES (1,'a');\n")
    with pytest.raises(JaxtuneError, match=r"bare\.sql:2: INSERT INTO t has no column list and no CREATE TABLE t"):
        read(bare)
    copy = tmp_path / "pg.sql"
    copy.write_text('CREATE TABLE public.qa (q text, a text);\nCOPY public.qa (q, a) FROM stdin;\nhi\tthere\n')
    with pytest.raises(JaxtuneError, match=r"pg\.sql:2: COPY qa never ends \(no line \\\. after its rows\)"):
        read(copy)
    schema = tmp_path / "schema.sql"
    schema.write_text("CREATE TABLE t (q text);\n")
    with pytest.raises(JaxtuneError, match="no INSERT INTO statement and no COPY ... FROM stdin block"):
        read(schema)
    short = tmp_path / "short.sql"
    short.write_text('INSERT INTO "t" ("q", "a") VALUES (\'x\', \'y\'), (\'only one\');\n')
    with pytest.raises(JaxtuneError, match=r"short\.sql:1 \(row 2 of INSERT INTO t\): 1 values for 2 columns"):
        read(short)
    cut = tmp_path / "cut.sql"
    cut.write_text("INSERT INTO `t` (`q`) VALUES ('a'),\n('it\\'s cut")
    with pytest.raises(JaxtuneError, match=r"cut\.sql:2: row 2 of INSERT INTO t never ends"):
        read(cut)


def test_json_list_and_wrapped_list(tmp_path):
    plain, wrapped, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    plain.write_text(json.dumps([{"text": "one"}, "stray", {"text": "two"}]))
    wrapped.write_text(json.dumps({"version": 2, "data": [{"text": "three"}]}))
    bad.write_text('{"a": [1], "b": [2]}')
    records, stats = read(plain, skip_bad_rows=True)
    assert records == [{"text": "one"}, {"text": "two"}] and stats.skipped == {"not an object": 1}
    assert read(wrapped)[0] == [{"text": "three"}]
    with pytest.raises(JaxtuneError, match="expected a list of objects"):
        read(bad)


def test_jsonl_bad_line_names_file_line_and_text():
    with pytest.raises(JaxtuneError) as e:
        read(RAW / "records_bad.jsonl")
    message = str(e.value)
    assert "records_bad.jsonl:3: malformed JSON" in message
    assert '{"instruction": "Name a primary colour.", "output": "Red"' in message
    records, stats = read(RAW / "records_bad.jsonl", skip_bad_rows=True)
    assert [r["output"] for r in records] == ["chat", "5", "god"]
    assert stats.rows_in == 5 and stats.skipped == {"malformed JSON": 1, "empty": 1}


def test_unreadable_inputs(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("q,a\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(JaxtuneError,
                       match=r"latin1\.csv is not valid UTF-8: byte 0xe9 at offset 7 \(line 2\).*iconv -f latin1"):
        read(latin1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(JaxtuneError, match=r"empty\.jsonl is empty"):
        read(empty)
    with pytest.raises(JaxtuneError, match=r"cannot read \.txt.*\.html, \.htm, \.csv, \.tsv, \.sql, \.json, \.jsonl"):
        read(tmp_path / "notes.txt")
    with pytest.raises(JaxtuneError, match="cannot read .*missing.csv"):
        read(tmp_path / "missing.csv")


def test_prepare_writes_all_inputs_and_reports(tmp_path, capsys):
    out = tmp_path / "out" / "records.jsonl"
    stats = prepare([RAW / "qa.csv", RAW / "qa_sqlite.sql"], out,
                    mapping={"instruction": "question", "output": "answer"}, skip_bad_rows=True, progress=False)
    records = read_jsonl(out)
    assert len(records) == stats.rows_out == 8
    assert records[0] == {"instruction": "What is 2+2?", "output": "4"}
    assert records[-1] == {"instruction": "Two lines?", "output": "first\nsecond"}
    assert capsys.readouterr().out.splitlines() == ["rows in: 10", "rows out: 8", "rows skipped: 2", "  empty: 1",
                                                    "  NULL in column answer: 1"]
    assert list(out.parent.iterdir()) == [out]


def test_prepare_is_atomic(tmp_path):
    out = tmp_path / "records.jsonl"
    with pytest.raises(JaxtuneError, match="records_bad.jsonl:3"):
        prepare([RAW / "qa.csv", RAW / "records_bad.jsonl"], out, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp file
    out.write_text('{"text": "old"}\n')
    with pytest.raises(JaxtuneError):
        prepare([RAW / "records_bad.jsonl"], out, progress=False)
    assert out.read_text() == '{"text": "old"}\n' and list(tmp_path.iterdir()) == [out]


def cli(argv):
    parser = argparse.ArgumentParser(prog="jaxtune")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_a_page_with_nothing_usable_says_so_and_strict_refuses_it(tmp_path, capsys):
    """Before: an HTML page of scripts and navigation only exited 0 with an empty output, without a word."""
    page = tmp_path / "menu.html"
    page.write_text("<html><head><script>var a = 1;</script></head><body><nav><a href='/'>Home</a>"
                    "<a href='/about'>About</a></nav><script>track()</script></body></html>")
    out = tmp_path / "out.jsonl"
    cli(["prepare", str(page), "--out", str(out)])
    assert "warning: nothing usable was found" in capsys.readouterr().out and out.read_text() == ""
    out.unlink()
    with pytest.raises(JaxtuneError, match=r"--strict: could not use 1 of 1 .* element 1 \(<body>\): empty"):
        cli(["prepare", str(page), "--out", str(out), "--strict"])
    assert not out.exists()
    header_only = tmp_path / "empty.csv"  # nothing skipped, nothing found
    header_only.write_text("instruction,output\n")
    with pytest.raises(JaxtuneError, match="--strict: nothing usable was found in the input"):
        cli(["prepare", str(header_only), "--out", str(out), "--strict"])
    assert not out.exists()


def test_cli_prepare_with_mapping_and_cleaning(tmp_path, capsys):
    out = tmp_path / "qa.jsonl"
    cli(["prepare", str(RAW / "qa_mysql.sql"), str(RAW / "qa.csv"), "--out", str(out), "--table", "qa",
         "--map", "instruction=question", "--map", "output=answer", "--min-chars", "40"])  # implies --clean
    assert [r["output"] for r in read_jsonl(out)] == [
        "A function that captures variables from its scope.\nExample: counter = make_counter()",
        "In C:\\Windows\\Fonts\\", "Yes; so are '' and [].", "An apple, or a pear", "Shakespeare, in about 1600"]
    summary = capsys.readouterr().out
    assert summary.startswith("rows in: 9\nrows out: 5\nrows skipped: 1\n  empty: 1\n"
                              "cleaning kept 5 records, removed 3\n  too short: 3\n    e.g. What is 2+2? 4\n")

    with pytest.raises(JaxtuneError, match="--map 'instruction': expected FIELD=COLUMN"):
        cli(["prepare", str(RAW / "qa.csv"), "--out", str(out), "--map", "instruction"])


def test_sql_adjacent_string_literals_are_one_string(tmp_path):
    mysql = tmp_path / "my.sql"  # backticks: MySQL, where "..." is a string too
    mysql.write_text("INSERT INTO `t` (`q`, `a`) VALUES ('abc' 'def', 'one'\n  'line'), (_utf8mb4'x' \"y\", 'z');\n")
    assert read(mysql)[0] == [{"q": "abcdef", "a": "oneline"}, {"q": "xy", "a": "z"}]
    standard = tmp_path / "pg.sql"
    standard.write_text("INSERT INTO t (q) VALUES ('it''s'\n' fine');\n")
    assert read(standard)[0] == [{"q": "it's fine"}]


def test_sql_statements_that_cannot_be_read_are_counted(tmp_path):
    dump = tmp_path / "mixed.sql"
    dump.write_text("CREATE TABLE qa (q TEXT, a TEXT);\n"
                    "INSERT INTO qa (q, a) VALUES ('one', 'two');\n"
                    "UPDATE qa SET a = 'three' WHERE q = 'one';\n"
                    "INSERT INTO qa (q, a) SELECT q, a FROM old_qa;\n"
                    "COPY qa (q, a) FROM stdin;\nfour\tfive\n\\.\n"
                    "INSERT INTO qa (q, a) VALUES ('six', 'seven');\n"  # after COPY's rows: SQL again
                    "COPY qa (q, a) FROM '/srv/qa.tsv';\n"  # the rows are in a file the dump does not hold
                    "INSERT INTO qa (q, a) VALUES ('eight', 'nine') oops ('ten', 'eleven');\n")
    records, stats = read(dump)
    assert records == [{"q": "one", "a": "two"}, {"q": "four", "a": "five"}, {"q": "six", "a": "seven"},
                       {"q": "eight", "a": "nine"}]
    assert stats.skipped == {"UPDATE statement": 1, "INSERT without INTO ... VALUES": 1, "COPY statement": 1,
                             "unreadable rest of INSERT": 1}
    assert stats.rows_in == len(records) + sum(stats.skipped.values())
    assert stats.first_skipped == f"{dump}:3: UPDATE statement"
    pg = tmp_path / "pg17.sql"  # recent pg_dump wraps the dump in psql's \restrict ... \unrestrict
    pg.write_text("\\restrict Zx9\n\nSET statement_timeout = 0;\nCREATE TABLE public.qa (q text);\n"
                  "INSERT INTO public.qa (q) VALUES ('hi');\n\\unrestrict Zx9\n")
    assert read(pg) == ([{"q": "hi"}], Stats(rows_in=1))


@pytest.mark.parametrize("name, text, rows_in, first", [
    ("a.csv", "q,a\nhi,there\n,\n", 2, "a.csv:3: empty"),
    ("a.jsonl", '{"text": "hi"}\n\n{"text": ""}\n', 2, "a.jsonl:3: empty"),
    ("a.json", '[{"text": "hi"}, {"text": " "}]', 2, "a.json item 2: empty"),
    ("a.html", "<html><body><main> </main></body></html>", 1, "a.html element 1 (<main>): empty"),
    ("a.sql", "CREATE TABLE t (text TEXT);\nINSERT INTO t VALUES ('hi');\nUPDATE t SET text = 'ho';\n", 2,
     "a.sql:3: UPDATE statement"),
])
def test_strict_fails_on_any_skipped_row_of_every_format(tmp_path, capsys, name, text, rows_in, first):
    path, out = tmp_path / name, tmp_path / "out.jsonl"
    path.write_text(text)
    with pytest.raises(JaxtuneError) as e:
        prepare([path], out, strict=True, progress=False)
    assert f"could not use 1 of {rows_in} rows or statements (" in str(e.value)
    assert str(e.value).endswith(f"the first at {tmp_path / first}; fix the input, or leave out --strict to "
                                 f"write the rest")
    assert not out.exists()
    stats = prepare([path], out, progress=False)  # without --strict: written, and the skip is counted
    assert stats.rows_in == stats.rows_out + 1 and sum(stats.skipped.values()) == 1
    assert "rows skipped: 1" in capsys.readouterr().out


def test_cli_prepare_strict_is_one_line(tmp_path, capsys):
    from jaxtune.cli import main

    out = tmp_path / "out.jsonl"
    assert main(["prepare", str(RAW / "records_bad.jsonl"), "--out", str(out), "--skip-bad-rows", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().split("\n")) <= 3
    assert (f"jaxtune prepare: error: --strict: could not use 2 of 5 rows or statements (malformed JSON: 1, "
            f"empty: 1), the first at {RAW / 'records_bad.jsonl'}:3: malformed JSON") in err
    assert not out.exists()

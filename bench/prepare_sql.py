"""`jaxtune prepare` throughput on SQL dumps written by the real tools: records/s, median of --repeat runs.

    python bench/prepare_sql.py [--rows 100000] [--repeat 3] [--only sqlite,pg_dump,pg_dump_inserts,mariadb] [--plain]

The table is chitchat's real turns (prompt = one message, response = the reply; every fifth row's
response holds two messages joined by a newline, so dumps spell newlines their own ways), dumped by
sqlite3's `.dump`, pg_dump (default COPY and --inserts) and mariadb-dump with the functions that write
the test fixtures (tests/fixtures/dumps/make_dumps.py: needs sqlite3, a PostgreSQL and a MariaDB server).
Prints one JSON line: records/s and how many of the rows came back exactly (matched by id).
"""
import argparse
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from jaxtune import assets
from jaxtune.ingest.prepare import prepare

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "dumps"


def dump_tools():
    spec = importlib.util.spec_from_file_location("make_dumps", FIXTURES / "make_dumps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def chat_rows(n: int, plain: bool) -> list[list]:
    messages = [m["content"] for r in assets.chitchat_conversations() for m in r["messages"]]
    if plain:  # jaxtune before 2026-12-06 read any dump holding a backtick as MySQL's: the baseline needs none
        messages = [m.replace("`", "'") for m in messages]
    rows = []
    for i in range(n):
        j = (2 * i) % (len(messages) - 3)
        response = messages[j + 1] + ("\n" + messages[j + 2] if i % 5 == 0 else "")
        rows.append([i + 1, messages[j], response])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="sqlite,pg_dump,pg_dump_inserts,mariadb")
    parser.add_argument("--plain", action="store_true", help="no backticks in the text (to time older versions)")
    args = parser.parse_args()
    tools, rows = dump_tools(), chat_rows(args.rows, args.plain)
    expected = {i: {"id": i, "prompt": p, "response": r} for i, p, r in rows}
    result = {"rows": args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)
        os.chdir(tmp)  # su postgres cannot read every working directory
        dumps = {"sqlite": tmp / "sqlite.sql", "pg_dump": tmp / "pg.sql", "pg_dump_inserts": tmp / "pg_inserts.sql",
                 "mariadb": tmp / "mariadb.sql"}
        wanted = args.only.split(",")
        if "sqlite" in wanted:
            tools.sqlite_dump(rows, dumps["sqlite"])
        if {"pg_dump", "pg_dump_inserts"} & set(wanted):
            tools.postgres_dumps(rows, dumps["pg_dump"], dumps["pg_dump_inserts"])
        if "mariadb" in wanted:
            tools.mariadb_dumps(rows, dumps["mariadb"], tmp / "mariadb_single.sql")
        for name in wanted:
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                try:
                    prepare([dumps[name]], tmp / "out.jsonl", progress=False,
                            mapping={"id": "id", "prompt": "prompt", "response": "response"})
                except Exception as e:  # today's main refuses pg_dump's default format
                    result[name] = f"error: {str(e)[:120]}"
                    break
                times.append(time.perf_counter() - start)
            else:
                got = [json.loads(line) for line in (tmp / "out.jsonl").read_text().split("\n")[:-1]]
                exact = sum(g == expected.get(g["id"]) for g in got)  # by id: PostgreSQL dumps in its own order
                result[name] = {"records_per_s": round(args.rows / statistics.median(times)),
                                "exact_rows": exact, "seconds": [round(t, 2) for t in times]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

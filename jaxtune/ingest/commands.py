"""The `jaxtune prepare` and `jaxtune clean` subcommands. Registering them imports no parser (bs4,
sqlparse, datasketch): the work is imported when a command runs."""
from __future__ import annotations

import argparse

from jaxtune.errors import JaxtuneError
from jaxtune.ingest.clean import DEFAULT_SLOP_FILE, CleanOptions, load_phrases
from jaxtune.ingest.html import DEFAULT_SELECTOR
from jaxtune.ingest.read import SUFFIXES

CLEAN_FLAGS = ("min_chars", "max_chars", "slop", "slop_file", "near_dup_threshold")  # options that imply --clean
ATOMIC_OUT = "written atomically: a failed run leaves no file"


def add_clean_arguments(parser: argparse.ArgumentParser) -> None:
    """The cleaning flags `jaxtune clean` and `jaxtune prepare` share (None: not given)."""
    g = parser.add_argument_group("cleaning")
    g.add_argument("--min-chars", type=int, help="drop records whose text fields total fewer characters (default 1)")
    g.add_argument("--max-chars", type=int, help="drop records whose text fields total more characters")
    g.add_argument("--slop", choices=["drop", "strip"],
                   help="records with boilerplate like 'As an AI language model': "
                        "drop them (default) or strip the sentence")
    g.add_argument("--slop-file", help="more slop phrases, one a line (# comments), on top of the shipped list")
    g.add_argument("--near-dup-threshold", type=float,
                   help="drop records this similar to an earlier one (Jaccard of word 5-grams, default 0.85)")
    g.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")


def clean_options(args: argparse.Namespace) -> CleanOptions:
    phrases = load_phrases(DEFAULT_SLOP_FILE) + (load_phrases(args.slop_file) if args.slop_file else [])
    given = {name: getattr(args, name) for name in CLEAN_FLAGS
             if name != "slop_file" and getattr(args, name) is not None}
    return CleanOptions(**given, slop_phrases=phrases, dedup=not args.no_dedup)


def _parse_map(items: list[str]) -> dict[str, str] | None:
    mapping = {}
    for item in items:
        name, _, column = item.partition("=")
        if not name or not column:
            raise JaxtuneError(f"--map {item!r}: expected FIELD=COLUMN, e.g. --map instruction=question")
        mapping[name] = column
    return mapping or None


def _run_prepare(args: argparse.Namespace) -> None:
    from jaxtune.ingest.prepare import prepare

    wants_clean = args.clean or args.no_dedup or any(getattr(args, name) is not None for name in CLEAN_FLAGS)
    prepare(args.inputs, args.out, mapping=_parse_map(args.map), selector=args.selector, table=args.table,
            skip_bad_rows=args.skip_bad_rows, strict=args.strict,
            clean=clean_options(args) if wants_clean else None)


def _run_clean(args: argparse.Namespace) -> None:
    from jaxtune.ingest.prepare import clean_file

    clean_file(args.input, args.out, clean_options(args), skip_bad_rows=args.skip_bad_rows)


def register_cli(subparsers) -> None:
    """Add `prepare` and `clean` to the `jaxtune` command's subparsers."""
    p = subparsers.add_parser("prepare",
                              help="turn raw files (HTML, CSV/TSV, SQL dumps, JSON, JSONL) into JSONL records")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=f"files ending in {', '.join(SUFFIXES)}")
    p.add_argument("--out", required=True, metavar="records.jsonl", help=ATOMIC_OUT)
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
    p.set_defaults(func=_run_prepare)

    p = subparsers.add_parser("clean",
                              help="clean JSONL records: normalise text, drop slop, bad lengths and duplicates")
    p.add_argument("input", metavar="IN.jsonl")
    p.add_argument("--out", required=True, metavar="OUT.jsonl", help=ATOMIC_OUT)
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed lines instead of stopping")
    add_clean_arguments(p)
    p.set_defaults(func=_run_clean)

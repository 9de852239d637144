"""Raw-data ingestion: what `jaxtune prepare` and `jaxtune clean` need, and nothing training needs.

    read       one raw file (by suffix) to records, a --map applied, bad rows counted; dispatches to
      html       HTML: visible text of CSS-selected elements (bs4, imported when a page is read)
      delimited  CSV/TSV (sniffed dialect)
      sql        SQL dumps' INSERT rows (sqlparse, imported when a dump is read)
      (JSON/JSONL: jaxtune.data.records, the reader training uses)
    clean      normalise text, drop slop, bad lengths, exact and near duplicates (datasketch, lazily)
    prepare    Stats, prepare() and clean_file(): read, clean, write one JSONL file atomically
    commands   the two subcommands' arguments; imports the work only when a command runs

Imports run one way: commands -> prepare -> read -> html/delimited/sql, and prepare -> clean; every
module may import jaxtune.data.records (and jaxtune.atomic, jaxtune.errors). Nothing under jaxtune.data,
jaxtune.train or jaxtune.config imports this package, so training never loads bs4, soupsieve or sqlparse.
"""

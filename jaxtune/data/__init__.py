"""Data for training: records to tokens to checked, packed, global batches.

    records    JSON/JSONL records with file:line errors (BadRow, Tally, usable), write_jsonl
    formats    FormatOptions (FORMATS, OVERLONG, from_config), Formatter: records -> Tokenized ids + loss weights
    packing    best-fit-decreasing packing of Tokenized samples into fixed [rows, seq_len] arrays
    preflight  DataReport: counts, histogram, packing efficiency, the checks that stop a run
    loader     sources (files, hub, tfds) -> tokenized (cached on disk) -> PackedData; Batches

Imports run one way: loader -> preflight -> packing -> formats, and loader -> records; none of these
imports raw-data ingestion (jaxtune.ingest: HTML/CSV/SQL readers, cleaning, `jaxtune prepare`/`clean`),
which builds on records instead. Caches live under jaxtune.cache.cache_dir().
"""

"""Data for training: records to tokens to checked, packed, global batches.

    records    JSON/JSONL records with file:line errors (BadRow, Tally, usable), write_jsonl
    formats    FormatOptions (FORMATS, OVERLONG, from_config), Formatter: records -> Tokenized ids + loss weights
    token_cache  the tokenized data on disk: flat arrays + ledger, built chunk by chunk, memory-mapped
    tokenize_worker  a process that tokenizes chunks (hosts with more than 2 cores)
    pod        the hosts of a pod tokenize 1/N each and all-gather the chunks into every host's cache
    packing    best-fit-decreasing packing plan (Packed: rows built per step from the memory map)
    preflight  DataReport: counts, histogram, packing efficiency, the checks that stop a run
    loader     sources (files, hub, tfds) -> tokenized (cached on disk) -> PackedData; Batches

Imports run one way: loader -> pod -> token_cache, loader -> preflight -> packing -> formats, and
loader -> records; none of these
imports raw-data ingestion (jaxtune.ingest: HTML/CSV/SQL readers, cleaning, `jaxtune prepare`/`clean`),
which builds on records instead. Caches live under jaxtune.cache.cache_dir().
"""

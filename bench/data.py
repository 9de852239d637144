"""Wall time to prepare, tokenize and pack the whole chitchat dataset, first and cached, and the
packing efficiency at each sequence length.

    python bench/data.py [--seq-lens 512 2048]

Prints one JSON line. "prepare" converts chitchat-dataset's dataset.json into chat records; each
"first" run uses an empty tokenization cache, "cached" the one the first run wrote.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from jaxtune import assets
from jaxtune.data import loader
from jaxtune.data.formats import FormatOptions
from jaxtune.data.records import write_jsonl


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    args = parser.parse_args()
    model = str(assets.smollm2())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        records = assets.chitchat_conversations()
        write_jsonl(Path(tmp) / "chitchat.jsonl", records)
        result = {"conversations": len(records), "prepare_s": round(time.perf_counter() - start, 2)}
        for seq_len in args.seq_lens:
            opts = FormatOptions("chat", seq_len=seq_len)
            for run in ("first", "cached"):
                start = time.perf_counter()
                data = loader.build([str(Path(tmp) / "chitchat.jsonl")], model, opts, cache_dir=Path(tmp) / "cache")
                result[f"T{seq_len}_{run}_s"] = round(time.perf_counter() - start, 2)
            report = data.train_report
            result[f"T{seq_len}_packing_efficiency"] = round(report.packing_efficiency, 4)
            result[f"T{seq_len}_rows"] = report.rows
            result[f"T{seq_len}_tokens"] = report.tokens
            result[f"T{seq_len}_supervised_tokens"] = report.supervised_tokens
            result[f"T{seq_len}_truncated"] = report.truncated
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Tokenizing at scale, jaxtune against what TRL/axolotl users run, side by side on the same records.

    python bench/data.py --records 100000 [--seq-len 2048] [--num-proc 2]
    python bench/data.py --chitchat [--seq-lens 512 2048]

The first writes `--records` synthetic chat records (2-6 consecutive messages of a chitchat conversation,
each cut to 1,000 characters; no download), then runs, each in a fresh process with an empty cache: `jaxtune preflight` on them with
SmolLM2's tokenizer and chat template, and the reference — `datasets.load_dataset("json")`, then a batched
`map` of `apply_chat_template` + the tokenizer with `num_proc`. It prints, per side, the wall time, the peak
RSS of its whole process tree (summed over the processes alive at each 0.1 s sample) and of its main process,
and the tokens it counted. `--chitchat` times prepare / tokenize+pack (first and cached) of the whole
chitchat set and its packing efficiency, as one JSON line.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from jaxtune import assets
from jaxtune.data import loader
from jaxtune.data.formats import FormatOptions
from jaxtune.data.records import write_jsonl

REFERENCE = textwrap.dedent("""
    import sys, datasets, transformers
    data, model, num_proc, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    tok = transformers.AutoTokenizer.from_pretrained(model)

    def encode(batch):
        texts = [tok.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
        return {"input_ids": tok(texts, add_special_tokens=False)["input_ids"]}

    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=cache)
    ds = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
    lengths = ds.map(lambda b: {"n": [len(x) for x in b["input_ids"]]}, batched=True, num_proc=num_proc,
                     remove_columns=["input_ids"])
    print("tokens", sum(lengths["n"]))
""")


def synthetic_records(n: int, seed: int = 0):
    """`n` chat records of 2-6 consecutive messages of a random chitchat conversation, user first, each message
    cut to 1,000 characters (no record is then longer than 2,048 tokens: both sides count the same tokens)."""
    conversations = [c["messages"] for c in assets.chitchat_conversations() if len(c["messages"]) >= 2]
    rng = random.Random(seed)
    for _ in range(n):
        messages = rng.choice(conversations)
        k = min(rng.randint(2, 6), len(messages))
        start = rng.randrange(len(messages) - k + 1)
        yield {"messages": [{"role": ("user", "assistant")[i % 2], "content": m["content"][:1000]}
                            for i, m in enumerate(messages[start:start + k])]}


def measured(command: list[str], env: dict) -> dict:
    """Wall seconds and peak RSS (bytes) of the process tree and of its main process; its stdout."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    main = psutil.Process(proc.pid)
    tree_peak = main_peak = 0
    while proc.poll() is None:
        try:
            members = [main, *main.children(recursive=True)]
            rss = [m.memory_info().rss for m in members if m.is_running()]
        except psutil.Error:
            rss = []
        if rss:
            tree_peak, main_peak = max(tree_peak, sum(rss)), max(main_peak, rss[0])
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{command[:4]} failed:\n{err[-3000:]}")
    return {"wall_s": round(time.perf_counter() - start, 1), "tree_peak_gb": round(tree_peak / 1e9, 2),
            "main_peak_gb": round(main_peak / 1e9, 2), "stdout": out}


def scale(args):
    model = str(assets.smollm2())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        write_jsonl(data, synthetic_records(args.records))
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXTUNE_CACHE": str(Path(tmp) / "jaxtune-cache")}
        ours = measured([sys.executable, "-m", "jaxtune.cli", "preflight", str(data), "--model", model,
                         "--seq-len", str(args.seq_len), "--show", "0"], env)
        ours["tokens"] = int(re.search(r"tokens ([\d,]+)", ours.pop("stdout")).group(1).replace(",", ""))
        theirs = measured([sys.executable, "-c", REFERENCE, str(data), model, str(args.num_proc),
                           str(Path(tmp) / "hf-cache")], env)
        theirs["tokens"] = int(theirs.pop("stdout").split()[-1])
    print("| records | side | wall s | peak RSS, process tree GB | main process GB | tokens |")
    print("|---|---|---|---|---|---|")
    for side, r in (("jaxtune preflight", ours), (f"datasets map, num_proc={args.num_proc}", theirs)):
        print(f"| {args.records:,} | {side} | {r['wall_s']} | {r['tree_peak_gb']} | {r['main_peak_gb']} | "
              f"{r['tokens']:,} |")


def chitchat(args):
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--num-proc", type=int, default=2, help="the reference's worker processes")
    parser.add_argument("--chitchat", action="store_true", help="the whole chitchat set instead (one JSON line)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048], help="with --chitchat")
    args = parser.parse_args()
    chitchat(args) if args.chitchat else scale(args)


if __name__ == "__main__":
    main()

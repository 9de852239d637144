"""Tokenizing at scale, jaxtune against what TRL/axolotl users run, side by side on the same records.

    python bench/data.py --records 100000 [--seq-len 2048] [--num-proc 2] [--train] [--repeat 3]
    python bench/data.py --records 20000 --hosts 2
    python bench/data.py --chitchat [--seq-lens 512 2048]

The first writes `--records` synthetic chat records (2-6 consecutive messages of a chitchat conversation,
each cut to 1,000 characters; no download), then runs, each in a fresh process with an empty cache: `jaxtune preflight` on them with
SmolLM2's tokenizer and chat template, and the reference — `datasets.load_dataset("json")`, then a batched
`map` of `apply_chat_template` + the tokenizer with `num_proc`. It prints, per side, the wall time, the peak
RSS of its whole process tree (summed over the processes alive at each 0.1 s sample) and of its main process,
and the tokens it counted. `--train` then runs 2 steps of a tiny random Llama (SmolLM2's tokenizer) on the
records from the cache preflight built, measured the same way. `--hosts 2` times the tokenization as one host and as two (local processes joined by jax.distributed,
each pinned to one core as a host has its own CPUs; jaxtune.data.pod). `--chitchat` times prepare / tokenize+pack (first and cached) of the whole
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

    out_file, err_file = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # a pipe would fill and block it
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=out_file, stderr=err_file, text=True)
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
    wall = time.perf_counter() - start
    out, err = (f.seek(0) or f.read() for f in (out_file, err_file))
    if proc.returncode:
        raise SystemExit(f"{command[:4]} failed:\n{err[-3000:]}")
    return {"wall_s": round(wall, 1), "tree_peak_gb": round(tree_peak / 1e9, 2),
            "main_peak_gb": round(main_peak / 1e9, 2), "stdout": out}


def scale(args):
    """Both sides on the same records, `--repeat` times in turn (this shared machine varies run to run):
    the median of each figure."""
    import statistics

    model = str(assets.smollm2())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        write_jsonl(data, synthetic_records(args.records))
        runs = {}
        for n in range(args.repeat):
            for side, r in one_pair(Path(tmp) / str(n), data, model, args):
                runs.setdefault(side, []).append(r)
    print(f"| records | side | wall s | peak RSS, process tree GB | main process GB | tokens |  (median of {args.repeat})")
    print("|---|---|---|---|---|---|")
    for side, rs in runs.items():
        med = {key: round(statistics.median(r[key] for r in rs), 2) for key in ("wall_s", "tree_peak_gb", "main_peak_gb")}
        walls = " / ".join(str(r["wall_s"]) for r in rs)
        print(f"| {args.records:,} | {side} | {med['wall_s']} ({walls}) | {med['tree_peak_gb']} | {med['main_peak_gb']} | "
              f"{rs[0]['tokens']:,} |")


def one_pair(tmp: Path, data: Path, model: str, args) -> list[tuple[str, dict]]:
    """jaxtune preflight and the reference (then, `--train`, 2 steps from the cache), each with empty caches."""
    tmp.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXTUNE_CACHE": str(tmp / "jaxtune-cache")}
    ours = measured([sys.executable, "-m", "jaxtune.cli", "preflight", str(data), "--model", model,
                     "--seq-len", str(args.seq_len), "--show", "0"], env)
    ours["tokens"] = int(re.search(r"tokens ([\d,]+)", ours.pop("stdout")).group(1).replace(",", ""))
    sides = [("jaxtune preflight", ours)]
    if not args.no_reference:
        theirs = measured([sys.executable, "-c", REFERENCE, str(data), model, str(args.num_proc),
                           str(tmp / "hf-cache")], env)
        theirs["tokens"] = int(theirs.pop("stdout").split()[-1])
        sides.append((f"datasets map, num_proc={args.num_proc}", theirs))
    if args.train:
        trained = measured([sys.executable, "-m", "jaxtune.cli", "train", "configs/quickstart.py",
                            *train_overrides(tmp, data, args.seq_len)], env)
        trained["tokens"] = int(re.search(r"tokens ([\d,]+)", trained.pop("stdout")).group(1).replace(",", ""))
        sides.append(("jaxtune train, 2 steps of a tiny model, from the cache", trained))
    return sides


def train_overrides(tmp: Path, data: Path, seq_len: int) -> list[str]:
    """A 2-step LoRA run of a tiny random Llama with SmolLM2's tokenizer (the cache preflight built is hit)."""
    import shutil

    import transformers

    model = tmp / "tiny"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq_len, tie_word_embeddings=True)).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(assets.smollm2() / name, model / name)
    values = {"workdir": tmp / "run", "model.path": model, "data.train": data, "data.val": "", "data.seq_len": seq_len,
              "data.overlong": "truncate",  # preflight's default (the quickstart config splits)
              "train.max_steps": 2, "train.micro_batch_size": 1, "eval.every_steps": 0, "checkpoint.every_steps": 100,
              "eval.prompt": "", "log.progress": False, "mesh.fsdp": 1}
    return [f"--config.{key}={value}" for key, value in values.items()]


def hosts(args):
    """`tokenize_sources` as 1 host and as `--hosts` hosts (local processes joined by jax.distributed over
    gloo), each process pinned to its own core as a host has its own CPUs: wall seconds of each side."""
    import socket

    model = str(assets.smollm2())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        write_jsonl(data, synthetic_records(args.records))
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        result = {"records": args.records}
        for n in (1, args.hosts):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = str(s.getsockname()[1])
            start = time.perf_counter()
            procs = [subprocess.Popen(["taskset", "-c", str(i), sys.executable, __file__, "--host-worker", str(i),
                                       str(n), port, str(data), str(Path(tmp) / f"{n}-{i}"), model], env=env,
                                      stdout=subprocess.PIPE, text=True) for i in range(n)]
            outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            result[f"{n}_hosts_wall_s"] = round(time.perf_counter() - start, 1)
            result[f"{n}_hosts_tokenize_s"] = max(o["tokenize_s"] for o in outs)
            result[f"{n}_hosts_cpu_s_per_host"] = [o["cpu_s"] for o in outs]
            result[f"{n}_hosts_tokens"] = outs[0]["tokens"]
    print(json.dumps(result))


def host_worker(index: int, n: int, port: str, data: str, cache: str, model: str):
    import jax

    if n > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=index)
    import resource

    def cpu_s():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    start, cpu = time.perf_counter(), cpu_s()
    built = loader.tokenize_sources([data], model, FormatOptions("chat", seq_len=2048), cache_dir=Path(cache),
                                    progress=False)
    print(json.dumps({"tokenize_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu_s() - cpu, 1),
                      "tokens": len(built.ids)}))


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
    parser.add_argument("--no-reference", action="store_true", help="jaxtune's side alone")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs, in turn: medians")
    parser.add_argument("--train", action="store_true", help="then 2 training steps of a tiny model from the cache")
    parser.add_argument("--chitchat", action="store_true", help="the whole chitchat set instead (one JSON line)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048], help="with --chitchat")
    parser.add_argument("--hosts", type=int, help="time tokenizing as 1 host and as this many (local processes)")
    parser.add_argument("--host-worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host_worker:
        index, n, *rest = args.host_worker
        host_worker(int(index), int(n), *rest)
    elif args.hosts:
        hosts(args)
    else:
        chitchat(args) if args.chitchat else scale(args)


if __name__ == "__main__":
    main()

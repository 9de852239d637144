"""The `jaxtune` command: a thin layer over the Python API. Bad input prints one clear line, not a traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from jaxtune.assets import ASSETS
from jaxtune.data.formats import FORMATS, OVERLONG, FormatOptions
from jaxtune.errors import JaxtuneError
from jaxtune.ingest import commands as ingest_commands  # prepare, clean: their readers load when they run
from jaxtune.models.llama import DTYPES
from jaxtune.quant import BLOCK_SIZES

EXIT_RESUMABLE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT/SIGHUP after a checkpoint; the same command resumes


def cmd_assets(args):
    for name in args.names:
        print(ASSETS[name]())


def cmd_generate(args):
    from jaxtune.generate import generate, prompt_ids, stop_token_ids
    from jaxtune.models.hf import from_pretrained, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = from_pretrained(path, dtype=args.dtype)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    stops = stop_token_ids(tokenizer, path)
    start = time.perf_counter()
    [new] = generate(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, stop_ids=stops, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"[{len(new)} tokens in {elapsed:.1f}s, compile included]", file=sys.stderr)


def cmd_preflight(args):
    from jaxtune.data import loader
    from jaxtune.data.preflight import debug_view
    from jaxtune.models.hf import load_tokenizer, resolve_model_path

    tokenizer_dir = str(resolve_model_path(args.model))
    opts = FormatOptions(format=args.format, seq_len=args.seq_len, train_on_inputs=args.train_on_inputs,
                         overlong=args.overlong, chat_template=args.chat_template)
    data = loader.build(args.data, tokenizer_dir, opts, val_sources=args.val or (), val_fraction=args.val_fraction)
    print(f"train data ({', '.join(args.data)}):\n{data.train_report.text()}")
    if data.val_report is not None:
        print(f"validation data:\n{data.val_report.text()}")
    tokenizer = load_tokenizer(tokenizer_dir)
    for i in range(min(args.show, len(data.train_tokenized))):
        print(f"\nsample {i} ('+' = target, '-' = masked):\n{debug_view(tokenizer, *data.train_tokenized.sample(i))}")
    data.train_report.check()
    print("preflight: OK")


PROCESS_FLAGS = ("--coordinator", "--num-processes", "--process-id")


def cmd_train(args):
    from jaxtune import config, distributed

    overrides = []
    for item in args.overrides:  # the process flags may also follow the config file
        flag, _, value = item.partition("=")
        if flag in PROCESS_FLAGS and value:
            setattr(args, flag[2:].replace("-", "_"), value)
        else:
            overrides.append(item)
    cfg = config.load(args.config, overrides)  # a bad config fails before any process waits for the others
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if not distributed.is_main():  # its reports would repeat process 0's; errors still reach stderr
        import jax

        print(f"process {jax.process_index()} of {jax.process_count()}: training; process 0 reports", file=sys.stderr)
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # native libraries' prints too
    from jaxtune.train.loop import train

    summary = train(cfg)
    return EXIT_RESUMABLE if summary.get("stopped_by_signal") else 0


def device_count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise JaxtuneError(f"--devices={value}: a number of devices, 1 or more (e.g. --devices=8); leave it out for "
                           "the devices visible here")
    return int(value)


def cmd_estimate(args):
    from jaxtune import config
    from jaxtune.estimate import estimate

    overrides, platform = [], args.platform
    devices = None if args.devices is None else device_count(args.devices)
    rest = iter(args.overrides)
    for item in rest:  # --devices / --platform may also follow the config file
        flag, _, value = item.partition("=")
        if flag in ("--devices", "--platform"):
            value = value or next(rest, "")
            if flag == "--devices":
                devices = device_count(value)
            else:
                platform = value
        else:
            overrides.append(item)
    if platform not in (None, "cpu", "gpu", "tpu"):
        raise JaxtuneError(f"--platform={platform}: one of cpu, gpu, tpu")
    print(estimate(config.load(args.config, overrides), devices, platform=platform).text())


def cmd_compile(args):
    import jax

    if not os.environ.get("JAX_PLATFORMS"):  # compiling for a TPU/GPU never needs this machine's accelerator
        jax.config.update("jax_platforms", "cpu")
    from jaxtune import aot, config

    configs, overrides, topologies = list(args.configs), [], list(args.topology or [])
    rest = iter(args.overrides)
    for item in rest:  # --topology may also follow the config files
        if item == "--topology":
            topologies.append(next(rest, ""))
        elif item.startswith("--topology="):
            topologies.append(item.split("=", 1)[1])
        elif item == "--markdown":
            args.markdown = True
        elif item.startswith("--"):
            overrides.append(item)
        else:
            configs.append(item)
    if not topologies:
        raise JaxtuneError("name the device to compile for: --topology v4-8 (v2-8, v3-8, v4-N, v5litepod-N, v5p-N, "
                           "v6e-N; it may repeat)")
    reports = []
    for path in configs:
        cfg = config.load(path, overrides)
        for name in topologies:
            report = aot.compile_run(cfg, aot.target(name))
            reports.append((path, report))
            print(f"{path} on {report.text()}", flush=True)
    if args.markdown:
        print("\n" + aot.markdown_table(reports))
    failed = [f"{path} on {r.target.name}" for path, r in reports if not r.fits]
    if failed:
        raise JaxtuneError(f"does not compile or does not fit: {', '.join(failed)}")


def cmd_keys(args):
    from jaxtune import config

    print(config.describe_markdown() if args.markdown else config.describe(), end="" if args.markdown else "\n")


def cmd_curves(args):
    from jaxtune.paths import run_path
    from jaxtune.train import curves

    workdir = run_path(args.workdir)
    metrics = curves.read_metrics(workdir)
    if not metrics:
        raise JaxtuneError(f"{args.workdir}/metrics.jsonl: missing or empty; is this a jaxtune workdir?")
    vocab_size = None
    try:  # the collapse diagnosis compares the loss with ln(vocab)
        vocab_size = json.loads((workdir / "config.json").read_text())["resolved"]["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    print(curves.plot(workdir, metrics, vocab_size))
    verdict = curves.diagnose_metrics(metrics, vocab_size)
    print(f"diagnosis: {verdict['diagnosis']} — {verdict['reason']}")


def cmd_export(args):
    from jaxtune.export import export

    kind = "adapter" if args.adapter else "merged"
    result = export(args.workdir, args.out, kind=kind, step=args.step, best=args.best, dtype=args.dtype,
                    verify=not args.no_verify, overwrite=args.overwrite)
    print(f"exported {kind} (step {result['step']}) to {result['out']}")


def cmd_quantize(args):
    from jaxtune.config import split_list
    from jaxtune.models.bnb import quantize_checkpoint
    from jaxtune.models.llama import LINEAR_MODULES
    from jaxtune.quant import QuantOptions

    dense = split_list(args.dense_modules)
    unknown = sorted(set(dense) - set(LINEAR_MODULES))
    if unknown:
        raise JaxtuneError(f"--dense-modules: {', '.join(unknown)} is not a linear module; choose from "
                           f"{', '.join(LINEAR_MODULES)}")
    modules = tuple(m for m in LINEAR_MODULES if m not in dense)
    if not modules:
        raise JaxtuneError("--dense-modules keeps every linear module dense: nothing would be quantized")
    out = quantize_checkpoint(args.model, args.out, QuantOptions(modules, args.block_size, not args.no_double_quant),
                              overwrite=args.overwrite)
    print(f"wrote {out} (NF4, blocks of {args.block_size}{', double quantization' if not args.no_double_quant else ''}; "
          f"dense: embeddings, norms, lm_head{''.join(', ' + m for m in dense)})")


def cmd_verify(args):
    from jaxtune.export import verify_model

    verify_model(args.model, args.dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_model_commands(sub)
    ingest_commands.register_cli(sub)
    return parser


def _add_data_commands(sub):
    """assets, preflight: the data a run trains on."""
    p = sub.add_parser("assets", help="build the offline demo assets (SmolLM2-135M-Instruct, chitchat) and print their paths")
    p.add_argument("names", nargs="+", choices=list(ASSETS))
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("preflight", help="tokenize, pack and check data before training; show samples as token/label pairs")
    p.add_argument("data", nargs="+", help="record files (.jsonl/.json/.csv/.parquet), hub names, or tfds:NAME")
    p.add_argument("--model", required=True, help="model directory whose tokenizer and chat template to use")
    p.add_argument("--format", default=FormatOptions.format, choices=FORMATS)
    p.add_argument("--seq-len", type=int, default=FormatOptions.seq_len)
    p.add_argument("--train-on-inputs", action="store_true", help="supervise prompts/user turns too")
    p.add_argument("--overlong", default=FormatOptions.overlong, choices=OVERLONG)
    p.add_argument("--chat-template", help="'chatml' or a jinja template string (default: the tokenizer's)")
    p.add_argument("--val", nargs="*", help="separate validation files")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this share of samples instead")
    p.add_argument("--show", type=int, default=1, help="print this many samples as token/label pairs")
    p.set_defaults(func=cmd_preflight)


def _add_training_commands(sub):
    """train, estimate, keys, curves: running and watching a training."""
    p = sub.add_parser("train", help="train (or resume) from a config file: jaxtune train CONFIG.py [--config.key=value ...]")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for a job of several processes (hosts); "
                                         "default $JAX_COORDINATOR_ADDRESS; Cloud TPU VMs need none of these")
    p.add_argument("--num-processes", help="processes in the job (default $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", help="this process, 0 .. N-1 (default $JAX_PROCESS_ID)")
    p.add_argument("config", help="a Python file with get_config(), e.g. configs/quickstart.py")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--config.train.lr=1e-4 ... (see `jaxtune keys`)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("estimate", help="memory per device of a run, before any weight is loaded, and the devices "
                                        "it fits: jaxtune estimate CONFIG.py [--devices=N] [--config.key=value ...]")
    p.add_argument("--devices", type=str, help="devices the mesh spans (default: those visible here)")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"),
                   help="plan for this platform: its attention kernel and calibration (default: this machine's)")
    p.add_argument("config", help="a Python file with get_config(), e.g. configs/llama3_8b_qlora.py")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--config.data.seq_len=2048 ... (see `jaxtune keys`)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("compile", help="compile a run's train and eval steps for a TPU slice this machine does not "
                                       "have, with the TPU compiler: memory per chip, FLOPs, the HLO checks: "
                                       "jaxtune compile CONFIG.py --topology v4-8 [--config.key=value ...]")
    p.add_argument("--topology", action="append", help="a TPU type as gcloud names it (v2-8, v3-8, v4-8 .. v4-4096, "
                                                       "v5litepod-N, v5p-N, v6e-N); may repeat")
    p.add_argument("--markdown", action="store_true", help="also print the results as a Markdown table")
    p.add_argument("configs", nargs="+", metavar="config", help="Python file(s) with get_config()")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="--config.data.seq_len=2048 ... (see `jaxtune keys`)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("keys", help="list every config key with its default and help")
    p.add_argument("--markdown", action="store_true", help="as the Markdown page docs/configs.md")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("curves", help="redraw WORKDIR/curves.png from metrics.jsonl and print the diagnosis")
    p.add_argument("workdir")
    p.set_defaults(func=cmd_curves)


def _add_model_commands(sub):
    """generate, export, quantize, verify: model directories in and out."""
    p = sub.add_parser("generate", help="complete a prompt with a model directory (KV cache, greedy at temperature 0)")
    p.add_argument("model", help="Hugging Face model directory (or hub id when online)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a run as a merged HF model dir or a PEFT adapter dir, checked by transformers/peft")
    p.add_argument("workdir")
    p.add_argument("--out", required=True)
    kind = p.add_mutually_exclusive_group(required=True)
    kind.add_argument("--merged", action="store_true", help="LoRA folded into the weights (also for full fine-tunes)")
    kind.add_argument("--adapter", action="store_true", help="PEFT adapter: adapter_config.json + adapter_model.safetensors")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="a saved step (default: the latest)")
    which.add_argument("--best", action="store_true", help="the checkpoint with the best eval loss")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="merged weights' dtype")
    p.add_argument("--no-verify", action="store_true", help="skip the transformers/peft parity check")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier jaxtune export of the same kind (nothing else is ever replaced)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="write a model dir as a bitsandbytes 4-bit (NF4) checkpoint that transformers "
                                        "loads and jaxtune trains with method='qlora'")
    p.add_argument("model", help="a dense Hugging Face Llama/Mistral directory")
    p.add_argument("--out", required=True)
    p.add_argument("--block-size", type=int, default=64, choices=BLOCK_SIZES, help="weights per NF4 scale")
    p.add_argument("--no-double-quant", action="store_true", help="keep the block scales in float32")
    p.add_argument("--dense-modules", default="", help="linear modules to keep dense, e.g. 'down_proj'")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is an earlier `jaxtune quantize` output")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("verify", help="compare jaxtune's logits with transformers' on a model directory")
    p.add_argument("model")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.set_defaults(func=cmd_verify)


def no_tpu_probe() -> None:
    """libtpu (jaxtune[tpu], the test extra) makes JAX look for a TPU at start-up and print a screen of
    warnings where there is none. A TPU chip is a PCI device of Google's (vendor 0x1ae0): without one,
    and without a GPU plugin, JAX is told to use the CPU. JAX_PLATFORMS, when set, always wins."""
    import importlib.util
    from pathlib import Path

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    pci = Path("/sys/bus/pci/devices")
    if not pci.is_dir() or any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                                     "jax_rocm7_plugin")):
        return
    try:
        if any(v.read_text().strip() == "0x1ae0" for v in pci.glob("*/vendor")):
            return
    except OSError:
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 bad input or a stopped run (the message says why); 75 stopped by a
    signal with a checkpoint saved, re-run to resume; 130 interrupted before training began; 1 a bug."""
    no_tpu_probe()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except JaxtuneError as e:
        print(f"jaxtune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxtune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

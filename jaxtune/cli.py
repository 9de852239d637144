"""The `jaxtune` command: a thin layer over the Python API. Bad input prints one clear line, not a traceback."""
from __future__ import annotations

import argparse
import sys
import time

from jaxtune.errors import JaxtuneError


def cmd_assets(args):
    from jaxtune import assets

    for name in args.names:
        print(assets.ASSETS[name]())


def cmd_generate(args):
    from transformers import AutoTokenizer

    from jaxtune.generate import generate, prompt_ids, stop_token_ids
    from jaxtune.models.hf import from_pretrained, resolve_model_path

    path = resolve_model_path(args.model)
    model = from_pretrained(path, dtype=args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    stops = stop_token_ids(tokenizer, path)
    start = time.perf_counter()
    [new] = generate(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, stop_ids=stops, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"[{len(new)} tokens in {elapsed:.1f}s, compile included]", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("assets", help="build the offline demo assets (SmolLM2-135M-Instruct, chitchat) and print their paths")
    p.add_argument("names", nargs="+", choices=["smollm2", "chitchat"])
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("generate", help="complete a prompt with a model directory (KV cache, greedy at temperature 0)")
    p.add_argument("model", help="Hugging Face model directory (or hub id when online)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except JaxtuneError as e:
        print(f"jaxtune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxtune {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

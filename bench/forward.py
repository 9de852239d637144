"""Forward throughput of jaxtune's Flax Llama beside transformers, same model, same batch, same run.

    python bench/forward.py [--model DIR] [--batch 4] [--seq 512] [--repeats 5] [--dtype float32]

Prints one JSON line: tokens/s for each (median of --repeats timed calls after a warm-up that
includes jaxtune's compile), their ratio, and the relative error between the two logits.
"""
import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np


def timed(fn, repeats):
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model dir (default: the SmolLM2 demo asset)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers side")
    args = parser.parse_args()

    from flax import nnx

    from jaxtune import assets, from_pretrained

    path = args.model or str(assets.smollm2())
    tokens = np.random.RandomState(0).randint(0, 32000, (args.batch, args.seq)).astype(np.int32)
    n_tokens = args.batch * args.seq
    model = from_pretrained(path, dtype=args.dtype)
    forward = nnx.jit(lambda m, t: m.hidden_states(t))  # logits head timed below with the same split
    logits_fn = nnx.jit(lambda m, t: m(t))
    ours = timed(lambda: logits_fn(model, tokens).block_until_ready(), args.repeats)
    result = {
        "device": jax.devices()[0].device_kind, "platform": platform.machine(), "model": path,
        "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "repeats": args.repeats,
        "jaxtune_tokens_per_s": round(n_tokens / ours, 1),
        "jaxtune_hidden_only_tokens_per_s": round(n_tokens / timed(
            lambda: forward(model, tokens).block_until_ready(), args.repeats), 1),
    }
    if not args.no_torch:
        import torch
        from transformers import AutoModelForCausalLM

        torch_dtype = getattr(torch, args.dtype)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        batch = torch.tensor(tokens, dtype=torch.long, device=device)

        def torch_forward():
            with torch.no_grad():
                out = ref(batch).logits
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        theirs = timed(torch_forward, args.repeats)
        diff = np.asarray(logits_fn(model, tokens), np.float32) - torch_forward().float().cpu().numpy()
        result.update({
            "transformers_tokens_per_s": round(n_tokens / theirs, 1),
            "transformers_attn": ref.config._attn_implementation,
            "torch_threads": torch.get_num_threads(),
            "speed_ratio_jaxtune_over_transformers": round(theirs / ours, 3),
            "logits_rel_err": float(np.linalg.norm(diff) / np.linalg.norm(torch_forward().float().cpu().numpy())),
        })
    print(json.dumps(result))


if __name__ == "__main__":
    main()

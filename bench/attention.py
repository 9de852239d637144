"""Attention alone: jaxtune's CPU backends beside torch's scaled_dot_product_attention, one layer's shape.

    python bench/attention.py [--batch 4] [--seq 512] [--heads 9] [--kv-heads 3] [--head-dim 64] [--block 128]

Times the forward and the forward + backward (gradients in q, k, v of sum(out²)) of `model.attention`
"xla" and "blocked" (at --block) and of torch's causal SDPA with grouped-query heads, median of 10 calls
after a warm-up (the compile). The defaults are SmolLM2-135M's attention at the bench/train.py shape: the
figures that chose the block size and the arithmetic of `jaxtune.attention.masked`. Prints one JSON line.
"""
import argparse
import functools
import json
import statistics
import time

import numpy as np


def median_ms(fn, repeats=10):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("batch", 4), ("seq", 512), ("heads", 9), ("kv-heads", 3), ("head-dim", 64), ("block", 128)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import torch

    from jaxtune import attention

    b, t = args.batch, args.seq
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, t, n, args.head_dim)).astype(np.float32)
               for n in (args.heads, args.kv_heads, args.kv_heads))
    positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    segments = np.ones_like(positions)
    result = {"batch": b, "seq": t, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
              "block": args.block, "torch_threads": torch.get_num_threads()}
    backends = {"xla": functools.partial(attention.attend, "xla"),
                "blocked": lambda *a: attention._blocked(*a, block=args.block).reshape(b, t, -1)}
    for name, fn in backends.items():
        forward = jax.jit(lambda q, k, v, fn=fn: fn(q, k, v, positions, segments, None))
        grads = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v, positions, segments, None) ** 2),
                                 argnums=(0, 1, 2)))
        result[f"{name}_forward_ms"] = median_ms(lambda: jax.block_until_ready(forward(q, k, v)))
        result[f"{name}_forward_backward_ms"] = median_ms(lambda: jax.block_until_ready(grads(q, k, v)))
    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)

    def sdpa_backward():
        (sdpa() ** 2).sum().backward()

    with torch.no_grad():
        result["torch_sdpa_forward_ms"] = median_ms(sdpa)
    result["torch_sdpa_forward_backward_ms"] = median_ms(sdpa_backward)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The train step on a device mesh of forced CPU devices: step time (median) and whether XLA had to
gather a whole sharded table ("involuntary full rematerialization"), for a random-weight model.

    python bench/mesh.py [--mesh 2x2x2] [--method full] [--vocab 32000] [--hidden 512] [--seq 256] [--batch 8]
    python bench/mesh.py --mesh 1x2x4x1 --seq 8192 ...   # data x fsdp x context x tensor: rows split over 4

Sets XLA_FLAGS=--xla_force_host_platform_device_count=8 itself. Prints one JSON line.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mesh", default="2x2x2", help="data x fsdp x tensor, or data x fsdp x context x tensor")
    parser.add_argument("--method", default="full", choices=("lora", "full"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from jaxtune import config, context, estimate, sharding
    from jaxtune.train.step import make_train_step

    sizes = list(map(int, args.mesh.split("x")))
    data, fsdp, cp, tensor = sizes if len(sizes) == 4 else (sizes[0], sizes[1], 1, sizes[2])
    arch = Path(tempfile.mkdtemp()) / "model"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4, "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64, "num_key_value_heads": max(1, args.hidden // 256),
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    cfg = config.base_config()
    cfg.model.path, cfg.method, cfg.data.seq_len = str(arch), args.method, args.seq
    cfg.train.micro_batch_size, cfg.lora.dropout, cfg.model.remat = args.batch, 0.0, "none"  # as the README figures
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.context, cfg.mesh.tensor = data, fsdp, cp, tensor
    mesh = sharding.config_mesh(cfg.mesh)
    run = estimate.abstract_run(cfg, context=cp)
    shardings = [sharding.state_shardings(s, mesh) for s in (run.trainable, run.frozen, run.opt_state)]
    def random(tree, shard, scale=0.02):  # weights: small random values; optimizer state: zeros
        def one(leaf, where):
            value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            host = (np.random.default_rng(0).normal(0, scale, value.shape) if scale and jnp.issubdtype(
                value.dtype, jnp.floating) else np.zeros(value.shape)).astype(value.dtype)
            array = jax.device_put(host, where)
            return leaf.replace(value=array) if isinstance(leaf, nnx.Variable) else array

        return jax.tree.map(one, tree, shard, is_leaf=lambda x: isinstance(x, nnx.Variable))
    trainable, frozen = random(run.trainable, shardings[0]), random(run.frozen, shardings[1])
    opt_state = random(run.opt_state, shardings[2], scale=0)
    rows = sharding.named_sharding(("batch", "length"), (args.batch, args.seq), mesh)
    tokens = np.random.default_rng(1).integers(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "weights": np.ones(tokens.shape, np.float32),
             "segment_ids": np.ones_like(tokens), "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32),
                                                                                tokens.shape).copy()}
    batch = {k: jax.device_put(v, rows) for k, v in context.lay_out(batch, cp).items()}  # zigzag order under cp
    replicated = NamedSharding(mesh, PartitionSpec())

    def in_mesh(*a):
        with sharding.use_mesh(mesh):
            return make_train_step(run.graphdef, run.tx, 256)(*a)

    step = jax.jit(in_mesh, donate_argnums=(0, 2), in_shardings=(*shardings[:3], {k: rows for k in batch},
                                                                  replicated, replicated))
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jnp.float32(tokens.size),
                                             jax.random.key(i))
        float(metrics["loss_sum"])
        times.append(time.perf_counter() - start)
    print(json.dumps({"mesh": args.mesh, "attention": run.model_cfg.attention, "method": args.method, "vocab": args.vocab, "hidden": args.hidden,
                      "seq": args.seq, "batch": args.batch, "compile_s": round(times[0], 2),
                      "step_s_median": round(statistics.median(times[1:]), 4),
                      "loss": float(metrics["loss_sum"]) / tokens.size}))


if __name__ == "__main__":
    main()

"""One command, one table: jaxtune's training speed and memory on this accelerator, beside
transformers + peft on the same device.

    python bench/device.py                 # Llama-3.2-1B and Llama-3-8B shapes, bf16, T=2048 (< 8 min on an H200)
    python bench/device.py --shapes tiny   # the same table for a tiny shape (a CPU check of the script)

Rows: LoRA r=16 all-linear and full fine-tuning of each shape with random weights, bf16, one packed
row of T tokens per step (several documents per row, segment ids), plus QLoRA (NF4 base) and
transformers + peft LoRA. Each row runs in its own subprocess (its own peak memory and an OOM that
only fails its row). Columns: tokens/s (median step), MFU = model FLOPs per token x tokens/s / peak,
against both the chip's datasheet bf16 peak and a measured bf16 matmul peak, and peak device memory
(`memory_stats()['peak_bytes_in_use']`, torch's `max_memory_allocated`), beside what the compiler said
before the step ran: XLA's own figure for the step on this device (arguments + outputs + temporaries -
donated) and the same step compiled for jaxtune's description of the card (`aot.CARDS`), which is what
`jaxtune compile --topology h100-1` reports on a machine without one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import model_flops_per_token  # noqa: E402 - bench/train.py's FLOP count, one definition

SHAPES = {  # HF config fields of the public models (random weights here)
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       tie_word_embeddings=False, max_position_embeddings=8192),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, rope_theta=10000.0, tie_word_embeddings=False,
                 max_position_embeddings=1024),
}
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12, "TPU v4": 275e12,
             "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}
ROWS = [("jaxtune", "lora"), ("jaxtune", "full"), ("jaxtune", "qlora"), ("peft", "lora")]


def packed_row(vocab: int, seq: int, batch: int, seed: int = 0) -> dict:
    """Rows of several documents each (lengths 64..seq/2), every token supervised."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    segments, positions = np.zeros_like(tokens), np.zeros_like(tokens)
    for b in range(batch):
        start, doc = 0, 1
        while start < seq:
            n = min(int(rng.integers(64, max(65, seq // 2))), seq - start)
            segments[b, start:start + n], positions[b, start:start + n] = doc, np.arange(n)
            start, doc = start + n, doc + 1
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "weights": np.ones(tokens.shape, np.float32),
            "segment_ids": segments, "positions": positions}


def run_jaxtune(shape: str, method: str, seq: int, batch: int, steps: int, remat: str, attention_name: str,
                card: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxtune import attention, lora, quant
    from jaxtune.models.hf import config_from_hf
    from jaxtune.models.llama import LINEAR_MODULES, Llama
    from jaxtune.train import optim
    from jaxtune.train.step import make_train_step

    hf = {"model_type": "llama", "rms_norm_eps": 1e-5, **SHAPES[shape]}
    backend, _ = attention.resolve(attention_name, seq, None)
    cfg = config_from_hf(hf, dtype="bfloat16", param_dtype="bfloat16", remat=remat, attention=backend)
    if method == "qlora":  # built on the host and quantized before it reaches the device (as loading does):
        with jax.default_device(jax.devices("cpu")[0]):  # the dense bf16 model would be the device's peak
            model = Llama(cfg, rngs=nnx.Rngs(0))
            quantize_in_place(model, quant.QuantOptions(LINEAR_MODULES))
        nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    else:
        model = Llama(cfg, rngs=nnx.Rngs(0))
    if method in ("lora", "qlora"):
        lora.add_lora(model, rank=16, alpha=32, dropout=0.0, targets="all-linear")
    graphdef, trainable, frozen = lora.split_trainable(model, method)
    tx = optim.optimizer(optax.constant_schedule(1e-5), weight_decay=0.0, max_grad_norm=1.0, b1=0.9, b2=0.999,
                         grad_accum_steps=1)
    opt_state = tx.init(trainable)
    step = jax.jit(make_train_step(graphdef, tx, 1024), donate_argnums=(0, 2))
    batch_arrays = {k: jnp.asarray(v) for k, v in packed_row(cfg.vocab_size, seq, batch).items()}
    tokens = jnp.float32(batch * seq)
    start = time.perf_counter()
    compiler, described, compiled = compiler_peaks(step, (trainable, frozen, opt_state, batch_arrays, tokens, None), card)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch_arrays, tokens, None)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_s": statistics.median(times[1:]), "compile_s": compile_s, "trainable": int(n_trainable),
            "peak_bytes": stats.get("peak_bytes_in_use"), "attention": backend, "compiler_bytes": compiler,
            "described_bytes": described, "loss": float(metrics["loss_sum"] / metrics["tokens"])}


def quantize_in_place(model, options):
    """NF4 kernels of random codes and scales for a randomly initialised model: the same arrays, layout
    and work per step as a quantized checkpoint, without quantizing 7B weights on the host first
    (numpy: ~4 s per 4096 x 14336 matrix)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxtune import quant
    from jaxtune.models.llama import NF4Kernel

    rng = np.random.default_rng(0)
    for name in options.modules:
        linear = getattr(model.layers, name)
        layers, d_in, d_out = linear.kernel.shape
        n = d_in * d_out
        blocks = n // options.blocksize
        nf4 = quant.NF4(rng.integers(0, 2**32, (layers, n // quant.WORD_NIBBLES), dtype=np.uint32),
                        rng.integers(0, 256, (layers, blocks), dtype=np.uint8), (d_out, d_in), options.blocksize,
                        rng.random((layers, -(-blocks // quant.NESTED_BLOCKSIZE)), dtype=np.float32) * 0.1,
                        np.full((layers,), 0.05, np.float32), layout="words")
        kernel = NF4Kernel(nf4, linear.kernel.axes)
        for _, var in nnx.to_flat_state(nnx.state(kernel)):
            var.set_value(jnp.asarray(var[...]))
        linear.kernel = kernel


def compiler_peaks(step, args, card: str | None) -> tuple:
    """(this device's compiler, XLA:GPU compiling for jaxtune's description of `card`): bytes of the
    step (arguments + outputs + temporaries - donated), and the compiled step. The second is what
    `jaxtune compile --topology h100-1` reports on a machine without the GPU."""
    import jax

    from jaxtune import aot

    compiled = step.lower(*args).compile()
    described = None
    if card:
        device = jax.sharding.SingleDeviceSharding(aot.target(card).devices[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), args)
        described = aot._peak(step.lower(*abstract).compile().memory_analysis())
    return aot._peak(compiled.memory_analysis()), described, compiled


def run_peft(shape: str, seq: int, batch: int, steps: int, remat: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, attn_implementation="sdpa")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    device = next(model.parameters()).device
    if remat != "none":
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    row = packed_row(config.vocab_size, seq, batch)
    tokens = torch.tensor(row["tokens"], device=device, dtype=torch.long)
    positions = torch.tensor(row["positions"], device=device, dtype=torch.long)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens, position_ids=positions).loss  # packing by position ids
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"step_s": statistics.median(times[1:]), "compile_s": times[0], "peak_bytes": peak, "attention": "sdpa",
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "loss": float(loss)}


def matmul_peak() -> tuple[str, float]:
    """(device kind, measured bf16 matmul FLOP/s): the best of a few 8192^2 (CPU: 1024^2) products."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    n = 8192 if device.platform != "cpu" else 1024
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return device.device_kind, 2 * n**3 / best


def datasheet_peak(kind: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16.items() if name.lower() in kind.lower()), None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="full", choices=["none", "dots", "full"])
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--rows", default=",".join(f"{s}:{m}" for s, m in ROWS))
    parser.add_argument("--timeout", type=int, default=240, help="seconds per row")
    parser.add_argument("--card", default="auto", help="also compile each jaxtune row for jaxtune's description of "
                        "this card (aot.CARDS, e.g. h100-1), as `jaxtune compile` does without the GPU; 'auto': "
                        "the card this is, 'none': skip")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, shape, method = args.child.split(":")
        result = (run_jaxtune(shape, method, args.seq, args.batch, args.steps, args.remat, args.attention,
                              None if args.card == "none" else args.card)
                  if side == "jaxtune" else run_peft(shape, args.seq, args.batch, args.steps, args.remat))
        print(json.dumps(result))
        return
    # this process only probes the matmul peak: without this JAX would hold 75% of the GPU's memory here
    # while each row's process needs it (every row then failed with RESOURCE_EXHAUSTED)
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    kind, measured = matmul_peak()
    child_env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    if args.card == "auto":
        from jaxtune import aot

        args.card = next((f"{key}-1" for key, card in aot.CARDS.items() if card.name == kind), "none")
    sheet = datasheet_peak(kind)
    print(f"device: {kind}; bf16 peak: datasheet {sheet / 1e12 if sheet else float('nan'):.0f} TFLOP/s, "
          f"measured matmul {measured / 1e12:.0f} TFLOP/s; T={args.seq}, batch {args.batch}, remat {args.remat}")
    header = (f"{'shape':<14}{'run':<18}{'attention':<10}{'tokens/s':>10}{'MFU sheet':>10}{'MFU meas.':>10}"
              f"{'peak GiB':>10}{'XLA GiB':>9}{'described':>10}{'compile s':>10}{'vs peft':>9}")
    print(header)
    table = []
    for shape in args.shapes.split(","):
        peft_tps = None
        results = {}
        for row in args.rows.split(","):
            side, method = row.split(":")
            cmd = [sys.executable, __file__, "--child", f"{side}:{shape}:{method}", "--seq", str(args.seq),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--remat", args.remat,
                   "--attention", args.attention, "--card", args.card]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=child_env)
                r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {
                    "error": (out.stderr.strip().splitlines() or ["failed"])[-1][:60]}
            except subprocess.TimeoutExpired:
                r = {"error": f"over {args.timeout} s"}
            results[(side, method)] = r
            print(json.dumps({"shape": shape, "row": row, **r}), flush=True)  # kept if a later row hangs
        peft = results.get(("peft", "lora"), {})
        if "step_s" in peft:
            peft_tps = args.batch * args.seq / peft["step_s"]
        for (side, method), r in results.items():
            name = f"{side} {method}"
            if "error" in r:
                print(f"{shape:<14}{name:<18}{'':<10}{'failed: ' + r['error']}")
                table.append({"shape": shape, "run": name, **r})
                continue
            tps = args.batch * args.seq / r["step_s"]
            flops = model_flops_per_token(SHAPES[shape], args.seq, r["trainable"])  # full: 6N, LoRA: 4N + 2N_lora
            mfu_sheet = flops * tps / sheet if sheet else None
            mfu_meas = flops * tps / measured
            peak = r["peak_bytes"] / 2**30 if r.get("peak_bytes") else float("nan")
            gib = lambda key: r[key] / 2**30 if r.get(key) else float("nan")  # noqa: E731
            ratio = tps / peft_tps if peft_tps and side == "jaxtune" and method == "lora" else None
            print(f"{shape:<14}{name:<18}{r['attention']:<10}{tps:>10.0f}"
                  f"{(f'{mfu_sheet:.1%}' if mfu_sheet else '-'):>10}{mfu_meas:>10.1%}{peak:>10.2f}"
                  f"{gib('compiler_bytes'):>9.2f}{gib('described_bytes'):>10.2f}"
                  f"{r['compile_s']:>10.0f}{(f'{ratio:.2f}x' if ratio else ''):>9}")
            table.append({"shape": shape, "run": name, "tokens_per_s": round(tps), "mfu_datasheet": mfu_sheet,
                          "mfu_measured": mfu_meas, "peak_gib": peak, **r})
    print(json.dumps({"device": kind, "datasheet_bf16": sheet, "measured_bf16": measured, "rows": table}))


if __name__ == "__main__":
    main()

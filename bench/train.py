"""LoRA training throughput, MFU and peak memory: jaxtune beside transformers + peft, same model, same
LoRA (r=16, alpha=32, all linear layers), same data shape, in one command.

    python bench/train.py [--model DIR] [--batch 4] [--seq 512] [--steps 5] [--dtype float32] [--method qlora]
                          [--remat auto|none|dots|full] [--attention auto|xla|blocked|...]

Each side also times its forward pass alone (the loss, no gradients) so that the backward's share
of the step shows: jaxtune's eval step, peft's model under torch.no_grad().

Each side runs in its own subprocess so that peak memory (ru_maxrss, i.e. host RSS on CPU; device
peak bytes on GPU) is its own. MFU = model FLOPs per token x tokens/s / peak FLOP/s, where the peak
is measured by a matmul probe on the same device, and model FLOPs per token = 6 x trainable-path
parameters... specifically: 2 x N forward + 2 x N backward (activation grads) + 2 x N_trainable
(weight grads) + attention (12 x layers x seq x d_model / 2, causal). Prints one JSON line.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def model_flops_per_token(cfg: dict, seq: int, trainable: int) -> float:
    d, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or d // heads
    f = cfg["intermediate_size"]
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * f  # q,o + k,v + gate,up,down
    dense = layers * per_layer + d * vocab  # + the output projection
    attention = 2 * 2 * layers * heads * hd * seq / 2  # QK^T and PV, causal half
    forward = 2 * dense + attention
    return forward * 2 + 2 * trainable + attention  # fwd + activation grads (~= fwd) + weight grads of LoRA


def matmul_peak_flops(dtype: str) -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def run_jaxtune(args):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxtune import attention, estimate, from_pretrained, lora
    from jaxtune.models.hf import config_from_hf, read_hf_config
    from jaxtune.train import optim
    from jaxtune.train.step import make_eval_step, make_train_step

    from jaxtune.models.llama import LINEAR_MODULES
    from jaxtune.quant import QuantOptions

    quantize = QuantOptions(LINEAR_MODULES) if args.method == "qlora" else None
    window = config_from_hf(read_hf_config(args.model)).sliding_window
    backend, _ = attention.resolve(args.attention, args.seq, window)
    remat = args.remat
    if remat == "auto":  # `jaxtune train`'s choice on CPU; on an accelerator 'none' (pass --remat for a model that needs it)
        remat = estimate.CPU_REMAT if jax.default_backend() == "cpu" else "none"
    model = from_pretrained(args.model, dtype=args.dtype, param_dtype=args.dtype, remat=remat, attention=backend,
                            quantize=quantize)
    lora.add_lora(model, rank=16, alpha=32, dropout=args.dropout, targets="all-linear")
    graphdef, trainable, frozen = lora.split_trainable(model, args.method)
    tx = optim.optimizer(optax.constant_schedule(1e-4), weight_decay=0.0, max_grad_norm=1.0, b1=0.9, b2=0.999,
                         grad_accum_steps=1)
    opt_state = tx.init(trainable)
    step = jax.jit(make_train_step(graphdef, tx, args.loss_chunk), donate_argnums=(0, 2))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 32000, (args.batch, args.seq)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "weights": np.ones(tokens.shape, np.float32),
             "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(args.seq, dtype=np.int32), (args.batch, 1))}
    key = jax.random.key(0) if args.dropout else None
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jnp.float32(tokens.size), key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    peak = _peak_bytes(jax)  # before the forward-only timing below adds its own compile
    forward = jax.jit(make_eval_step(graphdef, args.loss_chunk))
    forward_times = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        jax.block_until_ready(forward(trainable, frozen, batch))
        forward_times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:]), "compile_and_first_step_s": times[0], "trainable": int(n_trainable),
            "loss": float(metrics["loss_sum"] / metrics["tokens"]), "peak": peak, "attention": backend, "remat": remat,
            "forward_s": statistics.median(forward_times[1:]), "peak_flops": matmul_peak_flops(args.dtype)}


def run_peft(args):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    if args.remat not in ("none", "auto"):  # auto: each side's default (peft's keeps every activation)
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.dropout, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.tensor(np.random.RandomState(0).randint(0, 32000, (args.batch, args.seq)), device=device)
    times = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    forward_times = []
    with torch.no_grad():
        for _ in range(args.steps + 1):
            t = time.perf_counter()
            model(input_ids=tokens, labels=tokens)
            if device == "cuda":
                torch.cuda.synchronize()
            forward_times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times[1:]), "loss": float(loss), "peak": peak,
            "forward_s": statistics.median(forward_times[1:]),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _peak_bytes(jax):
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="auto", choices=["auto", "none", "dots", "full"],
                        help="jaxtune's model.remat; peft recomputes (gradient checkpointing) unless none/auto")
    parser.add_argument("--attention", default="auto", help="jaxtune's model.attention (peft: transformers' sdpa)")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--method", default="lora", choices=["lora", "qlora"],
                        help="jaxtune's side: LoRA on the dense base, or on an NF4 base (peft's side stays LoRA)")
    parser.add_argument("--loss-chunk", type=int, default=256)
    parser.add_argument("--side", choices=["jaxtune", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["jaxtune", "peft"], help="run one side only")
    args = parser.parse_args()
    if args.model is None:
        from jaxtune import assets

        args.model = str(assets.smollm2())
    if args.side:  # a child: run one side and print its JSON
        print(json.dumps(run_jaxtune(args) if args.side == "jaxtune" else run_peft(args)))
        return
    cfg = json.load(open(f"{args.model}/config.json"))
    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "remat": args.remat,
              "attention": args.attention,
              "lora": "r=16 alpha=32 all-linear", "jaxtune_method": args.method, "dropout": args.dropout, "steps_timed": args.steps}
    argv = [a for i, a in enumerate(sys.argv[1:]) if not a.startswith("--only") and sys.argv[i] != "--only"]
    for side in ["jaxtune", "peft"] if not args.only else [args.only]:
        out = subprocess.run([sys.executable, __file__, *argv, "--model", args.model, "--side", side],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        tokens_per_s = args.batch * args.seq / r["step_s"]
        result[f"{side}_tokens_per_s"] = round(tokens_per_s, 1)
        result[f"{side}_peak_bytes"] = r["peak"]
        result[f"{side}_trainable_params"] = r["trainable"]
        result[f"{side}_step_s"] = round(r["step_s"], 3)
        result[f"{side}_backward_over_forward"] = round((r["step_s"] - r["forward_s"]) / r["forward_s"], 2)
        if side == "jaxtune":
            flops = model_flops_per_token(cfg, args.seq, r["trainable"])
            result.update({"model_flops_per_token": flops, "matmul_peak_flops": round(r["peak_flops"]),
                           "jaxtune_mfu": round(flops * tokens_per_s / r["peak_flops"], 4),
                           "jaxtune_compile_and_first_step_s": round(r["compile_and_first_step_s"], 1),
                           "jaxtune_attention": r["attention"], "jaxtune_remat": r["remat"]})
    if not args.only:
        result["speed_ratio_jaxtune_over_peft"] = round(result["jaxtune_tokens_per_s"] / result["peft_tokens_per_s"], 3)
        result["memory_ratio_jaxtune_over_peft"] = round(result["jaxtune_peak_bytes"] / result["peft_peak_bytes"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

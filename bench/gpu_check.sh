#!/usr/bin/env bash
# The GPU figures in one command (docs/benchmarks.md): the attention kernels against the float32
# reference and their speed, then the training table (tokens/s, MFU, peak memory, the compiler's own
# memory figure and the one for jaxtune's description of the card) for Llama-3.2-1B and Llama-3-8B shapes.
# Logs go to $OUT (default /tmp/gpu_check). About 9 minutes on one H100; each part is bounded by `timeout`
# and prints each row as it ends, so a slow part costs its rows, not the rest.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"
timeout 150 python3 bench/gpu_attention.py --seq 2048,8192 2>&1 | grep -v '^WARNING' | tee "$OUT/attention.log"
timeout 200 python3 bench/device.py --shapes llama-3.2-1b --rows jaxtune:lora,jaxtune:full,jaxtune:qlora,peft:lora \
    --steps 3 --timeout 80 2>&1 | tee "$OUT/device_1b.log"
timeout 230 python3 bench/device.py --shapes llama-3-8b --rows jaxtune:lora,jaxtune:qlora,peft:lora \
    --steps 3 --timeout 110 2>&1 | tee "$OUT/device_8b.log"

"""LoRA r=16 (all linear modules) of Llama-3.1-8B on 131,072-token rows, on one TPU v4-8 (4 chips, 32 GiB
each): every row's tokens are split over the 4 chips by context parallelism (mesh.context=4; each chip
holds 32,768 of them and gathers the keys and values of the rest), the weights are sharded over the same
4 chips, full remat, one row per optimizer step.

    jaxtune estimate configs/llama3_8b_lora_128k_v4_8.py --devices=4
    jaxtune compile configs/llama3_8b_lora_128k_v4_8.py --topology v4-8     # the TPU compiler's own figure
    tpu_scripts/launch.sh llama-128k --zone us-central2-b --run r1 -- \\
        jaxtune train configs/llama3_8b_lora_128k_v4_8.py --config.data.train=/home/me/data/long.jsonl

When context parallelism pays and how to choose mesh.context: docs/long-context.md.
"""
from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.workdir = "gs://MY-BUCKET/runs/llama3_8b_lora_128k"  # yours: --config.workdir=gs://…
    config.method = "lora"
    config.model.path = "meta-llama/Llama-3.1-8B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.model.remat = "full"
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.targets = "all-linear"
    config.data.train = "long.jsonl"
    config.data.val_fraction = 0.01
    config.data.seq_len = 131072
    config.data.overlong = "split"  # a document longer than a row continues in the next one
    config.data.chat_template = "chatml"
    config.train.micro_batch_size = 1
    config.train.grad_accum_steps = 1
    config.train.lr = "2e-4"
    config.train.warmup_steps = 10
    config.eval.every_steps = 50
    config.checkpoint.every_steps = 50
    config.log.every_steps = 1
    config.mesh.data = 1
    config.mesh.fsdp = 1
    config.mesh.context = 4
    config.mesh.tensor = 1
    return config

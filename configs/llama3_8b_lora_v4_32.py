"""LoRA r=16 (all linear modules) of Llama-3-8B on a TPU v4-32 (4 hosts x 4 chips, 32 GiB each):
bfloat16 weights sharded over fsdp=16, full remat, one 4,096-token row per chip, 4 micro-steps per update.

    jaxtune estimate configs/llama3_8b_lora_v4_32.py --devices=16      # 6.4 GiB of 32 per chip
    tpu_scripts/babysit.sh llama-pod --type v4-32 --zone us-central2-b --spot --run r1 -- \\
        jaxtune train configs/llama3_8b_lora_v4_32.py --config.workdir=gs://MY-BUCKET/runs/r1 \
        --config.data.train=/home/me/data/chats.jsonl

Every host runs the same command; `jaxtune train` finds the pod by itself. The workdir must be one
every host reaches — a bucket (gs://, as above) or a shared mount; the data file must be on each host
(docs/tpu.md shows how to stage it).
"""
from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.workdir = "gs://MY-BUCKET/runs/llama3_8b_lora"  # yours: --config.workdir=gs://…
    config.method = "lora"
    config.model.path = "meta-llama/Meta-Llama-3-8B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.model.remat = "full"
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.targets = "all-linear"
    config.data.train = "train.jsonl"
    config.data.val_fraction = 0.01
    config.data.seq_len = 4096
    config.data.chat_template = "chatml"
    config.train.micro_batch_size = 16
    config.train.grad_accum_steps = 4
    config.train.epochs = 2.0
    config.train.lr = "auto"
    config.train.warmup_steps = 20
    config.eval.every_steps = 100
    config.checkpoint.every_steps = 100
    config.log.every_steps = 5  # also how often the hosts agree on a stop (preemption notice)
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    return config

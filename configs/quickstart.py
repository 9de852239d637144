"""LoRA on the real SmolLM2-135M-Instruct with the real chitchat conversations, on CPU in minutes.

    jaxtune train configs/quickstart.py        # `make demo` builds the offline assets first

The paths point at the offline assets (`jaxtune assets smollm2 chitchat`, cached in $JAXTUNE_CACHE).
"""
from jaxtune.cache import cache_dir
from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.workdir = "runs/quickstart"
    config.model.path = str(cache_dir() / "smollm2-135m-instruct")
    config.data.train = str(cache_dir() / "chitchat" / "train.jsonl")
    config.data.val = str(cache_dir() / "chitchat" / "val.jsonl")
    config.data.seq_len = 256
    config.data.overlong = "split"
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.targets = "all-linear"
    config.lora.dropout = 0.0  # as unsloth defaults: dropout costs a random mask per projection on CPU
    config.train.micro_batch_size = 4
    config.train.grad_accum_steps = 1
    config.train.max_steps = 30  # ~30k tokens: what 2 CPU cores train in about six minutes
    config.train.lr = "2e-3"
    config.train.warmup_steps = 3
    config.train.schedule = "cosine"
    config.eval.every_steps = 10
    config.eval.max_batches = 4
    config.eval.prompt = "hey, how was your weekend?"
    config.log.every_steps = 2
    config.checkpoint.every_steps = 10
    return config

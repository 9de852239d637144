"""LoRA on Mistral-7B-v0.1 (sliding-window attention), bfloat16, 4,096-token rows, 8 per micro-step, on a
TPU v4-8 or v5e-8 (remat 'auto' picks 'full' there: `jaxtune compile configs/mistral_7b_lora.py --topology v4-8`;
with 'dots' it needed 47 GiB per chip) or one 80 GB GPU; on a smaller GPU lower train.micro_batch_size
(`jaxtune estimate` shows what fits).

    jaxtune train configs/mistral_7b_lora.py --config.data.train=my_chats.jsonl
"""
from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.workdir = "runs/mistral_7b_lora"
    config.model.path = "mistralai/Mistral-7B-v0.1"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.model.remat = "auto"  # the least recomputation that fits the device
    config.data.train = "train.jsonl"
    config.data.val_fraction = 0.02
    config.data.seq_len = 4096
    config.data.chat_template = "chatml"
    config.lora.rank = 16
    config.lora.alpha = 16.0
    config.lora.targets = "all-linear"
    config.train.micro_batch_size = 8
    config.train.grad_accum_steps = 4
    config.train.epochs = 2.0
    config.train.lr = "auto"
    config.train.base_lr = 5e-5  # the guide's Mistral figure
    config.train.pretrained_batch_tokens = 4_000_000
    config.train.warmup_steps = 30
    config.eval.every_steps = 100
    config.eval.early_stopping_patience = 3
    return config

"""LoRA on Llama-2-7B (one GPU with >= 24 GB in bfloat16, or a TPU v4-8/v5e-8 with fsdp over its chips).

    jaxtune train configs/llama2_7b_lora.py --config.data.train=my_chats.jsonl
"""
from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.workdir = "runs/llama2_7b_lora"
    config.model.path = "meta-llama/Llama-2-7b-hf"  # or a local HF directory
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.model.remat = "dots"
    config.data.train = "train.jsonl"
    config.data.val_fraction = 0.02
    config.data.seq_len = 2048
    config.data.chat_template = "chatml"  # the base model has no chat template
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.train.micro_batch_size = 8
    config.train.grad_accum_steps = 4
    config.train.epochs = 3.0
    config.train.lr = "auto"
    config.train.base_lr = 3e-4  # Llama-2 pretraining peak lr
    config.train.pretrained_batch_tokens = 4_000_000  # Llama-2: 4M-token batches
    config.train.warmup_steps = 30
    config.eval.every_steps = 100
    config.eval.early_stopping_patience = 3
    return config

"""QLoRA of Llama-3-8B on one 16 GB GPU (Colab T4/L4) or a single TPU chip: the frozen base in NF4
with double quantization, LoRA r=16 on every linear module, bfloat16 compute, full remat, 2,048-token
rows one at a time with 16 accumulated per update.

    jaxtune estimate configs/llama3_8b_qlora.py            # the memory it needs, before any download
    jaxtune train configs/llama3_8b_qlora.py --config.data.train=my_chats.jsonl

`model.path` may also be a bitsandbytes 4-bit directory (e.g. unsloth/llama-3-8b-bnb-4bit, or one made
by `jaxtune quantize`): its NF4 arrays are used as they are.
"""
from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.workdir = "runs/llama3_8b_qlora"
    config.method = "qlora"
    config.model.path = "meta-llama/Meta-Llama-3-8B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"  # embeddings, norms and lm_head (the dense rest of the base)
    config.model.remat = "full"
    config.quant.block_size = 64
    config.quant.double_quant = True
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.targets = "all-linear"
    config.data.train = "train.jsonl"
    config.data.val_fraction = 0.01
    config.data.seq_len = 2048
    config.data.chat_template = "chatml"
    config.train.micro_batch_size = 1
    config.train.grad_accum_steps = 16
    config.train.epochs = 1.0
    config.train.lr = "2e-4"
    config.train.warmup_steps = 20
    config.eval.every_steps = 200
    config.mesh.data = 1
    config.mesh.fsdp = 1
    config.mesh.tensor = 1
    return config

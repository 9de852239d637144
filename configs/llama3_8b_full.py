"""Full fine-tune of Llama-3-8B on a TPU slice (e.g. v5p-32 / v4-32): parameters and optimizer state
sharded over fsdp, bfloat16 weights, full remat.

    jaxtune train configs/llama3_8b_full.py --config.data.train=my_chats.jsonl   # on every worker of the slice
"""
from jaxtune.config import base_config


def get_config():
    config = base_config()
    config.workdir = "runs/llama3_8b_full"  # on a pod: a disk every worker shares (NFS/Filestore)
    config.method = "full"
    config.model.path = "meta-llama/Meta-Llama-3-8B"
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    config.model.remat = "full"
    config.data.train = "train.jsonl"
    config.data.val_fraction = 0.01
    config.data.seq_len = 8192
    config.data.chat_template = "chatml"
    config.train.micro_batch_size = 32
    config.train.grad_accum_steps = 1
    config.train.epochs = 2.0
    config.train.lr = "1e-5"
    config.train.weight_decay = 0.1
    config.train.warmup_steps = 50
    config.eval.every_steps = 200
    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    return config

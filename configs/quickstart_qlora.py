"""The quickstart (LoRA r=16 on SmolLM2-135M-Instruct, chitchat) on a frozen NF4 base: QLoRA.

    jaxtune train configs/quickstart_qlora.py

Every linear kernel is NF4 with double quantization (bitsandbytes' format); embeddings, norms and the
tied lm_head stay dense; the LoRA factors train in float32 exactly as in configs/quickstart.py.
"""
import runpy
from pathlib import Path


def get_config():
    config = runpy.run_path(str(Path(__file__).with_name("quickstart.py")))["get_config"]()
    config.workdir = "runs/quickstart_qlora"
    config.method = "qlora"
    config.quant.block_size = 64
    config.quant.double_quant = True
    return config

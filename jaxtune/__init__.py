"""jaxtune: fine-tune Llama-family models with JAX on TPU, GPU and CPU."""
from jaxtune.errors import JaxtuneError
from jaxtune.models.hf import from_pretrained, save_pretrained
from jaxtune.models.llama import Llama, ModelConfig

__all__ = ["JaxtuneError", "Llama", "ModelConfig", "from_pretrained", "save_pretrained"]
__version__ = "0.1.0"

"""jaxtune: fine-tune Llama-family models with JAX on TPU, GPU and CPU."""
from jaxtune.errors import JaxtuneError

__all__ = ["JaxtuneError", "Llama", "ModelConfig", "from_pretrained", "save_pretrained"]
__version__ = "0.1.0"
_LAZY = {"Llama": "jaxtune.models.llama", "ModelConfig": "jaxtune.models.llama",
         "from_pretrained": "jaxtune.models.hf", "save_pretrained": "jaxtune.models.hf"}


def __getattr__(name: str):
    """The model API on first use: `import jaxtune` (and a jax-free submodule such as a tokenizing process)
    does not import JAX."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxtune' has no attribute {name!r}")

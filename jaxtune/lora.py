"""LoRA as PEFT defines it: y = W x + scale * B(A(dropout(x))), scale = alpha/r (rsLoRA: alpha/sqrt(r)),
A kaiming-uniform(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B zeros; targets named like HF modules.

What trains is chosen with NNX filters: LoRA factors (plus `modules_to_save`, trained in full) for
method "lora", every parameter for "full". The rest is the frozen state: no gradients, no optimizer state.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import Linear, Llama

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAVABLE_MODULES = {"embed_tokens": "embed", "lm_head": "lm_head"}  # HF name -> our parameter


def resolve_targets(spec: str) -> list[str]:
    """'all-linear', a comma list of HF module names, or 're:REGEX' matched against them."""
    spec = spec.strip()
    if spec in ("all-linear", "all"):
        return list(LINEAR_MODULES)
    if spec.startswith("re:"):
        names = [m for m in LINEAR_MODULES if re.search(spec[3:], m)]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [n for n in names if n not in LINEAR_MODULES]
        if unknown:
            raise JaxtuneError(f"lora.targets: unknown module(s) {unknown}; use names from {list(LINEAR_MODULES)}, "
                               "'all-linear', or 're:REGEX'")
    if not names:
        raise JaxtuneError(f"lora.targets={spec!r} selects no module of {list(LINEAR_MODULES)}")
    return names


def add_lora(model: Llama, *, rank: int, alpha: float, dropout: float = 0.0, targets="all-linear",
             rslora: bool = False, seed: int = 0) -> Llama:
    """Attach LoRA factors to the target projections of every layer (in place; returns the model)."""
    if rank <= 0:
        raise JaxtuneError(f"lora.rank must be positive, got {rank}")
    names = resolve_targets(targets) if isinstance(targets, str) else list(targets)
    key = jax.random.key(seed)
    for i, name in enumerate(names):
        linear: Linear = getattr(model.layers, name)
        layers, d_in, d_out = linear.kernel.shape
        dtype = linear.kernel[...].dtype if jnp.issubdtype(linear.kernel[...].dtype, jnp.floating) else jnp.float32
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (layers, d_in, rank), jnp.float32, -bound, bound)
        in_axis, out_axis = linear.kernel.axes[1], linear.kernel.axes[2]
        linear.lora_a = nnx.LoRAParam(a.astype(dtype), axes=("layers", in_axis, "lora_rank"))
        linear.lora_b = nnx.LoRAParam(jnp.zeros((layers, rank, d_out), dtype), axes=("layers", "lora_rank", out_axis))
        linear.lora_scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        linear.lora_dropout = float(dropout)
    return model


def trainable_filter(method: str, modules_to_save: str = "", *, tied: bool = False):
    """NNX filter of what trains: 'full' = every Param; 'lora' = LoRA factors + modules_to_save."""
    if method == "full":
        return nnx.Param
    if method != "lora":
        raise JaxtuneError(f"method must be 'lora' or 'full', got {method!r}")
    saved = []
    for name in [s.strip() for s in modules_to_save.split(",") if s.strip()]:
        if name not in SAVABLE_MODULES:
            raise JaxtuneError(f"lora.modules_to_save: {name!r} is not one of {sorted(SAVABLE_MODULES)}")
        ours = "embed" if tied else SAVABLE_MODULES[name]  # tied: lm_head is the embedding
        saved.append(nnx.All(nnx.Param, nnx.PathContains(ours)))
    return nnx.Any(nnx.LoRAParam, *saved)


def split_trainable(model: Llama, method: str, modules_to_save: str = ""):
    """(graphdef, trainable state, frozen state) for the train step."""
    return nnx.split(model, trainable_filter(method, modules_to_save, tied=model.cfg.tie_word_embeddings), ...)

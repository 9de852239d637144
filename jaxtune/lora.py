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


# --- PEFT adapter directories and merging -----------------------------------------------------------

PEFT_PREFIX = "base_model.model."
_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_SAVED_HF_NAMES = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


def lora_modules(model: Llama) -> dict[str, Linear]:
    return {name: getattr(model.layers, name) for name in LINEAR_MODULES if getattr(model.layers, name).lora_a is not None}


def adapter_tensors(model: Llama, modules_to_save: str = "") -> dict:
    """PEFT's adapter_model.safetensors content: lora_A [r, in], lora_B [out, r] per layer and module,
    plus modules_to_save weights under their HF names."""
    import numpy as np

    out = {}
    for name, linear in lora_modules(model).items():
        a, b = np.asarray(jax.device_get(linear.lora_a[...])), np.asarray(jax.device_get(linear.lora_b[...]))
        for i in range(a.shape[0]):
            stem = f"{PEFT_PREFIX}model.layers.{i}.{_MODULE_PARENT[name]}.{name}"
            out[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    saved = [s.strip() for s in modules_to_save.split(",") if s.strip()]
    if model.cfg.tie_word_embeddings and saved:
        saved = list(SAVABLE_MODULES)  # one tied matrix: peft (ensure_weight_tying) stores it under both names
    for hf_name in saved:
        ours = "embed" if model.cfg.tie_word_embeddings else SAVABLE_MODULES[hf_name]
        weight = np.asarray(jax.device_get(getattr(model, ours)[...]))
        out[PEFT_PREFIX + _SAVED_HF_NAMES[SAVABLE_MODULES[hf_name]]] = weight if ours == "embed" else weight.T
    return out


def adapter_config(model: Llama, *, alpha: float, dropout: float, rslora: bool, modules_to_save: str,
                   base_model: str) -> dict:
    modules = lora_modules(model)
    rank = next(iter(modules.values())).lora_a.shape[-1]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": alpha,
            "lora_dropout": dropout, "target_modules": sorted(modules), "use_rslora": rslora, "bias": "none",
            "modules_to_save": [s.strip() for s in modules_to_save.split(",") if s.strip()] or None,
            "base_model_name_or_path": base_model, "fan_in_fan_out": False, "init_lora_weights": True,
            "inference_mode": True,
            # tied input/output embeddings trained as one matrix: peft must keep lm_head tied to the copy
            "ensure_weight_tying": bool(model.cfg.tie_word_embeddings and modules_to_save.strip())}


def load_peft_adapter(model: Llama, adapter_dir) -> dict:
    """Attach a PEFT LoRA adapter (made by peft, axolotl, unsloth or jaxtune) to `model` in place.
    Returns its adapter_config. Shapes and module names are checked against the base model."""
    import json
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise JaxtuneError(f"lora.init_from: {f} is missing; point it at a PEFT adapter directory")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise JaxtuneError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters can be loaded")
    tensors = load_file(weights_file)
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in tensors.items()}
    targets = cfg["target_modules"]
    targets = resolve_targets(targets if isinstance(targets, str) else ",".join(targets))
    add_lora(model, rank=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0), targets=targets,
             rslora=cfg.get("use_rslora", False))
    layers = model.cfg.num_layers
    for name in targets:
        linear: Linear = getattr(model.layers, name)
        a_stack, b_stack = [], []
        for i in range(layers):
            stem = f"{PEFT_PREFIX}model.layers.{i}.{_MODULE_PARENT[name]}.{name}"
            for suffix in ("lora_A", "lora_B"):
                if f"{stem}.{suffix}.weight" not in tensors:
                    raise JaxtuneError(f"{weights_file}: {stem}.{suffix}.weight is missing (adapter_config names "
                                       f"{name} as a target)")
            a, b = tensors[f"{stem}.lora_A.weight"].T, tensors[f"{stem}.lora_B.weight"].T
            want_a, want_b = linear.lora_a.shape[1:], linear.lora_b.shape[1:]
            if a.shape != want_a or b.shape != want_b:
                raise JaxtuneError(f"{weights_file}: {stem} has lora_A {list(a.T.shape)} / lora_B {list(b.T.shape)}, "
                                   f"the base model needs {list(want_a[::-1])} / {list(want_b[::-1])}: the adapter was "
                                   "trained on a different base model")
            a_stack.append(a)
            b_stack.append(b)
        dtype = linear.lora_a[...].dtype
        linear.lora_a[...] = jnp.asarray(np.stack(a_stack), dtype)
        linear.lora_b[...] = jnp.asarray(np.stack(b_stack), dtype)
    for saved in cfg.get("modules_to_save") or []:
        key = PEFT_PREFIX + _SAVED_HF_NAMES[SAVABLE_MODULES[saved]]
        if key in tensors:
            ours = "embed" if model.cfg.tie_word_embeddings else SAVABLE_MODULES[saved]
            value = tensors[key] if ours == "embed" else tensors[key].T
            var = getattr(model, ours)
            if value.shape != var.shape:
                raise JaxtuneError(f"{weights_file}: {key} has shape {list(value.shape)}, the base needs {list(var.shape)}")
            var[...] = jnp.asarray(value, var[...].dtype)
    return cfg


def merge_lora(model: Llama, dtype=None) -> Llama:
    """Fold every LoRA into its kernel: W + scale * A @ B computed in float32, cast to `dtype` (default:
    the kernel's); the factors are removed. In place; returns the model."""
    for linear in lora_modules(model).values():
        w = linear.kernel[...].astype(jnp.float32)
        delta = jnp.einsum("lir,lro->lio", linear.lora_a[...].astype(jnp.float32), linear.lora_b[...].astype(jnp.float32))
        linear.kernel.set_value((w + linear.lora_scale * delta).astype(dtype or linear.kernel[...].dtype))
        linear.lora_a, linear.lora_b = nnx.data(None), nnx.data(None)
    return model


def attach_from_config(model: Llama, cfg: dict) -> dict | None:
    """LoRA as the run configures it: from `lora.init_from` (a PEFT adapter, whose r/alpha/targets
    win) or fresh. Returns the effective {alpha, dropout, rslora}."""
    if cfg["method"] != "lora":
        return None
    c = cfg["lora"]
    if c.get("init_from"):
        adapter = load_peft_adapter(model, c["init_from"])
        return {"alpha": adapter["lora_alpha"], "dropout": adapter.get("lora_dropout", 0.0),
                "rslora": adapter.get("use_rslora", False)}
    add_lora(model, rank=c["rank"], alpha=c["alpha"], dropout=c["dropout"], targets=c["targets"],
                  rslora=c["rslora"], seed=cfg["seed"])
    return {"alpha": c["alpha"], "dropout": c["dropout"], "rslora": c["rslora"]}

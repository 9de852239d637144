"""LoRA as PEFT defines it: y = W x + scale * B(A(dropout(x))), scale = alpha/r (rsLoRA: alpha/sqrt(r)),
A kaiming-uniform(a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)), B zeros; targets named like HF modules.

What trains is chosen with NNX filters: LoRA factors (plus `modules_to_save`, trained in full) for
method "lora", every parameter for "full". The rest is the frozen state: no gradients, no optimizer state.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from jaxtune import quant
from jaxtune.config import split_list
from jaxtune.errors import JaxtuneError
from jaxtune.models.hf import bnb_4bit_options, hf_module, hf_name, needs_qlora
from jaxtune.models.llama import LINEAR_MODULES, Linear, Llama, NF4Kernel

# modules_to_save: HF module name -> our parameter ({"embed_tokens": "embed", "lm_head": "lm_head"})
SAVABLE_MODULES = {hf_module((ours,)).rsplit(".", 1)[-1]: ours for ours in ("embed", "lm_head")}
PEFT_PREFIX = "base_model.model."

LORA_METHODS = ("lora", "qlora")  # the methods that train LoRA factors on a frozen base


def resolve_targets(spec: str) -> list[str]:
    """'all-linear', a comma list of HF module names, or 're:REGEX' matched against them."""
    spec = spec.strip()
    if spec in ("all-linear", "all"):
        return list(LINEAR_MODULES)
    if spec.startswith("re:"):
        names = [m for m in LINEAR_MODULES if re.search(spec[3:], m)]
    else:
        names = split_list(spec)
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
        dtype = linear.kernel.dtype  # an NF4 kernel's factors train in float32
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (layers, d_in, rank), jnp.float32, -bound, bound)
        in_axis, out_axis = linear.kernel.axes[1], linear.kernel.axes[2]
        linear.lora_a = nnx.LoRAParam(a.astype(dtype), axes=("layers", in_axis, "lora_rank"))
        linear.lora_b = nnx.LoRAParam(jnp.zeros((layers, rank, d_out), dtype), axes=("layers", "lora_rank", out_axis))
        linear.lora_scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        linear.lora_dropout = float(dropout)
    return model


def saved_param(hf_module_name: str, *, tied: bool) -> str:
    """Our parameter a `modules_to_save` entry trains (tied embeddings: lm_head is the embedding)."""
    return "embed" if tied else SAVABLE_MODULES[hf_module_name]


def trainable_filter(method: str, modules_to_save: str = "", *, tied: bool = False):
    """NNX filter of what trains: 'full' = every Param; 'lora' and 'qlora' (whose NF4 base is no Param
    anyway) = LoRA factors + modules_to_save."""
    if method == "full":
        return nnx.Param
    if method not in LORA_METHODS:
        raise JaxtuneError(f"method must be 'lora', 'qlora' or 'full', got {method!r}")
    saved = []
    for name in split_list(modules_to_save):
        if name not in SAVABLE_MODULES:
            raise JaxtuneError(f"lora.modules_to_save: {name!r} is not one of {sorted(SAVABLE_MODULES)}")
        saved.append(nnx.All(nnx.Param, nnx.PathContains(saved_param(name, tied=tied))))
    return nnx.Any(nnx.LoRAParam, *saved)


def quant_options(cfg, hf: dict, model_dir=None) -> tuple[quant.QuantOptions | None, str]:
    """The frozen base's NF4 as the run `cfg` has it, and a line for the run log when the checkpoint
    decides. `method = "qlora"` on a dense base quantizes every linear module's kernel but
    quant.dense_modules; a bitsandbytes 4-bit base is trained as stored (its block size, double
    quantization and 4-bit modules: re-quantizing would change the model), and the line names each
    quant.* key that says otherwise. A dense method on a 4-bit base is refused.
    `hf`: the base's config.json; `model_dir`: its local directory, whose records give the exact
    settings (without it, config.json's)."""
    stored = bnb_4bit_options(hf, model_dir)
    if cfg["method"] != "qlora":
        if stored:
            raise needs_qlora(model_dir or cfg["model"]["path"], stored)
        return None, ""
    q = cfg["quant"]
    dense = split_list(q["dense_modules"])
    asked = quant.QuantOptions(tuple(m for m in LINEAR_MODULES if m not in dense), q["block_size"], q["double_quant"])
    if stored is None:
        return asked, ""
    stored_dense = [m for m in LINEAR_MODULES if m not in stored.modules]
    differ = [f"{key}={mine!r} (the checkpoint's: {theirs!r})" for key, mine, theirs, same in (
        ("quant.block_size", asked.blocksize, stored.blocksize, asked.blocksize == stored.blocksize),
        ("quant.double_quant", asked.double_quant, stored.double_quant, asked.double_quant == stored.double_quant),
        ("quant.dense_modules", q["dense_modules"], ",".join(stored_dense), set(dense) == set(stored_dense)))
        if not same]
    note = f"quant: the base is already NF4 ({describe_quant(stored)}); it trains as stored"
    if differ:
        note += "; these keys do not apply to it: " + ", ".join(differ)
    return stored, note


def describe_quant(opts: quant.QuantOptions) -> str:
    """'blocks of 64, double quantization, on q_proj, k_proj, ...', as the run log says it."""
    return (f"blocks of {opts.blocksize}, {'double quantization' if opts.double_quant else 'float32 scales'}, "
            f"on {', '.join(opts.modules)}")


def split_trainable(model: Llama, method: str, modules_to_save: str = ""):
    """(graphdef, trainable state, frozen state) for the train step."""
    return nnx.split(model, trainable_filter(method, modules_to_save, tied=model.cfg.tie_word_embeddings), ...)


# --- PEFT adapter directories and merging -----------------------------------------------------------

def peft_stem(module: str, layer: int) -> str:
    """PEFT's name of one layer's LoRA module: 'base_model.model.model.layers.3.self_attn.q_proj'."""
    return PEFT_PREFIX + hf_module(("layers", module, "kernel"), layer)


def peft_saved_name(hf_module_name: str) -> str:
    """PEFT's tensor name of a `modules_to_save` entry: 'base_model.model.model.embed_tokens.weight'."""
    return PEFT_PREFIX + hf_name((SAVABLE_MODULES[hf_module_name],))


def lora_modules(model: Llama) -> dict[str, Linear]:
    return {name: getattr(model.layers, name) for name in LINEAR_MODULES if getattr(model.layers, name).lora_a is not None}


def lora_rank(model: Llama) -> int:
    return int(next(iter(lora_modules(model).values())).lora_a.shape[-1])


def describe(model: Llama, alpha: float) -> str:
    return f"LoRA r={lora_rank(model)}, alpha={alpha:g}, on {', '.join(sorted(lora_modules(model)))}"


def adapter_tensors(model: Llama, modules_to_save: str = "") -> dict:
    """PEFT's adapter_model.safetensors content: lora_A [r, in], lora_B [out, r] per layer and module,
    plus modules_to_save weights under their HF names."""
    out = {}
    for name, linear in lora_modules(model).items():
        a, b = np.asarray(jax.device_get(linear.lora_a[...])), np.asarray(jax.device_get(linear.lora_b[...]))
        for i in range(a.shape[0]):
            out[f"{peft_stem(name, i)}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{peft_stem(name, i)}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    saved = split_list(modules_to_save)
    if model.cfg.tie_word_embeddings and saved:
        saved = list(SAVABLE_MODULES)  # one tied matrix: peft (ensure_weight_tying) stores it under both names
    for hf_module_name in saved:
        ours = saved_param(hf_module_name, tied=model.cfg.tie_word_embeddings)
        weight = np.asarray(jax.device_get(getattr(model, ours)[...]))
        out[peft_saved_name(hf_module_name)] = weight if ours == "embed" else weight.T
    return out


# Every field `peft.LoraConfig.save_pretrained` writes (peft 0.21.2), at peft's defaults: readers that
# look a field up rather than constructing a LoraConfig (merge scripts, vLLM, older tools) find it.
PEFT_VERSION = "0.21.2"
PEFT_LORA_FIELDS = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
    "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
    "loftq_config": {}, "lora_bias": False, "lora_ga_config": None, "megatron_config": None,
    "megatron_core": "megatron.core", "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
    "peft_version": PEFT_VERSION, "qalora_group_size": 16, "rank_pattern": {}, "revision": None,
    "target_parameters": None, "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None,
    "use_dora": False, "use_qalora": False, "use_rslora": False, "velora_config": None,
}


def adapter_config(model: Llama, *, alpha: float, dropout: float, rslora: bool, modules_to_save: str,
                   base_model: str) -> dict:
    return {**PEFT_LORA_FIELDS, "r": lora_rank(model), "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": sorted(lora_modules(model)), "use_rslora": rslora,
            "modules_to_save": split_list(modules_to_save) or None, "base_model_name_or_path": base_model,
            # tied input/output embeddings trained as one matrix: peft must keep lm_head tied to the copy
            "ensure_weight_tying": bool(model.cfg.tie_word_embeddings and split_list(modules_to_save))}


def _read_adapter_dir(adapter_dir: Path) -> tuple[dict, dict, Path]:
    """(adapter_config, tensors with PEFT's '.default' adapter name dropped, the weights file)."""
    cfg_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise JaxtuneError(f"lora.init_from: {f} is missing; point it at a PEFT adapter directory")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise JaxtuneError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters can be loaded")
    tensors = {name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): value
               for name, value in load_file(weights_file).items()}
    return cfg, tensors, weights_file


def _stacked_factors(linear: Linear, name: str, layers: int, tensors: dict, weights_file: Path):
    """One module's lora_A / lora_B of every layer, as our [layers, in, r] / [layers, r, out]."""
    a_stack, b_stack = [], []
    for i in range(layers):
        stem = peft_stem(name, i)
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
    return np.stack(a_stack), np.stack(b_stack)


def load_peft_adapter(model: Llama, adapter_dir) -> dict:
    """Attach a PEFT LoRA adapter (made by peft, axolotl, unsloth or jaxtune) to `model` in place.
    Returns its adapter_config. Shapes and module names are checked against the base model."""
    cfg, tensors, weights_file = _read_adapter_dir(Path(adapter_dir))
    targets = cfg["target_modules"]
    targets = resolve_targets(targets if isinstance(targets, str) else ",".join(targets))
    add_lora(model, rank=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0), targets=targets,
             rslora=cfg.get("use_rslora", False))
    for name in targets:
        linear: Linear = getattr(model.layers, name)
        a, b = _stacked_factors(linear, name, model.cfg.num_layers, tensors, weights_file)
        dtype = linear.lora_a[...].dtype
        linear.lora_a[...] = jnp.asarray(a, dtype)
        linear.lora_b[...] = jnp.asarray(b, dtype)
    for saved in cfg.get("modules_to_save") or []:
        name = peft_saved_name(saved)
        if name in tensors:
            ours = saved_param(saved, tied=model.cfg.tie_word_embeddings)
            value = tensors[name] if ours == "embed" else tensors[name].T
            var = getattr(model, ours)
            if value.shape != var.shape:
                raise JaxtuneError(f"{weights_file}: {name} has shape {list(value.shape)}, the base needs {list(var.shape)}")
            var[...] = jnp.asarray(value, var[...].dtype)
    return cfg


def merge_lora(model: Llama) -> Llama:
    """Fold every LoRA into its kernel: W + scale * A @ B computed in float32, cast back to the
    kernel's dtype; the factors are removed. An NF4 kernel (QLoRA) becomes its dequantized float32
    weights first: merging a QLoRA run means the dequantized base plus the delta, as everywhere.
    In place; returns the model."""
    for name in LINEAR_MODULES:
        linear = getattr(model.layers, name)
        if isinstance(linear.kernel, NF4Kernel):
            linear.kernel = nnx.Param(linear.kernel.dense(), axes=linear.kernel.axes)
    for linear in lora_modules(model).values():
        w = linear.kernel[...].astype(jnp.float32)
        delta = jnp.einsum("lir,lro->lio", linear.lora_a[...].astype(jnp.float32), linear.lora_b[...].astype(jnp.float32))
        linear.kernel.set_value((w + linear.lora_scale * delta).astype(linear.kernel[...].dtype))
        linear.lora_a, linear.lora_b = nnx.data(None), nnx.data(None)
    return model


def attach_from_config(model: Llama, cfg: dict) -> dict | None:
    """LoRA as the run configures it: from `lora.init_from` (a PEFT adapter, whose r/alpha/targets
    win) or fresh. Returns the effective {alpha, dropout, rslora}."""
    if cfg["method"] not in LORA_METHODS:
        return None
    c = cfg["lora"]
    if c.get("init_from"):
        adapter = load_peft_adapter(model, c["init_from"])
        return {"alpha": adapter["lora_alpha"], "dropout": adapter.get("lora_dropout", 0.0),
                "rslora": adapter.get("use_rslora", False)}
    add_lora(model, rank=c["rank"], alpha=c["alpha"], dropout=c["dropout"], targets=c["targets"],
             rslora=c["rslora"], seed=cfg["seed"])
    return {"alpha": c["alpha"], "dropout": c["dropout"], "rslora": c["rslora"]}

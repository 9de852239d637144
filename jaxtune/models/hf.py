"""Hugging Face checkpoints in and out: config.json <-> ModelConfig, safetensors <-> parameters.

Loading streams: each parameter is built with `jax.make_array_from_callback`, whose callback reads
only the slice a device needs straight from the memory-mapped safetensors files, so the model is
never held twice in host memory and a sharded model never exists whole on one host.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxtune import quant, sharding
from jaxtune.atomic import write_dir
from jaxtune.errors import JaxtuneError
from jaxtune.models.llama import (ATTENTION_PROJECTIONS, LINEAR_MODULES, MLP_PROJECTIONS, ROPE_TYPES, Llama,
                                  ModelConfig, NF4Kernel)

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SHARD_BYTES = 5 * 1024**3
HF_MODEL_KIND = "hf-model"  # the marker of directories jaxtune writes as HF models (atomic.write_dir)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
)

# The one table of HF names: our parameter path -> (HF tensor name, {i} standing for the layer of a
# stacked `layers/...` parameter; stored transposed?). Torch Linear weights are [out, in], ours [in, out].
# Everything else that names HF tensors or modules (hf_name, hf_module, the PEFT names in jaxtune.lora)
# is derived from it.
_LAYER = "model.layers.{i}."
PARAM_MAP = {
    ("embed",): ("model.embed_tokens.weight", False),
    ("final_norm",): ("model.norm.weight", False),
    ("lm_head",): ("lm_head.weight", True),
    ("layers", "attn_norm"): (_LAYER + "input_layernorm.weight", False),
    ("layers", "mlp_norm"): (_LAYER + "post_attention_layernorm.weight", False),
}
for _parent, _names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", MLP_PROJECTIONS)):
    for _name in _names:
        PARAM_MAP[("layers", _name, "kernel")] = (f"{_LAYER}{_parent}.{_name}.weight", True)
        PARAM_MAP[("layers", _name, "bias")] = (f"{_LAYER}{_parent}.{_name}.bias", False)


def hf_name(path: tuple, layer: int | None = None) -> str:
    """The HF tensor name of our parameter `path` (of layer `layer` for a stacked one)."""
    name = PARAM_MAP[path][0]
    return name.format(i=layer) if path[0] == "layers" else name


def hf_module(path: tuple, layer: int | None = None) -> str:
    """The HF module holding that tensor: 'model.layers.3.self_attn.q_proj', 'model.embed_tokens'."""
    return hf_name(path, layer).rsplit(".", 1)[0]


def read_hf_config(path: str | os.PathLike) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise JaxtuneError(
            f"{config_path}: not found. Point model.path at a Hugging Face model directory "
            "(config.json + *.safetensors), e.g. one made by `jaxtune assets smollm2`."
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise JaxtuneError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def config_from_hf(hf: dict, *, dtype="float32", param_dtype="float32", remat="none", attention="xla",
                   source="config.json") -> ModelConfig:
    """ModelConfig from a config.json dict (transformers 4 `rope_scaling` or 5 `rope_parameters`)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise JaxtuneError(
            f"{source}: model_type {model_type!r} is not supported; jaxtune trains Llama-family models "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})."
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise JaxtuneError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise JaxtuneError(f"{source}: missing keys {missing}")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise JaxtuneError(f"{source}: rope type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") if model_type == "mistral" else None
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        rope_factor=rope.get("factor", 1.0),
        rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
        rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
        rope_original_max_positions=rope.get("original_max_position_embeddings", 8192),
        sliding_window=window,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        attention=attention,
    )


class SafetensorsIndex:
    """Every tensor of a model directory by name, read lazily from single or sharded files."""

    def __init__(self, path: Path):
        self.path = path  # named in errors
        index_file = path / "model.safetensors.index.json"
        if index_file.is_file():
            files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise JaxtuneError(f"{path}: no *.safetensors files. Convert the checkpoint to safetensors first.")
        self.handles, self.where = {}, {}
        for name in files:
            file = path / name
            if not file.is_file():
                raise JaxtuneError(f"{index_file}: lists {name}, which is missing. Re-download the checkpoint.")
            expected_end = _declared_data_end(file)
            if file.stat().st_size < expected_end:
                raise JaxtuneError(
                    f"{file}: truncated ({file.stat().st_size} bytes, header needs {expected_end}). "
                    "The download or copy was cut short; fetch the file again."
                )
            try:
                handle = safe_open(str(file), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise JaxtuneError(f"{file}: not a readable safetensors file ({e}). Fetch it again.") from None
            self.handles[name] = handle
            for key in handle.keys():
                self.where[key] = name

    def __contains__(self, key):
        return key in self.where

    def shape(self, key) -> tuple:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def dtype(self, key) -> str:
        """The stored dtype, in safetensors' names (F32, BF16, F16, U8, ...), without reading data."""
        return self.handles[self.where[key]].get_slice(key).get_dtype()

    def read(self, key, index=()) -> np.ndarray:
        return self.handles[self.where[key]].get_slice(key)[index]


def _declared_data_end(file: Path) -> int:
    """Byte size a safetensors file must have according to its own header."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return 8
        header_len = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return 8 + header_len
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


def _hf_shape(path: tuple, ours: tuple) -> tuple:
    """The HF tensor shape one layer of our parameter (of shape `ours`) corresponds to."""
    per_layer = ours[1:] if path[0] == "layers" else ours
    return tuple(reversed(per_layer)) if PARAM_MAP[path][1] else per_layer


def _reader(tensors: SafetensorsIndex, path: tuple, shape: tuple, dtype):
    """Callback for make_array_from_callback: reads one device's slice of one of our parameters."""
    transpose = PARAM_MAP[path][1]

    def read_one(key, idx):
        if transpose:  # our [in, out] slice == their [out, in] slice, transposed
            return tensors.read(key, tuple(reversed(idx))).T
        return tensors.read(key, idx)

    def callback(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        if path[0] != "layers":
            block = read_one(hf_name(path), index)
        else:
            layers = range(*index[0].indices(shape[0]))
            block = np.stack([read_one(hf_name(path, i), index[1:]) for i in layers])
        return np.ascontiguousarray(block).astype(dtype)

    return callback


def load_params(abstract: Llama, path: Path, mesh: Mesh | None, quantize: quant.QuantOptions | None = None) -> Llama:
    """Fill an abstract (eval_shape) model with the checkpoint's tensors, on their shardings; with
    `quantize`, the kernels of its modules become NF4 (read, quantized and placed a layer at a time)."""
    cfg: ModelConfig = abstract.cfg
    tensors = SafetensorsIndex(path)
    graphdef, state = nnx.split(abstract)
    stored_4bit = bnb_4bit_options(read_hf_config(path), path)
    if stored_4bit and quantize is None:
        raise needs_qlora(path, stored_4bit)
    stored = {("layers", name, "kernel") for name in (stored_4bit.modules if stored_4bit else ())}  # their `weight` is packed codes, not [out, in]
    quantized = stored | {("layers", name, "kernel") for name in (quantize.modules if quantize else ())}
    flat = []
    for var_path, var in nnx.to_flat_state(state):
        if var_path not in PARAM_MAP:
            raise JaxtuneError(f"internal: no HF name for parameter {'/'.join(var_path)}")
        stacked = var_path[0] == "layers"
        names = [hf_name(var_path, i) for i in range(cfg.num_layers)] if stacked else [hf_name(var_path)]
        missing = [name for name in names if name not in tensors]
        if missing:
            hint = " (config says tie_word_embeddings=false)" if var_path == ("lm_head",) else ""
            raise JaxtuneError(f"{path}: tensor {missing[0]} is missing from the safetensors files{hint}")
        want = _hf_shape(var_path, var.shape)
        for name in names:
            if tensors.shape(name) != want and var_path not in stored:
                raise JaxtuneError(
                    f"{path}: tensor {name} has shape {list(tensors.shape(name))}, config.json implies "
                    f"{list(want)}. The weights do not belong to this config.json."
                )
        if var_path in quantized:
            flat.append((var_path, var))  # replaced by its NF4 kernel below, never loaded dense
            continue
        array = jax.make_array_from_callback(var.shape, _target(var.axes, var.shape, mesh),
                                             _reader(tensors, var_path, var.shape, var.dtype))
        flat.append((var_path, var.replace(value=array)))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    for var_path in sorted(quantized):
        linear = getattr(model.layers, var_path[1])
        linear.kernel = _nf4_kernel(tensors, var_path, linear.kernel.axes, linear.kernel.shape, quantize, mesh)
    return model


def _target(axes, shape, mesh: Mesh | None):
    return sharding.named_sharding(axes, shape, mesh) if mesh is not None else SingleDeviceSharding(jax.devices()[0])


BNB_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"  # a 4-bit weight's JSON record in a bitsandbytes checkpoint


def bnb_nf4(tensors: SafetensorsIndex, name: str) -> quant.NF4:
    """One weight of a bitsandbytes 4-bit checkpoint (as transformers saves it) in jaxtune's NF4,
    without dequantizing: the packed codes, absmax (8-bit with double quantization), nested absmax
    and offset are bitsandbytes' own; only NF4 with the standard maps is accepted."""
    try:
        state = json.loads(bytes(tensors.read(name + BNB_STATE_SUFFIX)).decode())
    except (ValueError, UnicodeDecodeError):
        raise JaxtuneError(f"{tensors.path}: {name}{BNB_STATE_SUFFIX} is not bitsandbytes' JSON record") from None
    if state.get("quant_type") != "nf4":
        raise JaxtuneError(f"{tensors.path}: {name} is quantized as {state.get('quant_type')!r}; jaxtune trains NF4 "
                           "bases only (re-quantize with bnb_4bit_quant_type='nf4')")
    missing = [f"{name}.{k}" for k in ("absmax", "quant_map") if f"{name}.{k}" not in tensors]
    nested = "nested_blocksize" in state
    missing += [f"{name}.nested_absmax"] if nested and f"{name}.nested_absmax" not in tensors else []
    if missing:
        raise JaxtuneError(f"{tensors.path}: tensor {missing[0]} is missing; the 4-bit checkpoint is incomplete")
    if not np.array_equal(tensors.read(f"{name}.quant_map"), quant.NF4_CODE):
        raise JaxtuneError(f"{tensors.path}: {name}.quant_map is not the NF4 code table")
    if nested and not np.array_equal(tensors.read(f"{name}.nested_quant_map"), quant.dynamic_map()):
        raise JaxtuneError(f"{tensors.path}: {name}.nested_quant_map is not bitsandbytes' dynamic map")
    shape, blocksize = tuple(state["shape"]), state["blocksize"]
    if shape[1] % blocksize:
        raise JaxtuneError(f"{tensors.path}: {name}: block size {blocksize} does not divide its rows of {shape[1]}")
    return quant.NF4(np.asarray(tensors.read(name)).reshape(-1), np.asarray(tensors.read(f"{name}.absmax")), shape,
                     blocksize, np.asarray(tensors.read(f"{name}.nested_absmax")) if nested else None,
                     np.float32(state["nested_offset"]) if nested else None, state.get("nested_blocksize", 256))


def is_bnb_4bit(hf: dict) -> bool:
    """config.json of a checkpoint saved by transformers with a 4-bit BitsAndBytesConfig."""
    q = hf.get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


def bnb_4bit_options(hf: dict, model_dir: Path | None = None) -> quant.QuantOptions | None:
    """How a bitsandbytes 4-bit checkpoint is quantized (None for a dense one): its NF4 modules, block
    size and double quantization, from the record of its first 4-bit weight in `model_dir`; from
    config.json's `quantization_config` alone without the directory (transformers' block size, 64)."""
    if not is_bnb_4bit(hf):
        return None
    q = hf["quantization_config"]
    tensors = SafetensorsIndex(Path(model_dir)) if model_dir is not None else None
    if tensors is None:
        skipped = q.get("llm_int8_skip_modules") or ()
        return quant.QuantOptions(tuple(m for m in LINEAR_MODULES if m not in skipped), quant.BLOCKSIZE,
                                  bool(q.get("bnb_4bit_use_double_quant")))
    modules = tuple(m for m in LINEAR_MODULES if f"{hf_name(('layers', m, 'kernel'), 0)}{BNB_STATE_SUFFIX}" in tensors)
    if not modules:
        raise JaxtuneError(f"{tensors.path}: config.json says bitsandbytes 4-bit, but no linear weight has a "
                           f"{BNB_STATE_SUFFIX} record; the checkpoint is incomplete")
    first = bnb_nf4(tensors, hf_name(("layers", modules[0], "kernel"), 0))
    return quant.QuantOptions(modules, first.blocksize, first.nested_absmax is not None)


def needs_qlora(path, stored: quant.QuantOptions) -> JaxtuneError:
    """The one answer to a dense method (lora, full) on a bitsandbytes 4-bit checkpoint."""
    return JaxtuneError(f"{path}: a bitsandbytes 4-bit checkpoint ({', '.join(stored.modules)} in NF4): train it "
                        "with method='qlora', or point model.path at the dense model")


FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors' names -> torch's


def check_quantizable(tensors: SafetensorsIndex, module: str, layers: int, blocksize: int, *, block_key: str,
                      dense_key: str) -> None:
    """What `method='qlora'` (quantizing while loading) and `jaxtune quantize` both require of a dense
    module's weights: stored as floats, in rows its NF4 blocks do not straddle."""
    for i in range(layers):
        name = hf_name(("layers", module, "kernel"), i)
        if name not in tensors:
            raise JaxtuneError(f"{tensors.path}: tensor {name} is missing from the safetensors files")
        if tensors.dtype(name) not in FLOAT_DTYPES:
            raise JaxtuneError(f"{tensors.path}: {name} is stored as {tensors.dtype(name)}; jaxtune quantizes "
                               f"float32, bfloat16 and float16 weights (or keep {module} dense with {dense_key}{module})")
        quant.check_rows(f"{tensors.path}: {name}", tensors.shape(name)[1], blocksize, module=module,
                         block_key=block_key, dense_key=dense_key)


def _nf4_kernel(tensors: SafetensorsIndex, var_path: tuple, axes: tuple, shape: tuple, opts: quant.QuantOptions,
                mesh: Mesh | None) -> NF4Kernel:
    """One module's kernels of every layer in NF4: each layer is read, quantized and dropped before the
    next, so the host holds the quantized stack plus one dense layer; then placed on the mesh."""
    if f"{hf_name(var_path, 0)}{BNB_STATE_SUFFIX}" in tensors:  # a bitsandbytes checkpoint: taken as it is
        per_layer = [bnb_nf4(tensors, hf_name(var_path, i)) for i in range(shape[0])]
    else:
        check_quantizable(tensors, var_path[1], shape[0], opts.blocksize, block_key="quant.block_size=",
                          dense_key="quant.dense_modules=")
        per_layer = [quant.quantize(np.asarray(tensors.read(hf_name(var_path, i)), np.float32),
                                    blocksize=opts.blocksize, double_quant=opts.double_quant) for i in range(shape[0])]
    want = (shape[2], shape[1])  # torch's [out, in] of our [layers, in, out]
    for i, nf4 in enumerate(per_layer):
        if tuple(nf4.shape) != want:
            raise JaxtuneError(f"{tensors.path}: {hf_name(var_path, i)} is a 4-bit weight of shape {list(nf4.shape)}, "
                               f"config.json implies {list(want)}. The weights do not belong to this config.json.")
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
    kernel = NF4Kernel(stacked, axes)
    for _, var in nnx.to_flat_state(nnx.state(kernel)):
        var.set_value(jax.device_put(np.asarray(var[...]), _target(var.axes, var.shape, mesh)))
    return kernel


def from_pretrained(path: str | os.PathLike, *, dtype="float32", param_dtype=None, remat="none", attention="xla",
                    mesh: Mesh | None = None, quantize: quant.QuantOptions | None = None) -> Llama:
    """Load an HF Llama/Mistral directory as a jaxtune model, sharded onto `mesh` if given.

    `dtype` is the compute dtype; `param_dtype` (default: `dtype`) the storage dtype; `attention` a
    resolved backend of jaxtune.attention; `quantize` turns the kernels of its modules into frozen
    NF4 (QLoRA).
    """
    path = resolve_model_path(path)
    hf = read_hf_config(path)
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype or dtype, remat=remat, attention=attention,
                         source=str(path / "config.json"))
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0), source_path=str(path)))
    return load_params(abstract, path, mesh, quantize)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id through huggingface_hub (online only).
    Either way it must be a model jaxtune can use without running code shipped with it."""
    local = Path(path).expanduser()
    if local.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        if not local.is_dir():
            raise JaxtuneError(f"{local}: no such model directory")
        return refuse_custom_code(local)
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception as e:  # offline, gated, or missing repo
        raise JaxtuneError(f"{path}: not a local directory and the hub could not provide it ({e})") from None
    return refuse_custom_code(local)


def refuse_custom_code(model_dir: Path) -> Path:
    """A model directory whose config.json or tokenizer_config.json maps classes to its own Python
    files (`auto_map`) needs `trust_remote_code`, i.e. running code from the directory: jaxtune never
    does (Llama-family models need none), so it says so instead of asking or running it."""
    if not (model_dir / "config.json").is_file():
        read_hf_config(model_dir)  # the one-line "not found" error
    for name in ("config.json", "tokenizer_config.json"):
        file = model_dir / name
        try:
            auto_map = json.loads(file.read_text()).get("auto_map") if file.is_file() else None
        except (ValueError, AttributeError):
            raise JaxtuneError(f"{file}: not valid JSON; fetch the model directory again") from None
        if auto_map:
            raise JaxtuneError(f"{file}: asks for custom code ({', '.join(sorted(auto_map))} from the directory's own "
                               "Python files); jaxtune never runs code from a model directory. Use a model (or "
                               "tokenizer) that transformers supports natively")
    return model_dir


def load_tokenizer(model_dir: str | os.PathLike):
    """The directory's tokenizer, never running code from it; unreadable files are one clear line."""
    from transformers import AutoTokenizer

    model_dir = refuse_custom_code(Path(model_dir))
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise JaxtuneError(f"{model_dir}: no usable tokenizer ({reason}); the directory needs tokenizer.json or "
                           "tokenizer.model with tokenizer_config.json") from None


def hf_tensors(model: Llama):
    """Yield (HF name, numpy array) for every parameter, one layer at a time (torch layout)."""
    cfg = model.cfg
    for var_path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var_path not in PARAM_MAP:
            continue  # not part of the HF base model (e.g. LoRA factors)
        transpose = PARAM_MAP[var_path][1]
        if var_path[0] == "layers":
            for i in range(cfg.num_layers):
                array = np.asarray(jax.device_get(var[...][i]))
                yield hf_name(var_path, i), (array.T if transpose else array)
        else:
            array = np.asarray(jax.device_get(var[...]))
            yield hf_name(var_path), (array.T if transpose else array)


def hf_config_dict(model: Llama) -> dict:
    """config.json for `model`: the source checkpoint's, updated to this model's dtype."""
    cfg = model.cfg
    source = model.source_path
    hf = read_hf_config(source) if source and (Path(source) / "config.json").is_file() else {
        "architectures": ["MistralForCausalLM" if cfg.sliding_window else "LlamaForCausalLM"],
        "model_type": "mistral" if cfg.sliding_window else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "hidden_act": "silu", "sliding_window": cfg.sliding_window,
    }
    hf.pop("quantization_config", None)
    hf["torch_dtype"] = hf["dtype"] = cfg.param_dtype
    return with_classic_rope_keys(hf)


def with_classic_rope_keys(hf: dict) -> dict:
    """transformers 5 keeps the rope base inside `rope_parameters`; transformers 4 and llama.cpp's
    converter read top-level `rope_theta` / `rope_scaling` and, without them, silently use a base of
    10000 (a wrong model). Both forms are written; they say the same thing."""
    rope = hf.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        hf.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        hf.setdefault("rope_scaling", scaling if scaling.get("rope_type", "default") != "default" else None)
    return hf


def copy_tokenizer_files(source: Path, out: Path) -> None:
    """The tokenizer, chat template and generation config of `source`, into `out`."""
    for fname in TOKENIZER_FILES + ("generation_config.json",):
        if (source / fname).is_file() and source.resolve() != out.resolve():
            shutil.copy2(source / fname, out / fname)
    chat_template_in_tokenizer_config(out)


def set_chat_template(out: Path, source: str, end_of_turn_ids: list[int]) -> None:
    """Make `source` the chat template of the tokenizer files in `out` (chat_template.jinja, and inside
    tokenizer_config.json for older readers), and let generation stop at its end-of-turn tokens."""
    (out / "chat_template.jinja").write_text(source)
    (out / "chat_template.json").unlink(missing_ok=True)  # an older form that would compete with it
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config_file.write_text(json.dumps({**config, "chat_template": source}, indent=2, ensure_ascii=False))
    gen_file = out / "generation_config.json"
    if gen_file.is_file() and end_of_turn_ids:
        gen = json.loads(gen_file.read_text())
        eos = gen.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
        gen["eos_token_id"] = eos + [i for i in end_of_turn_ids if i not in eos]
        gen_file.write_text(json.dumps(gen, indent=2))


def chat_template_in_tokenizer_config(out: Path) -> None:
    """transformers 5 saves the chat template as chat_template.jinja only; older readers (transformers
    4, llama.cpp's converter) look for it in tokenizer_config.json, so it is copied there too."""
    template, config_file = out / "chat_template.jinja", out / "tokenizer_config.json"
    if template.is_file() and config_file.is_file():
        config = json.loads(config_file.read_text())
        if "chat_template" not in config:
            config["chat_template"] = template.read_text()
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def write_safetensors(named_arrays, out: Path, *, shard_bytes: int = SHARD_BYTES) -> None:
    """(name, array) pairs into `out` as HF lays them out: one model.safetensors, or shards of at
    most `shard_bytes` with model.safetensors.index.json. Only one shard is held in memory at a time
    (each is written under a temporary name and renamed once the shard count is known)."""
    shards, current, size, total = [], {}, 0, 0

    def flush():
        save_file(current, str(out / f".shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
        shards.append(list(current))

    for name, array in named_arrays:
        if current and size + array.nbytes > shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = np.ascontiguousarray(array)
        size, total = size + array.nbytes, total + array.nbytes
    if current or not shards:
        flush()
    weight_map = {}
    for n, names in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / f".shard-{n}.safetensors", out / fname)
        weight_map.update(dict.fromkeys(names, fname))
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_hf_files(model: Llama, out: Path, *, shard_bytes: int = SHARD_BYTES,
                   tokenizer_from: str | os.PathLike | None = None) -> None:
    """The files of an HF model directory, written into the existing directory `out`."""
    out = Path(out)
    write_safetensors(hf_tensors(model), out, shard_bytes=shard_bytes)
    hf = hf_config_dict(model)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    copy_tokenizer_files(Path(tokenizer_from or model.source_path or out), out)
    if not (out / "generation_config.json").exists():
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def save_pretrained(model: Llama, out_dir: str | os.PathLike, *, shard_bytes: int = SHARD_BYTES,
                    tokenizer_from: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write an HF model directory that transformers loads with no missing or unexpected keys.

    Written to a temporary sibling and renamed, so an interrupted save never leaves half a model.
    An existing `out_dir` is replaced only if it is an earlier jaxtune model export and `overwrite`.
    Tokenizer and chat-template files are copied from `tokenizer_from` (default: the source dir).
    """
    return write_dir(out_dir, lambda tmp: write_hf_files(model, tmp, shard_bytes=shard_bytes,
                                                         tokenizer_from=tokenizer_from),
                     kind=HF_MODEL_KIND, overwrite=overwrite)

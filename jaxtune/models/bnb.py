"""`jaxtune quantize`: a dense HF Llama/Mistral directory written as a bitsandbytes 4-bit checkpoint.

The result is what `transformers` writes after loading a model with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=...)`:
per quantized linear `weight` (the packed codes, uint8 [n/2, 1]), `weight.absmax`, `weight.quant_map`,
with double quantization `weight.nested_absmax` and `weight.nested_quant_map`, and the JSON record
`weight.quant_state.bitsandbytes__nf4`; config.json carries the `quantization_config`. Every other
tensor is copied as stored. It streams: one weight is read, quantized and added to the current
shard at a time, so quantizing a 70B model needs about one output shard of memory.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from jaxtune import quant
from jaxtune.atomic import check_replaceable, write_dir
from jaxtune.errors import JaxtuneError
from jaxtune.models.hf import (BNB_STATE_SUFFIX, FLOAT_DTYPES, SHARD_BYTES, TOKENIZER_FILES, SafetensorsIndex,
                               check_quantizable, config_from_hf, hf_name, is_bnb_4bit, read_hf_config,
                               resolve_model_path, write_safetensors)
from jaxtune.models.llama import LINEAR_MODULES

BNB_MODEL_KIND = "bnb-4bit-model"  # the marker kind of directories `jaxtune quantize` writes


def nf4_tensors(name: str, nf4: quant.NF4, dtype: str) -> dict:
    """One quantized weight as the tensors transformers + bitsandbytes store for it (`name` = the
    dense weight's name, `dtype` = the dtype it dequantizes to)."""
    state = {"quant_type": "nf4", "blocksize": nf4.blocksize, "dtype": dtype, "shape": list(nf4.shape)}
    out = {name: nf4.packed.reshape(-1, 1), f"{name}.absmax": nf4.absmax, f"{name}.quant_map": quant.NF4_CODE}
    if nf4.nested_absmax is not None:
        state.update(nested_blocksize=nf4.nested_blocksize, nested_dtype="float32", nested_offset=float(nf4.offset))
        out.update({f"{name}.nested_absmax": nf4.nested_absmax, f"{name}.nested_quant_map": quant.dynamic_map()})
    out[name + BNB_STATE_SUFFIX] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    return out


def quantization_config(opts: quant.QuantOptions, compute_dtype: str) -> dict:
    """config.json's `quantization_config`, as transformers writes it for a 4-bit NF4 model. Linear
    modules kept dense are listed to skip (with lm_head, which transformers skips by default)."""
    dense = [m for m in LINEAR_MODULES if m not in opts.modules]
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": opts.double_quant, "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": ["lm_head", *dense] if dense else None,
        "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def quantize_checkpoint(model_dir, out, opts: quant.QuantOptions, *, overwrite: bool = False) -> Path:
    """Write `model_dir` with the kernels of `opts.modules` in NF4 to `out` (atomically); returns `out`."""
    src = resolve_model_path(model_dir)
    out = Path(out)
    if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
        raise JaxtuneError(f"--out {out}: is (or contains) the source model {src}; choose a new directory")
    check_replaceable(out, BNB_MODEL_KIND, overwrite=overwrite, flag="--overwrite")
    hf = read_hf_config(src)
    if is_bnb_4bit(hf):
        raise JaxtuneError(f"{src}: already a bitsandbytes 4-bit checkpoint; quantize the dense model instead")
    cfg = config_from_hf(hf, source=str(src / "config.json"))
    tensors = SafetensorsIndex(src)
    for module in opts.modules:
        check_quantizable(tensors, module, cfg.num_layers, opts.blocksize, block_key="--block-size ",
                          dense_key="--dense-modules ")
    quantized = {hf_name(("layers", m, "kernel"), i) for m in opts.modules for i in range(cfg.num_layers)}

    def named_arrays():
        for name in sorted(tensors.where):
            array = tensors.read(name)
            if name in quantized:
                nf4 = quant.quantize(np.asarray(array, np.float32), blocksize=opts.blocksize,
                                     double_quant=opts.double_quant)
                yield from nf4_tensors(name, nf4, FLOAT_DTYPES[tensors.dtype(name)]).items()
            else:
                yield name, array

    def build(tmp: Path):
        write_safetensors(named_arrays(), tmp, shard_bytes=SHARD_BYTES)
        compute_dtype = FLOAT_DTYPES[tensors.dtype(min(quantized))] if quantized else "float32"
        config = dict(hf, quantization_config=quantization_config(opts, compute_dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for fname in TOKENIZER_FILES + ("generation_config.json",):
            if (src / fname).is_file():
                shutil.copy2(src / fname, tmp / fname)

    return write_dir(out, build, kind=BNB_MODEL_KIND, overwrite=overwrite, flag="--overwrite")

"""The model and its checkpoints.

* `llama.py` owns the architecture: `ModelConfig`, the `Llama` module (every layer stacked in one
  `LayerStack`, scanned), the KV cache, the names of a layer's linear projections (`LINEAR_MODULES`)
  and the values a config may take (`DTYPES`, `ROPE_TYPES`, `REMAT_POLICIES`). Parameters carry logical
  axis names only; `jaxtune.sharding` maps them to the mesh.
* `hf.py` owns the Hugging Face side: config.json <-> ModelConfig, safetensors <-> parameters, and the
  one table of HF tensor names (`PARAM_MAP`, with `hf_name` / `hf_module` derived from it), plus
  `from_pretrained` / `save_pretrained`; it also reads bitsandbytes 4-bit checkpoints as they are.
* `bnb.py` writes them: a dense directory as the bitsandbytes 4-bit directory transformers would save
  (`jaxtune quantize`).

Imports point one way: `bnb` imports `hf`, `hf` imports `llama`, never the reverse. Below them are only
the leaf modules `jaxtune.quant`, `jaxtune.sharding`, `jaxtune.errors` and `jaxtune.atomic`. Above them, `jaxtune.lora`,
`jaxtune.generate`, `jaxtune.train` and `jaxtune.export` import from here; nothing here imports those.
"""

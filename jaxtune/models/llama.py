"""A Llama-family decoder (Llama 1/2/3, Mistral, SmolLM) in Flax NNX.

Layers are stored stacked ([layers, ...] parameters) and applied with `jax.lax.scan`, so a 30-layer
model compiles one block. Parameters carry logical axis names in their `axes` metadata; which mesh
axes those map to is decided in `jaxtune.sharding`, never here. Numerics follow `transformers`
(rotate-half RoPE, float32 RMSNorm and softmax) so HF checkpoints load without permutation.

Array suffixes name their axes: B batch, T query length, S key/value length, D model width,
H query heads, K key/value heads, G query heads per key/value head, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxtune import attention, context, quant, sharding, vocab_parallel

# The linear projections of a layer, named as HF names the modules (LoRA targets, PEFT files and the
# HF tensor names in `jaxtune.models.hf` all use these), in the attention / MLP groups HF nests them in.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_PROJECTIONS + MLP_PROJECTIONS

DTYPES = ("float32", "bfloat16")  # the compute / storage dtypes jaxtune supports (config keys, CLI flags)
ROPE_TYPES = ("default", "linear", "llama3")  # the rope scalings rope_inv_freq implements
REMAT_POLICIES = {  # ModelConfig.remat: what a layer keeps for the backward pass
    "none": None,  # keep every activation: fastest, most memory
    # keep the outputs of matmuls and of attention (batched matmuls, so not "dots" themselves: without
    # the name the backward would run each layer's attention forward again just to recover them)
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attention_out")),
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    # as "full", with each layer's input (what the layer scan keeps: the residual stream) in host memory,
    # fetched back for its backward: long rows whose stream alone fills a chip (TPU, GPU; not XLA:CPU)
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["layer_input"], offload_src="device",
        offload_dst="pinned_host"),
}
HOST_OFFLOAD = ("offload",)  # the policies that need a host memory space


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus dtypes. Hashable: it is part of the module's static structure."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # one of ROPE_TYPES
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"  # compute dtype (DTYPES lists the supported ones)
    param_dtype: str = "float32"  # storage dtype
    remat: str = "none"  # a key of REMAT_POLICIES
    attention: str = "xla"  # the resolved backend of jaxtune.attention (never "auto")

    def __post_init__(self):
        if self.attention not in (*attention.BACKENDS, *attention.STAND_INS.values()) or self.attention == "auto":
            raise ValueError(f"attention must be a resolved backend of {attention.BACKENDS[1:]}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}, got {self.remat!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {list(ROPE_TYPES)}, got {self.rope_type!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim/2] in float32, with the checkpoint's scaling applied."""
    exponent = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    if cfg.rope_type == "linear":
        return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        old_len, factor = cfg.rope_original_max_positions, cfg.rope_factor
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions_bt: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, head_dim] of every position's angles. Every layer rotates by the same
    angles, so they are computed once per forward, outside the layer scan (not per layer and again
    in each layer's backward)."""
    freqs_btf = positions_bt[..., None].astype(jnp.float32) * inv_freq
    angles_btd = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)[:, :, None, :]
    return jnp.cos(angles_btd).astype(dtype), jnp.sin(angles_btd).astype(dtype)


def apply_rope(x_bthd: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE with the (cos, sin) of `rope_tables`."""
    cos, sin = rope
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos + rotated * sin


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def _param(rngs, shape, dtype, axes, init=nnx.initializers.normal(0.02)):
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


class QuantizedArray(nnx.Variable):
    """Codes and scales of a quantized frozen weight: never a Param, so never trained or decayed."""


class NF4Kernel(nnx.Module):
    """A Linear's frozen kernel in NF4 (`jaxtune.quant`: bitsandbytes' codes and scales), stacked over
    layers: codes as uint32 words (`quant.to_words`, lane-friendly on TPU) and block scales per layer,
    flat in torch's row-major [out, in] order, so sharding their flat axis shards `out`. Inside the
    layer scan one layer's arrays are dequantized for its matmul, never the whole stack; the backward
    dequantizes again (`quant.matmul`). `nf4()` gives bitsandbytes' bytes back."""

    def __init__(self, nf4: quant.NF4, axes: tuple):
        """`nf4`: stacked arrays ([layers, ...] each) with the torch shape [out, in] of one layer;
        `axes`: the dense kernel's logical axes ("layers", in, out)."""
        out_axis = axes[2]
        words = nf4.packed if nf4.layout == "words" else quant.to_words(nf4.packed, nf4.shape)
        self.words = QuantizedArray(jnp.asarray(words), axes=("layers", out_axis))
        self.absmax = QuantizedArray(jnp.asarray(nf4.absmax), axes=("layers", out_axis))
        double = nf4.nested_absmax is not None
        self.nested_absmax = QuantizedArray(jnp.asarray(nf4.nested_absmax), axes=("layers", None)) if double else None
        self.offset = QuantizedArray(jnp.asarray(nf4.offset), axes=("layers",)) if double else None
        self.weight_shape, self.blocksize, self.axes = tuple(nf4.shape), nf4.blocksize, tuple(axes)

    @property
    def shape(self) -> tuple:
        """The dense kernel's stacked shape [layers, in, out] (what LoRA sizes its factors by)."""
        return (self.words.shape[0], self.weight_shape[1], self.weight_shape[0])

    dtype = jnp.float32  # what a dense copy of the weights is computed in

    def dense(self):
        """The dequantized stack [layers, in, out] in float32 (for merging; never used in training)."""
        return jax.vmap(lambda nf4: quant.dequantize(nf4).T)(self._nf4())

    def _nf4(self) -> quant.NF4:
        arrays = [None if v is None else v[...] for v in (self.words, self.absmax, self.nested_absmax, self.offset)]
        return quant.NF4(*arrays[:2], self.weight_shape, self.blocksize, *arrays[2:], layout="words")

    def nf4(self) -> quant.NF4:
        """The stack in bitsandbytes' own arrays, on the host."""
        nf4 = jax.tree.map(np.asarray, self._nf4())
        return dataclasses.replace(nf4, packed=quant.from_words(nf4.packed, self.weight_shape), layout="bytes")

    def __call__(self, x):
        return quant.matmul(x, self._nf4())


def parameter_count(model: nnx.Module) -> int:
    """The weights a model computes with: an NF4 kernel counts the dense weights it stands for, not
    its packed bytes and scales (so QLoRA and LoRA of one model report the same size)."""
    dense = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return dense + sum(math.prod(m.shape) for _, m in nnx.iter_modules(model) if isinstance(m, NF4Kernel))


class Linear(nnx.Module):
    """x @ kernel (+ bias) (+ LoRA). kernel is [layers, in, out]; inside the layer scan [in, out].
    For QLoRA the kernel is an `NF4Kernel` (frozen, 4-bit) instead of a Param.

    `jaxtune.lora.add_lora` sets lora_a [layers, in, r], lora_b [layers, r, out], the scale and the
    dropout rate.
    """

    def __init__(self, layers, d_in, d_out, axes, *, bias, dtype, rngs):
        self.kernel = _param(rngs, (layers, d_in, d_out), dtype, ("layers", *axes))
        self.bias = _param(rngs, (layers, d_out), dtype, ("layers", axes[1]), nnx.initializers.zeros) if bias else None
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)  # data slots: add_lora fills them
        self.lora_scale, self.lora_dropout = 0.0, 0.0

    def __call__(self, x, dropout_key=None):
        """The leading axes are flattened first: with one contracting axis, the weight gradients
        (x^T @ dy over batch and length) need no transposed copy of dy, which XLA:CPU otherwise
        fuses with the scan's residual slices into a strided loop (40% of a LoRA step). Not when the rows
        are split over a `context` axis: merging two sharded axes would gather the length."""
        lead = x.shape[:-1]
        if context.size() == 1:
            x = x.reshape(-1, x.shape[-1])
        if isinstance(self.kernel, NF4Kernel):
            y = self.kernel(x)
        else:
            y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora_a is not None:
            if dropout_key is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
            h = jnp.einsum("...i,ir->...r", x, self.lora_a[...].astype(x.dtype)) * jnp.asarray(self.lora_scale, x.dtype)
            y = y + jnp.einsum("...r,ro->...o", h, self.lora_b[...].astype(x.dtype))
        return y.reshape(*lead, y.shape[-1])


class LayerStack(nnx.Module):
    """Every decoder layer (pre-norm attention + SwiGLU MLP) at once: each parameter is stacked on a
    leading [layers] axis. `Llama.hidden_states` scans over that axis and merges one layer's slice
    back into this class, so `__call__` always runs a single layer.

    It is `Llama.layers`; that name is part of every parameter path (`layers/q_proj/kernel`), which
    orbax checkpoints and `jaxtune.models.hf.PARAM_MAP` are keyed by, so it stays.
    """

    def __init__(self, cfg: ModelConfig, *, rngs):
        n, d, pd = cfg.num_layers, cfg.hidden_size, jnp.dtype(cfg.param_dtype)
        qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

        def linear(d_in, d_out, axes, bias):
            return Linear(n, d_in, d_out, axes, bias=bias, dtype=pd, rngs=rngs)

        self.attn_norm = _param(rngs, (n, d), pd, ("layers", "norm"), nnx.initializers.ones)
        self.q_proj = linear(d, qd, ("embed", "heads"), cfg.attention_bias)
        self.k_proj = linear(d, kvd, ("embed", "kv_heads"), cfg.attention_bias)
        self.v_proj = linear(d, kvd, ("embed", "kv_heads"), cfg.attention_bias)
        self.o_proj = linear(qd, d, ("heads", "embed"), cfg.attention_bias)
        self.mlp_norm = _param(rngs, (n, d), pd, ("layers", "norm"), nnx.initializers.ones)
        self.gate_proj = linear(d, cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias)
        self.up_proj = linear(d, cfg.intermediate_size, ("embed", "mlp"), cfg.mlp_bias)
        self.down_proj = linear(cfg.intermediate_size, d, ("mlp", "embed"), cfg.mlp_bias)

    def __call__(self, x_btd, cfg: ModelConfig, positions, segments, mask, rope, kv=None, cache_index=None,
                 rng=None):
        """One layer: returns (x, (keys, values)). With `kv` (this layer's cache) the new keys/values
        are written at `cache_index` and attention reads the whole cache through `mask`; without, it
        is self-attention by cfg.attention (`mask` is given for "xla"). `rng` (training only) drives
        LoRA dropout, one key per linear module."""
        b, t, _ = x_btd.shape
        drop = dict.fromkeys(LINEAR_MODULES) if rng is None else dict(
            zip(LINEAR_MODULES, jax.random.split(rng, len(LINEAR_MODULES))))
        h = rms_norm(x_btd, self.attn_norm[...], cfg.rms_norm_eps)
        q = self.q_proj(h, drop["q_proj"]).reshape(b, t, cfg.num_heads, cfg.head_dim)
        keys = self.k_proj(h, drop["k_proj"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        values = self.v_proj(h, drop["v_proj"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, keys = apply_rope(q, rope), apply_rope(keys, rope)
        if kv is not None:
            keys = jax.lax.dynamic_update_slice_in_dim(kv[0], keys.astype(kv[0].dtype), cache_index, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(kv[1], values.astype(kv[1].dtype), cache_index, axis=1)
        if kv is None:
            attended = attention.attend(cfg.attention, q, keys, values, positions, segments, cfg.sliding_window, mask)
            attended = checkpoint_name(attended, "attention_out")
        else:
            attended = attention.masked(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
        x_btd = x_btd + self.o_proj(attended, drop["o_proj"])
        x_btd = sharding.constrain(x_btd, ("batch", "length", "act_embed"))
        h = rms_norm(x_btd, self.mlp_norm[...], cfg.rms_norm_eps)
        gated = jax.nn.silu(self.gate_proj(h, drop["gate_proj"])) * self.up_proj(h, drop["up_proj"])
        x_btd = x_btd + self.down_proj(gated, drop["down_proj"])
        return sharding.constrain(x_btd, ("batch", "length", "act_embed")), (keys, values)


@dataclasses.dataclass
class KVCache:
    """Keys/values for every layer plus the position and segment of each slot (segment 0 = empty)."""

    keys: jax.Array  # [layers, B, S, K, head_dim]
    values: jax.Array  # [layers, B, S, K, head_dim]
    positions: jax.Array  # [B, S]
    segments: jax.Array  # [B, S]
    index: jax.Array  # scalar: next slot to write

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int):
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        slots = jnp.zeros((batch, size), jnp.int32)
        return cls(zeros, zeros, slots, slots, jnp.zeros((), jnp.int32))


jax.tree_util.register_dataclass(KVCache, data_fields=["keys", "values", "positions", "segments", "index"],
                                 meta_fields=[])


class Llama(nnx.Module):
    """The decoder: `embed`, `layers` (a LayerStack: every layer, stacked), `final_norm` and, unless
    the embeddings are tied, `lm_head`.

    `source_path` is the HF directory the weights came from (`jaxtune.from_pretrained` sets it;
    None for a model built from a config): saving copies its config.json and tokenizer files.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, source_path: str | None = None):
        self.cfg = cfg
        self.source_path = source_path
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), pd, ("vocab", "embed"))
        self.layers = LayerStack(cfg, rngs=rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), pd, ("norm",), nnx.initializers.ones)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), pd, ("embed", "vocab"))

    def hidden_states(self, tokens_bt, positions_bt=None, segment_ids_bt=None, *, cache: KVCache | None = None,
                      rng=None):
        """Final-norm hidden states [B, T, D] (and the updated cache when one is given).

        positions default to 0..T-1 and segment ids to 1 (one unpadded document per row); `rng`
        turns on (LoRA) dropout, for training.
        """
        cfg = self.cfg
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        x = vocab_parallel.embed(self.embed[...], tokens_bt).astype(jnp.dtype(cfg.dtype))
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        if cache is None:  # "xla" builds the mask once here, outside the layer scan; the others (and context
            # parallelism, jaxtune.context) need none
            mask = (attention.mask(positions_bt, segment_ids_bt, positions_bt, segment_ids_bt, cfg.sliding_window)
                    if cfg.attention == "xla" and context.size() == 1 else None)
            kv_layers = None
        else:
            kv_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions_bt, cache.index, axis=1)
            kv_seg = jax.lax.dynamic_update_slice_in_dim(cache.segments, segment_ids_bt, cache.index, axis=1)
            mask = attention.mask(positions_bt, segment_ids_bt, kv_pos, kv_seg, cfg.sliding_window)
            kv_layers = (cache.keys, cache.values)
        rope = rope_tables(positions_bt, rope_inv_freq(cfg), jnp.dtype(cfg.dtype))
        graphdef, layer_state = nnx.split(self.layers)
        layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)

        def body(x, scanned):
            state, kv, layer_rng = scanned
            x = checkpoint_name(x, "layer_input")  # what remat='offload' moves to host memory
            layer = nnx.merge(graphdef, state)  # one layer's slice of the stack
            x, new_kv = layer(x, cfg, positions_bt, segment_ids_bt, mask, rope, kv,
                              None if cache is None else cache.index, layer_rng)
            return x, (new_kv if cache is not None else None)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        x, new_kv = jax.lax.scan(body, x, (layer_state, kv_layers, layer_rngs))
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        if cache is None:
            return x
        return x, KVCache(new_kv[0], new_kv[1], kv_pos, kv_seg, cache.index + t)

    def unembed(self) -> jax.Array:
        """The output projection [D, V] (the transposed embedding when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden_btd):
        return jnp.einsum("BTD,DV->BTV", hidden_btd, self.unembed().astype(hidden_btd.dtype))

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, *, cache: KVCache | None = None):
        """Logits [B, T, V]; with a cache, (logits, updated cache)."""
        out = self.hidden_states(tokens_bt, positions_bt, segment_ids_bt, cache=cache)
        if cache is None:
            return self.logits(out)
        return self.logits(out[0]), out[1]

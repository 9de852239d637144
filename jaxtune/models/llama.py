"""A Llama-family decoder (Llama 1/2/3, Mistral, SmolLM) in Flax NNX.

Layers are stored stacked ([layers, ...] parameters) and applied with `jax.lax.scan`, so a 30-layer
model compiles one block. Parameters carry logical axis names in their `axes` metadata; which mesh
axes those map to is decided in `jaxtune.sharding`, never here. Numerics follow `transformers`
(rotate-half RoPE, float32 RMSNorm and softmax) so HF checkpoints load without permutation.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import sharding

REMAT_POLICIES = {
    "none": None,  # keep every activation: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


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
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype
    remat: str = "none"  # a key of REMAT_POLICIES

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
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


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    freqs_btf = positions_bt[..., None].astype(jnp.float32) * inv_freq
    angles_btd = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles_btd).astype(x_bthd.dtype), jnp.sin(angles_btd).astype(x_bthd.dtype)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos + rotated * sin


def attention_mask(q_pos, q_seg, k_pos, k_seg, window: int | None) -> jax.Array:
    """[B, T, S] boolean: same non-zero segment, causal by position, inside the sliding window.

    Segment 0 marks padding (and empty cache slots). Causality by position rather than by index
    serves packed rows (positions restart per document) and the KV cache alike.
    """
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] != 0)
    causal = k_pos[:, None, :] <= q_pos[:, :, None]
    mask = same & causal
    if window is not None:
        mask &= q_pos[:, :, None] - k_pos[:, None, :] < window
    return mask


def attention(q_bthd, k_bskd, v_bskd, mask_bts) -> jax.Array:
    """Grouped-query attention: query head h reads key/value head h // (H / K)."""
    b, t, h, d = q_bthd.shape
    k = k_bskd.shape[2]
    q_btkgd = q_bthd.reshape(b, t, k, h // k, d)
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", q_btkgd, k_bskd, preferred_element_type=jnp.float32)
    scores = jnp.where(mask_bts[:, None, None], scores * d**-0.5, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskd.dtype)
    out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v_bskd)
    return out.reshape(b, t, h * d)


def rms_norm(x, weight, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def _param(rngs, shape, dtype, axes, init=nnx.initializers.normal(0.02)):
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


class Linear(nnx.Module):
    """x @ kernel (+ bias) (+ LoRA). kernel is [layers, in, out]; inside the layer scan [in, out].

    `jaxtune.lora.add_lora` sets lora_a [layers, in, r], lora_b [layers, r, out], the scale and the
    dropout rate; the frozen kernel is only ever read through `x @ kernel`, so a quantized kernel can
    replace it without touching the LoRA path.
    """

    def __init__(self, layers, d_in, d_out, axes, *, bias, dtype, rngs):
        self.kernel = _param(rngs, (layers, d_in, d_out), dtype, ("layers", *axes))
        self.bias = _param(rngs, (layers, d_out), dtype, ("layers", axes[1]), nnx.initializers.zeros) if bias else None
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)  # data slots: add_lora fills them
        self.lora_scale, self.lora_dropout = 0.0, 0.0

    def __call__(self, x, rng=None):
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        if self.lora_a is not None:
            if rng is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(rng, 1.0 - self.lora_dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
            h = jnp.einsum("...i,ir->...r", x, self.lora_a[...].astype(x.dtype))
            y = y + self.lora_scale * jnp.einsum("...r,ro->...o", h, self.lora_b[...].astype(x.dtype))
        return y


class Block(nnx.Module):
    """One decoder layer (pre-norm attention + SwiGLU MLP), built with all layers stacked."""

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

    def __call__(self, x_btd, cfg: ModelConfig, positions, mask, inv_freq, kv=None, cache_index=None, rng=None):
        """Returns (x, (k, v)). With `kv` (this layer's cache) new keys/values are written at
        `cache_index` and attention reads the whole cache. `rng` (training only) drives LoRA dropout."""
        b, t, _ = x_btd.shape
        keys = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
        h = rms_norm(x_btd, self.attn_norm[...], cfg.rms_norm_eps)
        q = self.q_proj(h, keys[0]).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(h, keys[1]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(h, keys[2]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if kv is not None:
            k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), cache_index, axis=1)
        x_btd = x_btd + self.o_proj(attention(q, k.astype(q.dtype), v.astype(q.dtype), mask), keys[3])
        x_btd = sharding.constrain(x_btd, ("batch", "length", "act_embed"))
        h = rms_norm(x_btd, self.mlp_norm[...], cfg.rms_norm_eps)
        x_btd = x_btd + self.down_proj(jax.nn.silu(self.gate_proj(h, keys[4])) * self.up_proj(h, keys[5]), keys[6])
        return sharding.constrain(x_btd, ("batch", "length", "act_embed")), (k, v)


@dataclasses.dataclass
class KVCache:
    """Keys/values for every layer plus the position and segment of each slot (segment 0 = empty)."""

    k: jax.Array  # [layers, B, S, kv_heads, head_dim]
    v: jax.Array
    positions: jax.Array  # [B, S]
    segments: jax.Array  # [B, S]
    index: jax.Array  # scalar: next slot to write

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, size: int):
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        slots = jnp.zeros((batch, size), jnp.int32)
        return cls(zeros, zeros, slots, slots, jnp.zeros((), jnp.int32))


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "positions", "segments", "index"], meta_fields=[])


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), pd, ("vocab", "embed"))
        self.layers = Block(cfg, rngs=rngs)
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
        x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(jnp.dtype(cfg.dtype))
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        if cache is None:
            mask = attention_mask(positions_bt, segment_ids_bt, positions_bt, segment_ids_bt, cfg.sliding_window)
            kv_layers = None
        else:
            k_pos = jax.lax.dynamic_update_slice_in_dim(cache.positions, positions_bt, cache.index, axis=1)
            k_seg = jax.lax.dynamic_update_slice_in_dim(cache.segments, segment_ids_bt, cache.index, axis=1)
            mask = attention_mask(positions_bt, segment_ids_bt, k_pos, k_seg, cfg.sliding_window)
            kv_layers = (cache.k, cache.v)
        inv_freq = rope_inv_freq(cfg)
        graphdef, layer_state = nnx.split(self.layers)

        layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)

        def body(x, scanned):
            state, kv, layer_rng = scanned
            block = nnx.merge(graphdef, state)
            x, new_kv = block(x, cfg, positions_bt, mask, inv_freq, kv, None if cache is None else cache.index, layer_rng)
            return x, (new_kv if cache is not None else None)

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, new_kv = jax.lax.scan(body, x, (layer_state, kv_layers, layer_rngs))
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        if cache is None:
            return x
        return x, KVCache(new_kv[0], new_kv[1], k_pos, k_seg, cache.index + t)

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

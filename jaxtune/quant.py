"""NF4 (4-bit NormalFloat) with double quantization, in bitsandbytes' own format, code for code.

Layout (bitsandbytes >= 0.50, QLoRA paper): a torch `[out, in]` weight is flattened row-major and cut
into blocks of 64; each block is scaled by its float32 absmax, every value goes to the nearest of the
16 NF4 codes (a value exactly between two codes goes to the lower one), and two codes share a byte,
the first in the high nibble. Double quantization stores the absmax values themselves in 8 bits: their
mean (the offset) is subtracted and the rest is quantized in blocks of 256 with the signed dynamic
map, each block with a float32 absmax of its own.

Quantizing runs on the host in numpy (it happens once, while loading, one layer at a time);
dequantizing runs in jax, inside the jitted step. Both follow bitsandbytes' float32 arithmetic
operation for operation, so the bytes and the dequantized weights are identical to its own.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.errors import JaxtuneError

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
BLOCK_SIZES = (64, 128, 256)  # what `quant.block_size` and `jaxtune quantize --block-size` offer


def _linspace_like_torch(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace in float32 on CPU: the first half counted up from `start`, the second half down
    from `end`, each point one fused multiply-add (exact in float64, rounded once to float32)."""
    lo, hi = np.float32(start), np.float32(end)
    step = np.float32((hi - lo) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    up = np.float64(lo) + i * np.float64(step)
    down = np.float64(hi) - (n - 1 - i) * np.float64(step)
    return np.where(np.arange(n) < n // 2, up, down).astype(np.float32)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`, 256 sorted float32 values): for
    exponents 10^-6 .. 10^0, 2^i evenly spaced fractions in (0.1, 1), both signs, plus 0 and 1."""
    values = [np.float32(0.0), np.float32(1.0)]
    for i in range(7):
        bounds = _linspace_like_torch(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = 10.0 ** (i - 6)
        values += list(means * np.float32(scale)) + list(means * np.float32(-scale))
    return np.sort(np.array(values, np.float32))


def _blockwise_codes(flat: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """(code index per value, float32 absmax per block) as bitsandbytes' CPU quantizer computes them:
    scale = x * (1 / max(absmax, 1e-38)) clamped to [-1, 1], index = bucket among the code midpoints,
    a tie going to the lower code. A last partial block gets its own absmax and is divided by it."""
    flat = flat.astype(np.float32, copy=False)
    full = flat.size - flat.size % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    inverse = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = [(blocks * inverse[:, None]).reshape(-1)]
    if full < flat.size:
        rest = np.maximum(np.abs(flat[full:]).max(), np.float32(1e-38))
        absmax = np.append(absmax, rest)
        scaled.append(flat[full:] / rest)
    scaled = np.clip(np.concatenate(scaled), -1, 1).astype(np.float32)
    midpoints = (code[:-1] + code[1:]) / np.float32(2.0)
    return np.searchsorted(midpoints, scaled, side="left").astype(np.uint8), absmax


def check_rows(name: str, rows: int, blocksize: int, *, block_key: str, dense_key: str, module: str) -> None:
    """jaxtune trains NF4 weights whose blocks never straddle two rows (a row's scales then belong to it,
    so sharding the `out` axis shards codes and scales alike): refuse a weight whose rows of `rows`
    values `blocksize` does not divide, naming the block sizes that would work, or keeping it dense.
    `block_key`, `dense_key`: how the user sets them ('quant.block_size=' or '--block-size ')."""
    if rows % blocksize == 0:
        return
    fits = [f"{block_key}{b}" for b in BLOCK_SIZES if rows % b == 0]
    choose = (f"use {' or '.join(fits)}" if fits else
              f"no NF4 block size jaxtune offers ({', '.join(map(str, BLOCK_SIZES))}) divides it")
    raise JaxtuneError(f"{name} has rows of {rows} values, which NF4 block size {blocksize} does not divide: "
                       f"{choose}, or keep {module} dense with {dense_key}{module}")


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """What QLoRA quantizes: the frozen kernels of `modules` (embeddings, norms and lm_head always
    stay dense, as in transformers), in NF4 blocks of `blocksize`, with double quantization or not."""
    modules: tuple
    blocksize: int = BLOCKSIZE
    double_quant: bool = True


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "absmax", "nested_absmax", "offset"],
                   meta_fields=["shape", "blocksize", "nested_blocksize", "layout"])
@dataclasses.dataclass
class NF4:
    """One quantized weight in bitsandbytes' arrays (a jax pytree: it can be sliced per layer, sharded
    and passed through jit). `absmax` is float32 per 64-block, or, with double quantization, uint8 codes
    with `nested_absmax` (float32 per 256 absmaxes) and `offset`."""
    packed: np.ndarray  # uint8 [(n + 1) // 2], the row-major [out, in] weight two codes a byte (or `to_words`)
    absmax: np.ndarray
    shape: tuple  # the torch shape [out, in]
    blocksize: int = BLOCKSIZE
    nested_absmax: np.ndarray | None = None
    offset: np.ndarray | None = None  # float32 scalar
    nested_blocksize: int = NESTED_BLOCKSIZE
    layout: str = "bytes"  # "bytes": bitsandbytes' packing; "words": `to_words`, how the device holds it


WORD_NIBBLES = 8


def to_words(packed, shape: tuple):
    """bitsandbytes' packed bytes of one [out, in] weight (or a stack [layers, n/2]) -> uint32 words
    [out·in/8] (or [layers, out·in/8]) in which nibble k (from the low end) of word j of a row holds
    column j + k·in/8 of that row.

    Why: unpacking bitsandbytes' bytes needs a [.., 2] axis of (high, low) nibbles, which a TPU pads
    to 128 lanes: Llama-3-8B's QLoRA step needed 23 GiB per chip instead of 8 and did not fit a v5e.
    From words, each nibble plane is a lane-dense [out, in/8] array and the row is their concatenation
    (`dequantize`), with the same float32 arithmetic, so the weights are equal bit for bit. A stacked
    uint32 array is also sliced per layer in place, where a uint8 stack was copied whole in the layer
    loop (TPU tiles 8-bit arrays differently). Repacked on the host at load, one layer at a time."""
    out_dim, in_dim = shape
    if in_dim % WORD_NIBBLES:
        raise JaxtuneError(f"an NF4 weight of shape {list(shape)}: rows of {in_dim} values do not split into "
                           f"{WORD_NIBBLES} nibble planes")
    if isinstance(packed, np.ndarray) and packed.ndim == 2:  # a stack: one layer at a time (host memory)
        return np.stack([to_words(layer, shape) for layer in packed])
    xp = np if isinstance(packed, np.ndarray) else jnp
    codes = xp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(*packed.shape[:-1], out_dim, in_dim)
    planes = codes.reshape(*codes.shape[:-1], WORD_NIBBLES, in_dim // WORD_NIBBLES).astype(xp.uint32)
    shifts = (4 * xp.arange(WORD_NIBBLES, dtype=xp.uint32))[:, None]
    return (planes << shifts).sum(axis=-2, dtype=xp.uint32).reshape(*packed.shape[:-1], -1)


def from_words(words, shape: tuple) -> np.ndarray:
    """`to_words` undone on the host: bitsandbytes' packed bytes."""
    out_dim, in_dim = shape
    words = np.asarray(words).reshape(*np.shape(words)[:-1], out_dim, in_dim // WORD_NIBBLES)
    codes = np.concatenate([(words >> np.uint32(4 * k)) & np.uint32(0xF) for k in range(WORD_NIBBLES)], axis=-1)
    codes = codes.astype(np.uint8).reshape(*np.shape(words)[:-2], -1)
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def quantize(weight: np.ndarray, *, blocksize: int = BLOCKSIZE, double_quant: bool = True) -> NF4:
    """NF4-quantize a weight given in torch layout ([out, in], float32 or bfloat16 values)."""
    if blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise JaxtuneError(f"NF4 block size {blocksize}: bitsandbytes supports 64 .. 4096 (powers of two)")
    flat = np.asarray(weight, dtype=np.float32).reshape(-1)
    codes, absmax = _blockwise_codes(flat, NF4_CODE, blocksize)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    packed = (codes[0::2] << 4) | codes[1::2]
    nf4 = NF4(packed.astype(np.uint8), absmax, tuple(weight.shape), blocksize)
    if double_quant:
        offset = np.float32(absmax.mean(dtype=np.float32))
        nf4.absmax, nf4.nested_absmax = _blockwise_codes(absmax - offset, dynamic_map(), NESTED_BLOCKSIZE)
        nf4.offset = offset
    return nf4


def dequantize_absmax(nf4: NF4):
    """The float32 absmax per block (undoing double quantization: code8[q] * nested + offset)."""
    if nf4.nested_absmax is None:
        return jnp.asarray(nf4.absmax, jnp.float32)
    codes = jnp.asarray(dynamic_map())[jnp.asarray(nf4.absmax).astype(jnp.int32)]
    nested = jnp.repeat(jnp.asarray(nf4.nested_absmax, jnp.float32), nf4.nested_blocksize)[:codes.size]
    return codes * nested + jnp.asarray(nf4.offset, jnp.float32)


def dequantize(nf4: NF4, dtype=jnp.float32):
    """The weight in torch layout [out, in]: NF4_CODE[q] * absmax in float32, then cast to `dtype`."""
    n = int(np.prod(nf4.shape))
    if nf4.layout == "words":
        out_dim, in_dim = nf4.shape
        words = jnp.asarray(nf4.packed).reshape(out_dim, in_dim // WORD_NIBBLES)
        codes = jnp.concatenate([(words >> (4 * k)) & 0xF for k in range(WORD_NIBBLES)], axis=-1).reshape(-1)
    else:
        packed = jnp.asarray(nf4.packed)
        codes = jnp.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:n]
    values = jnp.asarray(NF4_CODE)[codes.astype(jnp.int32)]
    scales = jnp.repeat(dequantize_absmax(nf4), nf4.blocksize)[:n]
    return (values * scales).reshape(nf4.shape).astype(dtype)


@jax.custom_vjp
def matmul(x, weight: NF4):
    """x @ Wᵀ for an NF4 weight W [out, in], dequantized to x's dtype. The backward dequantizes again
    (as bitsandbytes' MatMul4Bit does) instead of keeping a dense copy as a residual, and gives the
    quantized arrays no cotangent: they are frozen."""
    return x @ dequantize(weight, x.dtype).T


def _matmul_forward(x, weight: NF4):
    return matmul(x, weight), weight


def _matmul_backward(weight: NF4, grad_y):
    grad_x = grad_y @ dequantize(weight, grad_y.dtype)
    no_grad = jax.tree.map(lambda a: np.zeros(np.shape(a), jax.dtypes.float0) if not jnp.issubdtype(
        jnp.result_type(a), jnp.floating) else jnp.zeros_like(a), weight)
    return grad_x, no_grad


matmul.defvjp(_matmul_forward, _matmul_backward)

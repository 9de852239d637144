"""Context parallelism: the tokens of one row split over the `context` mesh axis (`mesh.context`).

Each device keeps its own T/cp queries; keys and values (the un-repeated KV heads) and their positions
and segment ids are all-gathered over `context` inside a `shard_map`, and the backward reduce-scatters
their gradients (the transpose of the gather). This is MaxText's default strategy (all-gather, not a
ring): at cp <= 16 it is as fast and needs the least code.

Rows are laid out once, on the host, in dual-chunk-swap ("zigzag") order: the row is cut into 2·cp chunks
and device i holds chunks i and 2·cp−1−i, so every device has the same causal work. Every token carries
its own position and segment id, and the mask is "same segment, at or before my position", so the new
order changes no mask, RoPE angle or loss term: packed rows whose documents cross shard boundaries and
sliding windows stay exact by construction (the bugs of other stacks derive positions after sharding).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import attention, sharding
from jaxtune.errors import JaxtuneError

QUERY_BLOCK = attention.BLOCKED_BLOCK
SCORES_PER_HEAD = 1 << 22  # a query block's float32 scores against the whole row: at most 16 MiB per head


def query_block(local: int, row: int) -> int:
    """Queries per block: 128, fewer for long rows (32 at 128k), so one block's scores stay small; a
    divisor of the `local` queries."""
    wanted = max(16, min(QUERY_BLOCK, SCORES_PER_HEAD // row))
    return max(n for n in range(1, min(wanted, local) + 1) if local % n == 0)


_STAND_IN: contextvars.ContextVar[int] = contextvars.ContextVar("jaxtune_context_stand_in", default=1)


def size() -> int:
    """The `context` axis of the active mesh (1 outside one, or without the axis), or of `stand_in`."""
    mesh = sharding.active_mesh()
    return _STAND_IN.get() if mesh is None else dict(mesh.shape).get("context", 1)


@contextlib.contextmanager
def stand_in(cp: int):
    """Within this block, without a mesh, attention computes what one device of a context group of `cp`
    computes (the gather is a concatenation): `jaxtune estimate` traces a layer so, on no devices."""
    token = _STAND_IN.set(cp)
    try:
        yield
    finally:
        _STAND_IN.reset(token)


def check_length(seq_len: int, cp: int) -> None:
    """A row must cut into 2·cp equal chunks."""
    if cp > 1 and seq_len % (2 * cp):
        up = -(-seq_len // (2 * cp)) * 2 * cp
        raise JaxtuneError(f"data.seq_len={seq_len} must be a multiple of 2 x mesh.context = {2 * cp} (each device "
                           f"holds two of 2 x {cp} equal chunks of a row): set data.seq_len={up}")


def check_splash(seq_len: int, cp: int) -> None:
    """Splash tiles are multiples of 128 tokens, and a query tile must lie in one device's share."""
    if (seq_len // cp) % 128:
        raise JaxtuneError(f"splash attention with mesh.context={cp} needs data.seq_len / {cp} to be a multiple of "
                           f"128, got {seq_len}: set data.seq_len={-(-seq_len // (128 * cp)) * 128 * cp}")


@functools.lru_cache(maxsize=16)
def order(seq_len: int, cp: int) -> np.ndarray:
    """The zigzag permutation: `row[order]` is a row as the devices hold it (device i's T/cp tokens are
    chunks i and 2·cp−1−i of 2·cp, contiguous)."""
    chunks = np.arange(seq_len).reshape(2 * cp, seq_len // (2 * cp))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * cp - 1 - i]]) for i in range(cp)])


def lay_out(rows: dict, cp: int) -> dict:
    """[B, T] host arrays (tokens, targets, weights, positions, segment ids) in the devices' order."""
    if cp == 1:
        return rows
    return {name: np.take(value, order(value.shape[1], cp), axis=1) for name, value in rows.items()}


def attend(q, k, v, positions, segments, window: int | None, backend: str = "blocked", interpret: bool = False):
    """Self-attention of rows laid out by `lay_out`, on the active mesh: q [B, T, H, D], k and v [B, T, K, D],
    positions and segments [B, T]; returns [B, T, H·D] in the same order (under `stand_in`, one device's
    share: q [B, T/cp, ...], and so on). `backend` "splash" runs TPU splash attention on each device's
    queries (`interpret`: in the Pallas interpreter, for CPU tests); any other, the blocked einsum."""
    mesh, cp = sharding.active_mesh(), size()
    b, t, h, d = q.shape
    if mesh is None:
        concatenate = lambda x: jnp.concatenate([x] * cp, axis=1)  # noqa: E731 - what all_gather returns
        return _one_device(q, k, v, positions, segments, window, concatenate).reshape(b, t, h * d)
    q_spec = sharding.spec(("batch", "length", "heads", None), q.shape, mesh)
    kv_spec = sharding.spec(("batch", "length", "kv_heads", None), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # a query head and its KV head must meet on one device
        k, v = attention._repeat_kv(q, k, v)
        kv_spec = q_spec
    rows = sharding.spec(("batch", "length"), positions.shape, mesh)
    gather = lambda x: jax.lax.all_gather(x, "context", axis=1, tiled=True)  # noqa: E731
    if backend == "splash":
        kernel = _splash_kernel(t, cp, q.shape[2] // k.shape[2], window, interpret)
        kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, PartitionSpec(None, "context")))
        local = functools.partial(_splash_one_device, gather=gather)
        out = jax.shard_map(local, mesh=mesh, in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, rows, rows),
                            out_specs=q_spec, check_vma=False)(kernel, q, k, v, positions, segments)
    else:
        local = functools.partial(_one_device, window=window, gather=gather)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows, rows), out_specs=q_spec,
                            check_vma=False)(q, k, v, positions, segments)
    return out.reshape(b, t, h * d)


def _splash_kernel(t: int, cp: int, group: int, window: int | None, interpret: bool):
    """One splash MQA kernel (the `group` query heads of one KV head) for the whole (T, T) mask, split
    over `cp` query shards: causal (or local) by index in row order for the keys, and for the queries by
    `q_sequence`, the zigzag order (as MaxText's load-balanced causal mask), so fully masked blocks are
    still skipped. Keys are not repeated per query head (4x smaller gathers for Llama 3)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (t, t)
    head_mask = (masks.CausalMask(shape, shard_count=cp) if window is None else
                 masks.LocalMask(shape, (window - 1, 0), offset=0, shard_count=cp))
    head_mask.q_sequence = order(t, cp).astype(np.int32)
    bq, bkv = math.gcd(512, t // cp), math.gcd(512, t)  # multiples of 128 (check_splash); a query block in one shard
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return splash.make_splash_mqa(masks.MultiHeadMask([head_mask] * group), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=cp, interpret=interpret)


def _splash_one_device(kernel, q, k, v, q_pos, q_seg, gather):
    """One device's queries [B, T/cp, H, D] against the gathered keys and values (un-repeated: [B, T, K, D]),
    in row order; one MQA call per (row, KV head). The kernel's mask holds the window, if any."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    k, v, kv_seg = _gathered_in_row_order(gather, k, v, q_seg)
    b, tl, h, d = q.shape
    heads = k.shape[2]
    q = (q * d**-0.5).reshape(b, tl, heads, h // heads, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T/cp, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, D]

    def one(q_kg, k_k, v_k, seg_q, seg_kv):
        return kernel(q_kg, k_k, v_k, segment_ids=splash.SegmentIds(seg_q, seg_kv))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(q, k, v, q_seg, kv_seg)  # [B, K, G, T/cp, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tl, h, d)


def _one_device(q, k, v, q_pos, q_seg, window, gather):
    """One device's queries (two chunks of the zigzag layout) against the gathered keys and values. These
    are put back in row order (a static gather), so that the first chunk (i < cp) reads only the first half
    of them: it lies in that half and sees nothing after it (1.5·T keys per device instead of 2·T)."""
    k, v, kv_pos, kv_seg = _gathered_in_row_order(gather, k, v, q_pos, q_seg)
    c, half = q.shape[1] // 2, k.shape[1] // 2
    first = _by_position(q[:, :c], k[:, :half], v[:, :half], kv_pos[:, :half], kv_seg[:, :half], q_pos[:, :c],
                         q_seg[:, :c], window)
    second = _by_position(q[:, c:], k, v, kv_pos, kv_seg, q_pos[:, c:], q_seg[:, c:], window)
    return jnp.concatenate([first, second], axis=1)


def _gathered_in_row_order(gather, *local):
    """Each device's [B, T/cp, ...] pieces gathered over `context` and put back in row order (a static
    gather by the inverse of the zigzag layout)."""
    t = local[0].shape[1] * size()
    restore = np.argsort(order(t, size()))
    return [jnp.take(gather(x), restore, axis=1) for x in local]


def _by_position(q, k, v, kv_pos, kv_seg, q_pos, q_seg, window):
    """Queries in blocks against every given key, masked by position and segment: [B, Tq, H, D]."""
    b, tq, h, d = q.shape
    block = query_block(tq, k.shape[1])

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_block(xs):
        q_i, qpos, qseg = xs
        return attention.masked(q_i, k, v, attention.mask(qpos, qseg, kv_pos, kv_seg, window))

    blocks = lambda x: jnp.swapaxes(x.reshape(b, tq // block, block, *x.shape[2:]), 0, 1)  # noqa: E731
    out = jax.lax.map(one_block, (blocks(q), blocks(q_pos), blocks(q_seg)))  # a loop: one block's scores at a time
    return jnp.swapaxes(out, 0, 1).reshape(b, tq, h, d)

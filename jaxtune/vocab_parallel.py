"""The embedding lookup and the cross-entropy with the vocabulary sharded, written with `shard_map`.

Left to the SPMD partitioner, a gather from a table sharded over (vocab: tensor, embed: fsdp) with
token ids sharded over the batch ends in an "involuntary full rematerialization": the whole table is
gathered onto every device. Here each device keeps its slice of the vocabulary: it looks up the ids
that fall in its slice (zeros elsewhere) and a sum over the `tensor` axis completes every row; the loss
takes a max and a sum of exponentials over the slices (two small all-reduces) instead of gathering
float32 logits. The `fsdp`-sharded hidden dimension of the table is gathered inside, one table at a
time, as FSDP gathers any weight: the output projection once for all the loss's chunks (gathered per
chunk, the backward gathered it again for every chunk: 16 GiB per step for Llama-3 at T=4096), so
its gradient is reduce-scattered once too (XLA:TPU, libtpu 0.0.42, still lowers that to an all-reduce on
v4-32; XLA:GPU keeps it). Without a mesh both are the plain computation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxtune import sharding


def _axes(entry) -> tuple:
    """The mesh axes one PartitionSpec entry names (none, one, or several)."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _slice_start(vocab_axes: tuple, rows: int):
    """The first vocabulary id of this device's slice."""
    return jax.lax.axis_index(vocab_axes) * rows if vocab_axes else 0


def embed(table, tokens):
    """table[tokens]: `table` [V, D] with logical axes ("vocab", "embed"), `tokens` [B, T]."""
    mesh = sharding.active_mesh()
    if mesh is None:
        return jnp.take(table, tokens, axis=0)
    table_spec = sharding.spec(("vocab", "embed"), table.shape, mesh)
    token_spec = sharding.spec(("batch", "length"), tokens.shape, mesh)
    vocab_axes, embed_axes = _axes(table_spec[0]), _axes(table_spec[1])

    def local(table, tokens):
        if embed_axes:
            table = jax.lax.all_gather(table, embed_axes, axis=1, tiled=True)
        rows = table.shape[0]
        ids = tokens - _slice_start(vocab_axes, rows)
        inside = (ids >= 0) & (ids < rows)
        found = jnp.where(inside[..., None], jnp.take(table, jnp.clip(ids, 0, rows - 1), axis=0), 0)
        return jax.lax.psum(found, vocab_axes) if vocab_axes else found

    return jax.shard_map(local, mesh=mesh, in_specs=(table_spec, token_spec),
                         out_specs=PartitionSpec(*token_spec, None))(table, tokens)


def chunked_cross_entropy_sum(hidden_nbcd, unembed, targets_nbc, weights_nbc):
    """Σ weights · (logsumexp(logits) − logits[target]) over all chunks, logits = hidden @ unembed in
    float32, one chunk of C tokens at a time: `hidden` [N, B, C, D], `unembed` [D, V] with logical axes
    ("embed", "vocab"), `targets` and `weights` [N, B, C]. A float32 scalar.

    Each device gathers its vocabulary slice of `unembed` over `fsdp` once, then loops over the chunks,
    each a `jax.checkpoint` (its logits are recomputed in the backward, never kept); the gathered slice
    is the loop's constant, so neither pass gathers it again per chunk, and its gradient is summed over
    the chunks and reduce-scattered back to the fsdp shards once."""
    mesh = sharding.active_mesh()
    if mesh is None:
        return _chunk_loop(hidden_nbcd, unembed, targets_nbc, weights_nbc, (), 0)
    unembed_spec = sharding.spec(("embed", "vocab"), unembed.shape, mesh)
    row_spec = sharding.spec(("batch", "length"), targets_nbc.shape[1:], mesh)
    embed_axes, vocab_axes = _axes(unembed_spec[0]), _axes(unembed_spec[1])
    batch_axes = tuple(a for entry in row_spec for a in _axes(entry))
    chunks = PartitionSpec(None, *row_spec)

    def local(hidden, unembed, targets, weights):
        if embed_axes:
            unembed = jax.lax.all_gather(unembed, embed_axes, axis=0, tiled=True)
        start = _slice_start(vocab_axes, unembed.shape[1])
        total = _chunk_loop(hidden, unembed, targets, weights, vocab_axes, start)
        return jax.lax.psum(total, batch_axes) if batch_axes else total

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(None, *row_spec, None), unembed_spec, chunks, chunks),
                         out_specs=PartitionSpec())(hidden_nbcd, unembed, targets_nbc, weights_nbc)


def _chunk_loop(hidden, unembed, targets, weights, vocab_axes: tuple, start):
    @jax.checkpoint
    def chunk(_, xs):  # no carry: inside a shard_map its type would have to vary over the batch axes
        h, t, w = xs
        return None, _token_losses(h, unembed, t, w, vocab_axes, start).sum()

    return jax.lax.scan(chunk, None, (hidden, targets, weights))[1].sum()


def _token_losses(hidden, unembed, targets, weights, vocab_axes: tuple, start):
    """Weighted token losses [B, C] from this device's vocabulary slice (the whole vocabulary when
    `vocab_axes` is empty); the max is a constant for the gradient, so it needs no derivative."""
    logits = jnp.einsum("BCD,DV->BCV", hidden, unembed.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if not vocab_axes:  # the whole vocabulary here: XLA keeps fewer float32 [B, C, V] buffers for this form
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return (jax.nn.logsumexp(logits, axis=-1) - target_logit) * weights
    peak = jax.lax.pmax(jax.lax.stop_gradient(logits.max(axis=-1)), vocab_axes)
    summed = jax.lax.psum(jnp.exp(logits - peak[..., None]).sum(axis=-1), vocab_axes)
    ids = targets - start
    inside = (ids >= 0) & (ids < logits.shape[-1])
    picked = jnp.take_along_axis(logits, jnp.clip(ids, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(inside, picked, 0.0), vocab_axes)
    return (jnp.log(summed) + peak - target_logit) * weights

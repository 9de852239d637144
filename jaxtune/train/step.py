"""The train and eval steps: pure functions of (trainable, frozen, optimizer state, batch, rng).

The loss is the sum of token losses over the whole accumulation group divided by its number of
supervised tokens (`supervised_per_micro_step` is that count / k: MultiSteps averages the k micro-gradients),
so k micro-batches with uneven token counts equal one big batch. Logits are computed in float32 one
sequence chunk at a time, so B x T x vocab float32 logits never exist at once. On one device the
chunk's gradient is computed in the forward pass, while its logits exist (`fused_cross_entropy`);
on a mesh of several devices the chunk is a `jax.checkpoint` and its logits are recomputed in the
backward (`vocab_parallel.chunked_cross_entropy_sum`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtune import context, sharding, vocab_parallel
from jaxtune.models.llama import Llama


def chunk_size(seq_len: int, wanted: int, multiple_of: int = 1) -> int:
    """The largest divisor of seq_len not above `wanted` (static shapes need an even split) that is a
    multiple of `multiple_of` (the context axis: a chunk spans its shards evenly; it divides seq_len)."""
    return max(c for c in range(multiple_of, max(wanted, multiple_of) + 1, multiple_of) if seq_len % c == 0)


def token_loss_sums(model: Llama, batch: dict, rng, loss_chunk: int):
    """(sum of weighted token cross-entropies, sum of weights), both float32 scalars."""
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
    unembed = model.unembed()
    b, t, d = hidden.shape
    cp = context.size()
    c = chunk_size(t, loss_chunk, multiple_of=cp)

    def split(x):  # [B, T, ...] -> [T/c, B, c, ...] for the scan
        if cp > 1:  # chunk n: tokens n, n + T/c, ...; each spans every context shard, none is gathered
            return jnp.moveaxis(x.reshape(b, c, t // c, *x.shape[2:]), 2, 0)
        return jnp.swapaxes(x.reshape(b, t // c, c, *x.shape[2:]), 0, 1)

    weights = batch["weights"].astype(jnp.float32)
    mesh = sharding.active_mesh()
    if mesh is None or mesh.size == 1:  # one device: the fused form, whose backward recomputes no logits
        return fused_cross_entropy(split(hidden), unembed, split(batch["targets"]), split(weights)), jnp.sum(weights)
    total = vocab_parallel.chunked_cross_entropy_sum(split(hidden), unembed, split(batch["targets"]), split(weights))
    return total, jnp.sum(weights)


def _chunk_logits(h, unembed):
    return jnp.einsum("BCD,DV->BCV", h, unembed.astype(h.dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def fused_cross_entropy(hidden_nbcd, unembed, targets_nbc, weights_nbc):
    """Σ weights · (logsumexp(h @ unembed) − logit[target]) over chunks [N, B, C, ...] in float32.

    Its gradient is computed in the forward pass, chunk by chunk, while each chunk's logits exist:
    d logits = (softmax − onehot(target)) · weight, then d hidden = d logits @ unembedᵀ (kept, [N, B, C, D]
    like the hidden states) and d unembed = Σ hiddenᵀ @ d logits (accumulated, only when the unembedding
    trains). The backward only scales them: the logits are never recomputed (Liger's fused linear
    cross-entropy). The value alone (eval) is the plain chunked loss."""
    def body(total, xs):
        h, targets, weights = xs
        logits = _chunk_logits(h, unembed)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return total + jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weights), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden_nbcd, targets_nbc, weights_nbc))[0]


def _fused_forward(hidden, unembed, targets, weights):
    unembed_trains = unembed.perturbed
    hidden, unembed, targets, weights = hidden.value, unembed.value, targets.value, weights.value

    def body(carry, xs):
        total, d_unembed = carry
        h, t, w = xs
        logits = _chunk_logits(h, unembed)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        onehot = jnp.arange(logits.shape[-1]) == t[..., None]
        d_logits = (jnp.exp(logits - lse[..., None]) - onehot) * w[..., None]
        d_h = jnp.einsum("BCV,DV->BCD", d_logits.astype(h.dtype), unembed.astype(h.dtype),
                         preferred_element_type=jnp.float32).astype(h.dtype)
        if unembed_trains:
            d_unembed = d_unembed + jnp.einsum("BCD,BCV->DV", h, d_logits.astype(h.dtype),
                                               preferred_element_type=jnp.float32)
        return (total + jnp.sum((lse - picked) * w), d_unembed), d_h

    d_unembed = jnp.zeros(unembed.shape, jnp.float32) if unembed_trains else None
    (total, d_unembed), d_hidden = jax.lax.scan(body, (jnp.zeros((), jnp.float32), d_unembed),
                                                (hidden, targets, weights))
    return total, (d_hidden, None if d_unembed is None else d_unembed.astype(unembed.dtype))


def _fused_backward(residuals, g):
    d_hidden, d_unembed = residuals
    return g.astype(d_hidden.dtype) * d_hidden, None if d_unembed is None else g.astype(d_unembed.dtype) * d_unembed, \
        None, None


fused_cross_entropy.defvjp(_fused_forward, _fused_backward, symbolic_zeros=True)


def accumulated_grad_norm(grads, opt_state: optax.MultiStepsState):
    """The norm of the gradient the update uses, before clipping (as MaxText logs it): MultiSteps keeps
    the running mean of the group's micro-gradients; this is that mean with `grads` included, so at a
    group's last micro-step it is exactly the accumulated gradient."""
    seen = opt_state.mini_step + 1
    mean = jax.tree.map(lambda acc, g: acc + (g - acc) / seen, opt_state.acc_grads, grads)
    return optax.tree_utils.tree_norm(mean)


def make_train_step(graphdef, optimizer: optax.MultiSteps, loss_chunk: int):
    def train_step(trainable, frozen, opt_state, batch, supervised_per_micro_step, rng, stop_flags=None):
        """`supervised_per_micro_step` = supervised tokens of the whole global batch / k. `stop_flags`
        (one int per batch row, each process filling its rows with the signal it received, 0 for none)
        come back as their max in the metrics: every process reads the same value with the loss, so all
        agree on a stop at the same step without a host round trip of their own."""
        def loss_fn(trainable):
            model = nnx.merge(graphdef, trainable, frozen)
            loss_sum, tokens = token_loss_sums(model, batch, rng, loss_chunk)
            return loss_sum / supervised_per_micro_step, (loss_sum, tokens)

        grads, (loss_sum, tokens) = jax.grad(loss_fn, has_aux=True)(trainable)
        grad_norm = accumulated_grad_norm(grads, opt_state)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss_sum": loss_sum, "tokens": tokens, "grad_norm": grad_norm,
                   "param_norm": optax.tree_utils.tree_norm(trainable)}  # non-finite = never checkpoint these
        if stop_flags is not None:
            metrics["stop"] = jnp.max(stop_flags)
        return trainable, opt_state, metrics

    return train_step


def make_eval_step(graphdef, loss_chunk: int):
    def eval_step(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        return token_loss_sums(model, batch, None, loss_chunk)

    return eval_step

"""The train and eval steps: pure functions of (trainable, frozen, optimizer state, batch, rng).

The loss is the sum of token losses over the whole accumulation group divided by its number of
supervised tokens (`supervised_per_micro_step` is that count / k: MultiSteps averages the k micro-gradients),
so k micro-batches with uneven token counts equal one big batch. Logits are computed in float32 one
sequence chunk at a time under `jax.checkpoint`, so B x T x vocab float32 logits never exist at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtune import vocab_parallel
from jaxtune.models.llama import Llama


def chunk_size(seq_len: int, wanted: int) -> int:
    """The largest divisor of seq_len not above `wanted` (static shapes need an even split)."""
    return max(c for c in range(1, min(wanted, seq_len) + 1) if seq_len % c == 0)


def token_loss_sums(model: Llama, batch: dict, rng, loss_chunk: int):
    """(sum of weighted token cross-entropies, sum of weights), both float32 scalars."""
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
    unembed = model.unembed()
    b, t, d = hidden.shape
    c = chunk_size(t, loss_chunk)

    def split(x):  # [B, T, ...] -> [T/c, B, c, ...] for the scan
        return jnp.swapaxes(x.reshape(b, t // c, c, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_loss(total, xs):
        h, targets, weights = xs
        return total + vocab_parallel.cross_entropy_sum(h, unembed, targets, weights), None

    weights = batch["weights"].astype(jnp.float32)
    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32),
                            (split(hidden), split(batch["targets"]), split(weights)))
    return total, jnp.sum(weights)


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

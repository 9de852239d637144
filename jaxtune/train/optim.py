"""The optax chain: clip_by_global_norm -> AdamW (no decay on norms and biases) with a warmup +
constant/linear/cosine schedule, wrapped in optax.MultiSteps for gradient accumulation."""
from __future__ import annotations

import math

import jax
import optax

from jaxtune.errors import JaxtuneError


def schedule(kind: str, peak_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "constant":
        after = optax.constant_schedule(peak_lr)
    elif kind == "linear":
        after = optax.linear_schedule(peak_lr, 0.0, decay_steps)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, decay_steps)
    else:
        raise JaxtuneError(f"train.schedule must be constant | linear | cosine, got {kind!r}")
    if warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, warmup_steps), after], [warmup_steps])


def decay_mask(params):
    """Weight decay on matrices only: never on norm scales or biases (by name: stacked norms are 2-D)."""
    def wants_decay(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any("norm" in n or n == "bias" for n in names)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def optimizer(lr_schedule: optax.Schedule, *, weight_decay: float, max_grad_norm: float, b1: float, b2: float,
              grad_accum_steps: int) -> optax.MultiSteps:
    chain = []
    if max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(max_grad_norm))
    chain.append(optax.adamw(lr_schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))
    return optax.MultiSteps(optax.chain(*chain), every_k_schedule=grad_accum_steps)


def auto_lr(base_lr: float, supervised_tokens_per_epoch: int, steps: int, epochs: float,
            pretrained_batch_tokens: int) -> tuple[float, str]:
    """The guide's rule: lr = base_lr * sqrt(supervised tokens per step / pretrained batch tokens),
    with supervised tokens per step = total supervised tokens / (steps / epochs). Returns (lr, arithmetic)."""
    per_step = supervised_tokens_per_epoch * epochs / max(steps, 1) if epochs else supervised_tokens_per_epoch / max(steps, 1)
    lr = base_lr * math.sqrt(per_step / pretrained_batch_tokens)
    text = (f"lr = base_lr * sqrt(supervised_tokens_per_step / pretrained_batch_tokens) = {base_lr:g} * "
            f"sqrt({per_step:,.0f} / {pretrained_batch_tokens:,}) = {lr:.3g}   "
            f"[supervised_tokens_per_step = {supervised_tokens_per_epoch:,} tokens/epoch x {epochs:g} epochs / {steps} steps]")
    return lr, text

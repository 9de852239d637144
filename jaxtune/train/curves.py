"""Learning curves and their diagnosis, by the guide's definitions:
underfit = training loss flat/high, or still falling at the end; overfit = training loss falling while
validation loss reaches a minimum and rises again (stop at the minimum); well-fit = both settle."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxtune.atomic import write_file
from jaxtune.paths import run_path
from jaxtune.train.metrics import points, read_metrics

FLAT = 0.02  # relative change below which a curve counts as flat
RISE = 0.02  # relative rise of eval loss above its minimum that counts as overfitting


COLLAPSE = 0.02  # relative distance of the loss from ln(vocab) (a uniform guess) that counts as collapsed


def diagnose(train: list[tuple[int, float]], evals: list[tuple[int, float]], *,
             grad_norms: list[float] | None = None, vocab_size: int | None = None) -> dict:
    """{'diagnosis': underfit|overfit|well-fit|collapsed|unknown, 'reason': ..., 'best_step': step of min eval loss}."""
    if len(train) < 4:
        return {"diagnosis": "unknown", "reason": "too few training points to judge", "best_step": None}
    losses = np.array([v for _, v in train])
    best_step = min(evals, key=lambda e: e[1])[0] if evals else None
    collapse = _collapse(losses, grad_norms, vocab_size)
    if collapse:
        return {"diagnosis": "collapsed", "best_step": best_step, "reason": collapse}
    if len(evals) >= 3:
        e = np.array([v for _, v in evals])
        i = int(np.argmin(e))
        if i < len(e) - 1 and e[-1] > e[i] * (1 + RISE) and losses[-1] < losses[0]:
            return {"diagnosis": "overfit", "best_step": best_step,
                    "reason": f"eval loss bottomed out at {e[i]:.4f} (step {best_step}) and rose to {e[-1]:.4f} "
                              f"while training loss kept falling: use the checkpoint at step {best_step}"}
    quarter = max(2, len(losses) // 4)
    head, tail = losses[:quarter].mean(), losses[-quarter:].mean()
    if (head - tail) / head < FLAT:
        return {"diagnosis": "underfit", "best_step": best_step,
                "reason": f"training loss is flat ({head:.4f} -> {tail:.4f}): raise the learning rate, the LoRA "
                          "rank, or train longer"}
    last_head, last_tail = losses[-2 * quarter:-quarter].mean(), tail
    if (last_head - last_tail) / last_head > FLAT:
        return {"diagnosis": "underfit", "best_step": best_step,
                "reason": f"training loss is still falling at the end ({last_head:.4f} -> {last_tail:.4f} over the "
                          "last quarter): train longer"}
    gap = ""
    if evals:
        gap = f"; eval {evals[-1][1]:.4f} vs train {tail:.4f}"
    return {"diagnosis": "well-fit", "best_step": best_step, "reason": f"training loss settled at {tail:.4f}{gap}"}


def diagnose_metrics(metrics: list[dict], vocab_size: int | None = None) -> dict:
    """`diagnose` on the events of metrics.jsonl."""
    norms = [m.get("grad_norm") for m in metrics if "loss" in m]
    return diagnose(points(metrics, "loss"), points(metrics, "eval_loss"),
                    grad_norms=None if None in norms else norms, vocab_size=vocab_size)


def _collapse(losses: np.ndarray, grad_norms: list[float] | None, vocab_size: int | None) -> str | None:
    """A loss pinned at ln(vocab) with (near) zero gradients: the model predicts a uniform
    distribution and cannot get out — the learning rate was too high, not too low."""
    if not vocab_size:
        return None
    uniform = float(np.log(vocab_size))
    tail = losses[-max(2, len(losses) // 4):]
    if not np.all(np.abs(tail - uniform) < COLLAPSE * uniform):
        return None
    if grad_norms is not None and len(grad_norms) == len(losses):
        if max(grad_norms[-len(tail):]) > 1e-3:
            return None
    elif not losses.min() < uniform * (1 - COLLAPSE):  # without gradients: it was better once
        return None
    return (f"training loss is pinned at {tail.mean():.4f} = ln({vocab_size}), a uniform guess, with vanishing "
            "gradients: the learning rate is too high; lower train.lr (e.g. 10x) and start a new run")


def plot(workdir: Path, metrics: list[dict] | None = None, vocab_size: int | None = None) -> Path:
    """curves.png: train and eval loss against step, learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(workdir) if metrics is None else metrics
    train, evals, lrs = points(metrics, "loss"), points(metrics, "eval_loss"), points(metrics, "lr")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        ax.plot([t[0] for t in train], [t[1] for t in train], label="train loss", color="tab:blue")
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if lrs:
        lr_ax = ax.twinx()
        lr_ax.plot([t[0] for t in lrs], [t[1] for t in lrs], color="tab:gray", alpha=0.5, label="lr")
        lr_ax.set_ylabel("learning rate")
    verdict = diagnose_metrics(metrics, vocab_size)
    ax.set_title(f"{run_path(workdir).name}: {verdict['diagnosis']}")
    ax.legend(loc="upper right")
    out = run_path(workdir) / "curves.png"
    fig.tight_layout()
    write_file(out, lambda f: fig.savefig(f, format="png"), binary=True)
    plt.close(fig)
    return out

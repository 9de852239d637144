"""Orbax checkpoints of what a run cannot recompute: trainable parameters, optimizer state (MultiSteps
accumulators included), and a small JSON record (step, data-iterator state, best eval). The frozen base
of a LoRA run is never copied: it is reloaded from model.path. The last `keep` are kept under
checkpoints/, the best eval one apart under best_checkpoint/; saving is asynchronous."""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxtune.errors import JaxtuneError


def _manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("trainable", "opt_state", "meta"))


def abstract_like(tree):
    """ShapeDtypeStructs with the same shardings: the restore target, so arrays land where they belong."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    def __init__(self, workdir: Path, keep: int):
        self.last = _manager(workdir / "checkpoints", keep)
        self.best = _manager(workdir / "best_checkpoint", 1)

    def save(self, step: int, trainable, opt_state, meta: dict, *, best: bool = False):
        args = ocp.args.Composite(trainable=ocp.args.StandardSave(trainable),
                                  opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta))
        (self.best if best else self.last).save(step, args=args, force=True)

    def latest_step(self) -> int | None:
        return self.last.latest_step()

    def restore(self, trainable, opt_state, step: int | None = None, *, best: bool = False):
        """(trainable, opt_state, meta) of `step` (default: the latest), placed like the given trees."""
        manager = self.best if best else self.last
        step = manager.latest_step() if step is None else step
        args = ocp.args.Composite(trainable=ocp.args.StandardRestore(abstract_like(trainable)),
                                  opt_state=ocp.args.StandardRestore(abstract_like(opt_state)),
                                  meta=ocp.args.JsonRestore())
        restored = manager.restore(step, args=args)
        return restored.trainable, restored.opt_state, restored.meta

    def restore_trainable(self, trainable, step: int | None = None, *, best: bool = False):
        """Only the trained parameters (for export): no optimizer state needed or read."""
        manager = self.best if best else self.last
        steps = manager.all_steps()
        where = manager.directory
        if not steps:
            raise JaxtuneError(f"{where}: no checkpoints; train first (`jaxtune train CONFIG.py`)")
        step = max(steps) if step is None else step
        if step not in steps:
            raise JaxtuneError(f"{where}: no checkpoint for step {step}; available: {sorted(steps)}")
        args = ocp.args.Composite(trainable=ocp.args.StandardRestore(abstract_like(trainable)))
        return manager.restore(step, args=args).trainable, step

    def wait(self):
        self.last.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        self.last.close()
        self.best.close()

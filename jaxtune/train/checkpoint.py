"""Orbax checkpoints of what a run cannot recompute: trainable parameters, optimizer state (MultiSteps
accumulators included), and a small JSON record (step, data-iterator state, best eval, checksums). The
frozen base of a LoRA run is never copied: it is reloaded from model.path. The last `keep` are kept
under checkpoints/, the best eval one apart under best_checkpoint/; saving is asynchronous.

What makes them trustworthy: each save records a checksum of every saved array, checked after every
restore, so a damaged checkpoint is found and skipped (moved to damaged_checkpoints/, never deleted)
instead of resuming from garbage; a save first checks the free disk space, and a failed asynchronous
save stops the run at the next step with one line, the previous checkpoints untouched.
"""
from __future__ import annotations

import errno
import logging
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils

from jaxtune.errors import JaxtuneError
from jaxtune.paths import is_remote, run_path

SPACE_MARGIN = 1.1  # orbax writes a little metadata beside the arrays


class _ReportedByJaxtune(logging.Filter):
    """A failed background save makes orbax log the same traceback from each of its threads (hundreds
    of lines), and asyncio report its never-awaited write futures at exit; `Checkpoints` raises that
    error itself as one line, so these copies are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if "orbax" in record.pathname:
            return False
        text = record.getMessage()
        return not ("never retrieved" in text and ("orbax" in text or "OCDBT" in text))


logging.getLogger("absl").addFilter(_ReportedByJaxtune())
logging.getLogger("asyncio").addFilter(_ReportedByJaxtune())
_previous_unraisablehook = sys.unraisablehook


def _drop_failed_save_noise(unraisable):
    """After a failed save, tensorstore completes orbax's pending writes on a closed event loop: a dozen
    'Event loop is closed' tracebacks about the same failure, which is reported as one line."""
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
        return
    _previous_unraisablehook(unraisable)


sys.unraisablehook = _drop_failed_save_noise


def _manager(directory: Path, keep: int | None, read_only: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=not read_only,
                                           create=not read_only, read_only=read_only,
                                           cleanup_tmp_directories=not read_only)  # partial saves of a killed run
    directory = directory if is_remote(directory) else directory.absolute()
    return ocp.CheckpointManager(directory, options=options, item_names=("trainable", "opt_state", "meta"))


def abstract_like(tree):
    """ShapeDtypeStructs with the same shardings: the restore target, so arrays land where they belong."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _bits(x):
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _weighted_sums(leaves):
    """Σ bits·(2i+1) mod 2³² per array: integer sums do not depend on the reduction order (so not on
    the mesh), and odd weights make any single changed word change the sum."""
    sums = []
    for x in leaves:
        bits = _bits(x).reshape(-1)
        sums.append(jnp.sum(bits * (jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1), dtype=jnp.uint32))
    return sums


def checksums(tree) -> dict[str, int]:
    """{array path: checksum of its bits} for a pytree of arrays (computed on device, read once)."""
    paths_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = jax.device_get(_weighted_sums([leaf for _, leaf in paths_leaves]))
    return {jax.tree_util.keystr(path): int(s) for (path, _), s in zip(paths_leaves, sums)}


def _first_mismatch(expected: dict[str, int], tree) -> str | None:
    got = checksums(tree)
    for path in sorted(set(expected) | set(got)):
        if expected.get(path) != got.get(path):
            return f"{path or 'array'} does not match the checksum recorded when it was saved"
    return None


def _nbytes(*trees) -> int:
    return sum(x.size * x.dtype.itemsize for tree in trees for x in jax.tree.leaves(tree))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e6:.2f} MB"


def _files(directory):
    for child in directory.iterdir():
        yield from _files(child) if child.is_dir() else [child]


class Checkpoints:
    def __init__(self, workdir: Path, keep: int, *, read_only: bool = False):
        self.workdir = run_path(workdir)
        self.read_only = read_only
        self.last = _manager(self.workdir / "checkpoints", keep, read_only)
        self.best = _manager(self.workdir / "best_checkpoint", 1, read_only)
        self.save_bytes = 0
        self.pending = {}  # id(manager) -> the step of its last asynchronous save

    def any(self) -> bool:
        return bool(self.last.all_steps() or self.best.all_steps())

    def save(self, step: int, trainable, opt_state, meta: dict, *, best: bool = False):
        """Save asynchronously after checking the disk; a step already on disk (a replay after a
        crash: the same computation again) is replaced rather than a collision."""
        self.wait()  # orbax would wait for the previous save anyway; this way its failure names its step
        manager = self.best if best else self.last
        directory = run_path(manager.directory)
        self.save_bytes = int(_nbytes(trainable, opt_state) * SPACE_MARGIN)
        free = None if is_remote(directory) else shutil.disk_usage(directory).free  # a bucket has no such figure
        if free is not None and free < self.save_bytes:
            raise JaxtuneError(self._failed(directory, step, f"not enough disk space: it needs about "
                                                            f"{_mb(self.save_bytes)}, {_mb(free)} free"))
        if step in manager.all_steps():
            manager.delete(step)
        meta = {**meta, "checksums": {"trainable": checksums(trainable), "opt_state": checksums(opt_state)}}
        args = ocp.args.Composite(trainable=ocp.args.StandardSave(trainable),
                                  opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(meta))
        try:
            manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - the synchronous part of the save: disk, permissions
            raise JaxtuneError(self._failed(directory, step, self._reason(e))) from None
        self.pending[id(manager)] = step

    def check(self):
        """Raise the error of a finished asynchronous save, if any, as one line (cheap: no waiting)."""
        self._each_manager("check_for_errors")

    def wait(self):
        """Block until pending saves are written; a failed one raises as one line."""
        self._each_manager("wait_until_finished")

    def _each_manager(self, method: str):
        for manager in (self.last, self.best):
            try:
                getattr(manager, method)()
            except Exception as e:  # noqa: BLE001 - orbax re-raises what its save threads met
                raise JaxtuneError(self._failed(run_path(manager.directory), self.pending.get(id(manager)),
                                                self._reason(e))) from None

    def _reason(self, error: BaseException) -> str:
        chain, e = [], error
        while e is not None and len(chain) < 10:
            chain.append(e)
            e = e.__cause__ or e.__context__
        if any(isinstance(c, OSError) and c.errno == errno.ENOSPC or "No space left" in str(c) for c in chain):
            return f"no space left on the device (a checkpoint needs about {_mb(self.save_bytes)})"
        text = str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__]
        return text[0][:300]

    def _failed(self, directory: Path, step: int | None, reason: str) -> str:
        kept = sorted(int(p.name) for p in directory.glob("[0-9]*") if p.name.isdigit())
        last = f"the last complete checkpoint is step {kept[-1]}" if kept else "no complete checkpoint exists yet"
        at = f" of step {step}" if step is not None else ""
        return (f"saving the checkpoint{at} to {directory} failed: {reason}. Training stopped; {last}. "
                "Free space (or fix the disk), then re-run the same command to resume")

    # --- restore -------------------------------------------------------------------------------------

    def _restore_verified(self, manager, step: int, trainable, opt_state=None):
        """(trainable, opt_state or None, meta) of `step`, or raise ValueError saying what is damaged."""
        items = {"trainable": ocp.args.StandardRestore(abstract_like(trainable)), "meta": ocp.args.JsonRestore()}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_like(opt_state))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - missing or unreadable files, bad metadata
            raise ValueError(f"unreadable ({self._reason(e)})") from None
        meta = restored.meta
        if not isinstance(meta, dict) or "step" not in meta:
            raise ValueError("its record (meta) is missing or damaged")
        sums = meta.get("checksums")
        trees = {"trainable": restored.trainable}
        if opt_state is not None:
            trees["opt_state"] = restored.opt_state
        for name, tree in trees.items():
            if sums is not None:  # checkpoints written before checksums existed are only checked below
                problem = _first_mismatch(sums[name], tree)
                if problem:
                    raise ValueError(f"{name} {problem}")
        if not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(restored.trainable)
                   if jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError("it holds NaN or infinite parameters")
        return restored.trainable, restored.opt_state if opt_state is not None else None, meta

    def restore_latest(self, trainable, opt_state):
        """(trainable, opt_state, meta) of the newest checkpoint that verifies, or None when there are
        none. Damaged newer ones are moved to damaged_checkpoints/ with a warning, so replaying their
        steps cannot collide with them; if every checkpoint is damaged nothing is moved and it fails."""
        damaged = []
        for step in sorted(self.last.all_steps(), reverse=True):
            try:
                result = self._restore_verified(self.last, step, trainable, opt_state)
            except ValueError as e:
                damaged.append((step, str(e)))
                continue
            for bad, reason in damaged:  # every process found the same; process 0 moves them
                moved = self._quarantine(bad) if jax.process_index() == 0 else "damaged_checkpoints/"
                print(f"warning: checkpoint {self.workdir / 'checkpoints' / str(bad)} is damaged ({reason}); "
                      f"skipped and moved to {moved}; resuming from step {step}")
            if damaged:
                multihost_utils.sync_global_devices("jaxtune: damaged checkpoints moved")
                self.last.reload()
            return result
        if damaged:
            listing = "; ".join(f"step {s}: {r}" for s, r in damaged)
            raise JaxtuneError(f"every checkpoint in {self.workdir / 'checkpoints'} is damaged ({listing}); nothing "
                               "was changed. Move the workdir aside to start over")
        return None

    def _quarantine(self, step: int) -> Path:
        target_root = self.workdir / "damaged_checkpoints"
        target_root.mkdir(exist_ok=True)
        target, n = target_root / str(step), 1
        while target.exists():
            target, n = target_root / f"{step}.{n}", n + 1
        source = self.workdir / "checkpoints" / str(step)
        if is_remote(source):  # objects under a prefix: copied and removed through epath, whose cached
            for file in _files(source):  # listings orbax reads (gcsfs' own mv leaves them stale)
                file.copy(target / file.relative_to(source))
            source.rmtree()
        else:
            shutil.move(str(source), target)
        return target

    def restore_trainable(self, trainable, step: int | None = None, *, best: bool = False):
        """Only the trained parameters (for export), verified: no optimizer state needed or read."""
        manager = self.best if best else self.last
        steps = manager.all_steps()
        where = manager.directory
        if not steps:
            raise JaxtuneError(f"{where}: no checkpoints; train first (`jaxtune train CONFIG.py`)")
        step = max(steps) if step is None else step
        if step not in steps:
            raise JaxtuneError(f"{where}: no checkpoint for step {step}; available: {sorted(steps)}")
        try:
            restored, _, _ = self._restore_verified(manager, step, trainable)
        except ValueError as e:
            others = sorted(set(steps) - {step})
            raise JaxtuneError(f"{where}/{step}: damaged ({e}); "
                               + (f"export another step with --step (available: {others})" if others else
                                  "no other checkpoint to export")) from None
        return restored, step

    def close(self):
        self.last.close()
        self.best.close()

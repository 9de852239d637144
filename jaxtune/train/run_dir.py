"""The run directory as something to protect: one training at a time, writable before a model
loads, and an identity that every resume checks before anything is written.

Identity = what the checkpoints are only meaningful with: a fingerprint of the base model
(config.json, every safetensors header and the first and last MiB of its tensor data) and of the
packed training data, plus the config keys that shape the trained arrays or the data order. A change
of those is refused with one line naming it; a change of the optimisation plan (more steps, a new
learning rate) is accepted only when named in `resume.allow_changes`; everything else (eval, logging,
mesh, remat) may change freely.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxtune.config import flatten
from jaxtune.errors import JaxtuneError
from jaxtune.paths import is_remote, run_path

if TYPE_CHECKING:
    from jaxtune.data import packing

# Checkpoints cannot continue under another value of these: the trained arrays or the data stream differ.
FIXED_KEYS = ("method", "seed", "model.param_dtype", "lora.rank", "lora.alpha", "lora.targets", "lora.rslora",
              "lora.init_from", "lora.modules_to_save", "data.format", "data.seq_len", "data.train_on_inputs",
              "data.overlong", "data.chat_template", "train.micro_batch_size", "train.grad_accum_steps",
              "quant.block_size", "quant.double_quant", "quant.dense_modules")
# A deliberate change of these is meaningful (train longer, lower the learning rate): allowed when named.
PLAN_KEYS = ("train.max_steps", "train.epochs", "train.lr", "train.base_lr", "train.pretrained_batch_tokens",
             "train.schedule", "train.warmup_steps", "train.weight_decay", "train.max_grad_norm", "train.b1",
             "train.b2", "lora.dropout", "data.val", "data.val_fraction", "eval.early_stopping_patience")
FINGERPRINT_BYTES = 1 << 20


class WorkdirLock:
    """An exclusive `flock` on WORKDIR/.lock: the kernel releases it when the process dies, so a crashed
    run never leaves it stuck, and a second training on the same workdir is refused at once.
    A bucket has no such lock: there, one run per workdir is the user's (or babysit.sh's) rule."""

    def __init__(self, workdir: Path, *, held: bool = True):
        self.path = Path(workdir) / ".lock"
        self.held = held and not is_remote(workdir)
        self.file = None

    def __enter__(self):
        if not self.held:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:
            raise JaxtuneError(f"workdir {self.path.parent} is not writable ({e.strerror}); point workdir at a "
                               "directory you can write to") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise JaxtuneError(f"workdir {self.path.parent} is in use by another training ({holder}); wait for it to "
                               "finish or stop it, or use another workdir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def check_writable(workdir: Path) -> None:
    """Fail now, not after a model has loaded, when the workdir cannot take files."""
    probe = run_path(workdir) / f".write-test-{socket.gethostname()}-{os.getpid()}"  # hosts of a pod may share it
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - OSError locally; gcsfs raises its own (no bucket, no permission)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise JaxtuneError(f"workdir {workdir} is not writable ({reason}); point workdir at a directory (or bucket) "
                           "you can write to") from None


def model_fingerprint(model_dir: Path) -> str:
    """Cheap even for a 70B checkpoint: config.json, and per safetensors file its header (names,
    shapes, dtypes, offsets) plus the first and last MiB of the tensor data."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(header_len))
            h.update(f.read(FINGERPRINT_BYTES))
            size = file.stat().st_size
            f.seek(max(8 + header_len, size - FINGERPRINT_BYTES))
            h.update(f.read())
    return h.hexdigest()[:16]


def data_fingerprint(rows: packing.Packed | dict[str, np.ndarray]) -> str:
    """The packed training rows themselves: any change of data, tokenizer or packing shows."""
    if not isinstance(rows, dict):
        return rows.digest()
    h = hashlib.sha256()
    for name in sorted(rows):
        h.update(name.encode())
        h.update(np.ascontiguousarray(rows[name]).tobytes())
    return h.hexdigest()[:16]


def identity(model_dir: Path, rows: packing.Packed | dict[str, np.ndarray]) -> dict:
    return {"model": model_fingerprint(model_dir), "data": data_fingerprint(rows)}


def check_resume(workdir: Path, flat_cfg: dict, ident: dict, allow_changes: list[str]) -> None:
    """Compare this run with the one whose checkpoints are in `workdir`; raise one line on a change
    the checkpoints cannot follow. Called before anything is written."""
    saved_file = run_path(workdir) / "config.json"
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, ValueError):
        raise JaxtuneError(f"{saved_file}: missing or unreadable, so the checkpoints in {workdir} cannot be checked "
                           "against this config; use a new workdir") from None
    before = saved.get("identity")
    if before is None:
        print(f"warning: {workdir} predates run identities: the base model and data are not checked on this resume")
    else:
        if before["model"] != ident["model"]:
            raise JaxtuneError(f"resume refused: model.path {flat_cfg['model.path']} is not the base model the "
                               f"checkpoints in {workdir} were trained on ({saved['model']['path']}; fingerprint "
                               f"{before['model']} vs {ident['model']}); point model.path back at it or use a new workdir")
        if before["data"] != ident["data"]:
            raise JaxtuneError(f"resume refused: the packed training data differ from those the checkpoints in {workdir} "
                               "were trained on (data files, tokenizer or data.* options changed); restore them or "
                               "use a new workdir")
    saved_flat = flatten({k: v for k, v in saved.items() if k not in ("resolved", "identity")})
    for key in FIXED_KEYS:
        if key in saved_flat and saved_flat[key] != flat_cfg[key]:
            raise JaxtuneError(f"resume refused: {key} changed from {saved_flat[key]!r} to {flat_cfg[key]!r}, which "
                               f"the checkpoints in {workdir} cannot continue with; set it back or use a new workdir")
    for key in PLAN_KEYS:
        if key in saved_flat and saved_flat[key] != flat_cfg[key] and key not in allow_changes:
            raise JaxtuneError(f"resume refused: {key} changed from {saved_flat[key]!r} to {flat_cfg[key]!r} since the "
                               f"checkpoints in {workdir} were written; to continue with the new value pass "
                               f"--config.resume.allow_changes={key}, or set it back")


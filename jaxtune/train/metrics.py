"""metrics.jsonl: one JSON object per log or eval event (step, loss, lr, grad_norm, tokens, tokens_per_s /
eval_loss), appended as training goes, optionally mirrored to TensorBoard; and reading it back."""
from __future__ import annotations

import json
from pathlib import Path

from jaxtune.atomic import write_text
from jaxtune.errors import JaxtuneError
from jaxtune.paths import is_remote, run_path


class MetricsLog:
    def __init__(self, workdir: Path, resume_step: int | None, tensorboard: bool, *, writer: bool = True):
        """Keep the events up to the resumed step (none on a fresh start): the steps after it are redone.
        Every process keeps the events (the diagnosis reads them); only the `writer` (process 0) writes."""
        self.path = run_path(workdir) / "metrics.jsonl"
        kept = [m for m in read_metrics(workdir) if resume_step is not None and m["step"] <= resume_step]
        self.writer = writer
        if writer:
            write_text(self.path, "".join(json.dumps(m) + "\n" for m in kept))
        self.events = kept
        self.tb = None
        if tensorboard and writer:
            from tensorboardX import SummaryWriter  # optional

            self.tb = SummaryWriter(str(run_path(workdir) / "tensorboard"))

    def write(self, event: dict):
        self.events.append(event)
        if not self.writer:
            return
        if is_remote(self.path):  # an object cannot be appended to: upload the whole (small) log again
            write_text(self.path, "".join(json.dumps(m) + "\n" for m in self.events))
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(event) + "\n")
        if self.tb:
            for k, v in event.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, event["step"])


def points(events: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every event that has `key` ('loss', 'eval_loss', 'lr', ...)."""
    return [(m["step"], m[key]) for m in events if key in m]


def read_metrics(workdir: Path) -> list[dict]:
    """The events of metrics.jsonl. An append-only log killed mid-write ends in a torn line: that
    last line is dropped with a warning; a damaged line elsewhere is an error naming file:line."""
    path = run_path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    events = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            if not isinstance(event, dict) or not isinstance(event.get("step"), int):
                raise ValueError("not an event with a step")
        except ValueError as e:
            if n == len(lines):
                print(f"warning: {path}:{n}: incomplete last line (a write was cut short); ignored")
                continue
            raise JaxtuneError(f"{path}:{n}: damaged line ({e}); remove that line to go on") from None
        events.append(event)
    return events

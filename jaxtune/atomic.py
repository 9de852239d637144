"""Directories that appear whole or not at all: built in a temporary sibling, then renamed."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_dir(target: str | os.PathLike, build, *, replace: bool = True) -> Path:
    """Call build(tmp_dir), then rename tmp_dir to `target` (replacing an old one if `replace`, else
    keeping it and skipping the build). A crash or error leaves `target` as it was."""
    target = Path(target)
    if target.is_dir() and not replace:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the result from other users (e.g. a server)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

"""Run directories on local disk or in a bucket behind one path type.

A `gs://` (or other fsspec URL) workdir is an `etils.epath.Path` — the path type orbax itself uses,
backed by gcsfs — so the code that writes config.json, metrics.jsonl, curves.png and the checkpoints
is the same for both. What an object store cannot do is decided here once: it has no `flock`, no
append and no free-space figure, and a single object upload is already atomic (it appears whole or
not at all), so no temporary-file rename is needed there.
"""
from __future__ import annotations

import os
from pathlib import Path

from jaxtune.errors import JaxtuneError


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def run_path(path: str | os.PathLike):
    """A pathlib.Path for a local path, an epath.Path for a URL such as gs://bucket/run."""
    if not is_remote(path):
        return Path(path)
    from etils import epath

    if str(path).startswith("gs://"):
        try:
            import gcsfs  # noqa: F401 - epath's gs:// backend when TensorFlow is absent
        except ImportError:
            raise JaxtuneError(f"{path}: a gs:// path needs gcsfs; pip install 'jaxtune[gcs]' (or gcsfs)") from None
    return epath.Path(str(path))

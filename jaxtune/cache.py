"""Where jaxtune caches what it can rebuild: the demo assets and the tokenized data."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$JAXTUNE_CACHE, default ~/.cache/jaxtune."""
    return Path(os.environ.get("JAXTUNE_CACHE", Path.home() / ".cache" / "jaxtune")).expanduser()

"""Where sgl_kvtier keeps what it builds or converts (model directories, the driver shim)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$KVTIER_CACHE_DIR``, else ``$XDG_CACHE_HOME/sgl_kvtier``, else ``~/.cache/sgl_kvtier``."""
    explicit = os.environ.get("KVTIER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sgl_kvtier"

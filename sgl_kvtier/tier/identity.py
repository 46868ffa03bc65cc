"""What a model's chunks are tied to: the weights that computed them.

Part of every chunk key (through :class:`~sgl_kvtier.tier.layout.ModelFingerprint`), so a
tier directory can hold several models and never serves KV computed by other weights: a
fine-tune with the same architecture has other weight files, hence other keys.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

__all__ = ["model_identity"]

_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


def model_identity(model_path: str, load_format: str = "auto", revision: str | None = None) -> str:
    """A short stable name for the weights at ``model_path``.

    A local directory is identified by its ``config.json`` and the names and sizes of its
    weight files (not their modification times: a copied model keeps its chunks). Hub
    names are identified by name and revision. SGLang's random ``dummy`` weights are
    seeded, so they are identified like a directory without weight files.
    """
    path = Path(model_path).expanduser()
    h = hashlib.sha256(json.dumps({"load_format": load_format, "revision": revision}).encode())
    if path.is_dir():
        config = path / "config.json"
        h.update(config.read_bytes() if config.is_file() else b"")
        for pattern in _WEIGHTS:
            for f in sorted(path.glob(pattern)):
                h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    else:
        h.update(model_path.encode())
    return f"{path.name or model_path}@{h.hexdigest()[:16]}"

"""What a model's chunks are tied to: the weights that computed them, by content.

Part of every chunk key (through :class:`~sgl_kvtier.tier.layout.ModelFingerprint`), so a
tier folder can hold several models and never serves KV computed by other weights. Names
and sizes are not enough: a fine-tune has the same folder name, config and file sizes as
its base, and new weights can be copied over old ones. So each weight file contributes a
digest of its content: for safetensors files the whole header (tensor names, dtypes,
shapes, offsets) plus the first, middle and last 4 KiB of every tensor (any fine-tune
that changes a tensor changes those bytes); for other formats 64 samples of 4 KiB spread
over the file. That reads about 12 KiB per tensor, once: the digest is cached per file
under the user's cache folder, keyed by device, inode, size, modification and change time
(``ctime`` cannot be set back, so overwritten weights are always hashed again).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from sgl_kvtier.paths import cache_dir

__all__ = ["model_identity", "file_digest"]

_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_SAMPLE = 4096
_SAMPLES_PER_FILE = 64
_MAX_HEADER = 100 << 20  # safetensors' own limit on its JSON header


def model_identity(model_path: str, load_format: str = "auto", revision: str | None = None,
                   settings: dict | None = None) -> str:
    """A short stable name for the weights at ``model_path`` and the settings that change
    the KV they compute.

    Parameters
    ----------
    model_path
        A local folder (identified by ``config.json`` and the content digest of each
        weight file) or a hub name (identified by name and revision).
    load_format
        SGLang's ``--load-format``; ``dummy`` weights are seeded, so a folder without
        weight files is identified by its config alone.
    settings
        Everything else that changes the KV of the same weights: quantization, model
        overrides, compute dtype... (any JSON-serialisable values).
    """
    path = Path(model_path).expanduser()
    h = hashlib.sha256(json.dumps({"load_format": load_format, "revision": revision,
                                   "settings": settings or {}}, sort_keys=True,
                                  default=str).encode())
    if path.is_dir():
        config = path / "config.json"
        h.update(config.read_bytes() if config.is_file() else b"")
        cache = _DigestCache(cache_dir() / "weight-digests.json")
        for pattern in _WEIGHTS:
            for f in sorted(path.glob(pattern)):
                h.update(f"{f.name}:{cache.digest(f)}\n".encode())
        cache.save()
    else:
        h.update(model_path.encode())
    return f"{path.name or model_path}@{h.hexdigest()[:16]}"


def file_digest(path: Path) -> str:
    """Content digest of one weight file (see the module docstring for what is read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(struct.pack("<Q", size))
        ranges = _safetensors_ranges(f, size) if path.suffix == ".safetensors" else None
        if ranges is None:
            ranges = _spread(0, size, _SAMPLES_PER_FILE)
        for start, length in ranges:
            h.update(os.pread(f.fileno(), length, start))
    return h.hexdigest()


def _safetensors_ranges(f, size: int) -> list[tuple[int, int]] | None:
    """The header and three samples of every tensor; None if not a safetensors file."""
    head = os.pread(f.fileno(), 8, 0)
    if len(head) != 8:
        return None
    header_len = struct.unpack("<Q", head)[0]
    if header_len > min(_MAX_HEADER, size - 8):
        return None
    try:
        header = json.loads(os.pread(f.fileno(), header_len, 8))
    except (ValueError, UnicodeDecodeError):
        return None
    ranges = [(0, 8 + header_len)]
    base = 8 + header_len
    for name in sorted(header):
        offsets = header[name].get("data_offsets") if isinstance(header[name], dict) else None
        if offsets and len(offsets) == 2:
            ranges += _spread(base + offsets[0], offsets[1] - offsets[0], 3)
    return ranges


def _spread(start: int, length: int, samples: int) -> list[tuple[int, int]]:
    """``samples`` ranges of up to 4 KiB evenly over ``[start, start + length)``."""
    if length <= _SAMPLE * samples:
        return [(start, length)]
    step = (length - _SAMPLE) // (samples - 1)
    return [(start + i * step, _SAMPLE) for i in range(samples)]


class _DigestCache:
    """File digests by (device, inode, size, mtime, ctime), in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._entries: dict = json.loads(path.read_text())
        except (OSError, ValueError):
            self._entries = {}
        self._dirty = False

    def digest(self, file: Path) -> str:
        st = file.stat()
        real = os.path.realpath(file)
        stamp = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = self._entries.get(real)
        if isinstance(entry, dict) and entry.get("stamp") == stamp:
            return entry["digest"]
        digest = file_digest(file)
        self._entries[real] = {"stamp": stamp, "digest": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._entries))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache only: the next start hashes again

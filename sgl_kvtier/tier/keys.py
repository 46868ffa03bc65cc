"""Chained chunk keys and the only mapping from a key to a path.

A chunk key is the SHA-256 of (fingerprint, namespace, previous key, chunk tokens), so a
key names a whole prefix, not only its own tokens: two prompts share chunk *i*'s key only
if they share every token up to the end of chunk *i*, the model, the rank and the tenant.
Keys are 64-character lowercase hex strings; a path is derived only from a key that
passed :func:`check_key`, which is what keeps every path inside the tier root.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .layout import ModelFingerprint

__all__ = ["TokenIds", "chunk_keys", "token_digest", "check_key", "chunk_path", "temp_name",
           "temp_writer",
           "is_chunk_name", "is_temp_name", "CHUNK_SUFFIX"]

TokenIds = Sequence[int] | np.ndarray | torch.Tensor

CHUNK_SUFFIX = ".kvc"
# Temporary files start with a dot and end in ".tmp": neither matches _CHUNK_NAME.
_TEMP_PREFIX, _TEMP_SUFFIX = ".", ".tmp"
_KEY = re.compile(r"[0-9a-f]{64}")
_CHUNK_NAME = re.compile(r"[0-9a-f]{64}\.kvc")
_DOMAIN = b"sgl_kvtier.chunk.v1\0"
_NO_PREVIOUS = bytes(32)


def _token_bytes(token_ids: TokenIds) -> bytes:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    array = np.asarray(token_ids)
    if array.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {array.shape}")
    # Fixed width and byte order, so a key does not depend on the caller's integer type.
    return array.astype("<i8", copy=False).tobytes()


def token_digest(token_ids: TokenIds) -> bytes:
    """32-byte SHA-256 of ``token_ids`` ``(tokens,)`` as little-endian int64."""
    return hashlib.sha256(_token_bytes(token_ids)).digest()


def chunk_keys(fingerprint: ModelFingerprint, namespace: str | None, token_ids: TokenIds,
               chunk_tokens: int) -> list[str]:
    """Keys of the full chunks of ``token_ids``; a partial tail chunk gets no key.

    Parameters
    ----------
    fingerprint
        The model and rank whose KV the chunks hold.
    namespace
        Tenant scope (SGLang's ``extra_key`` / cache salt); ``None`` and ``""`` are the same.
    token_ids
        ``(tokens,)`` integer token ids of the whole prompt, from its first token.
    chunk_tokens
        Tokens per chunk.

    Returns
    -------
    list[str]
        ``tokens // chunk_tokens`` hex keys; key *i* covers tokens ``[0, (i + 1) * chunk_tokens)``.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    raw = _token_bytes(token_ids)
    scope = (namespace or "").encode()
    base = hashlib.sha256(_DOMAIN + fingerprint.digest + struct.pack("<Q", len(scope)) + scope)
    step = chunk_tokens * 8
    keys, previous = [], _NO_PREVIOUS
    for start in range(0, len(raw) - step + 1, step):
        h = base.copy()
        h.update(previous)
        h.update(raw[start:start + step])
        previous = h.digest()
        keys.append(previous.hex())
    return keys


def check_key(key: str) -> str:
    """Return ``key`` if it is a 64-character lowercase hex digest, else raise ``ValueError``."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"not a chunk key: {key!r}")
    return key


def chunk_path(root: Path, key: str) -> Path:
    """``root/<first two hex digits>/<key>.kvc``: 256 shard directories keep listings short."""
    check_key(key)
    return root / key[:2] / f"{key}{CHUNK_SUFFIX}"


def temp_name(final_name: str) -> str:
    """A temporary name beside the chunk file ``final_name``, unique to this process and
    write: ``.<key>.<pid>.<random>.tmp`` (see :func:`temp_writer`)."""
    stem = final_name.removesuffix(CHUNK_SUFFIX)
    return f"{_TEMP_PREFIX}{stem}.{os.getpid()}.{os.urandom(4).hex()}{_TEMP_SUFFIX}"


def temp_writer(name: str) -> int | None:
    """The process id that created the temporary file ``name``, if it names one."""
    parts = name.removesuffix(_TEMP_SUFFIX).split(".")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def is_chunk_name(name: str) -> bool:
    return _CHUNK_NAME.fullmatch(name) is not None


def is_temp_name(name: str) -> bool:
    return name.startswith(_TEMP_PREFIX) and name.endswith(_TEMP_SUFFIX)

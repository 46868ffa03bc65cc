"""What a model's KV looks like: the fingerprint that scopes keys, and one chunk's shape."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch

__all__ = ["ModelFingerprint", "ChunkLayout", "KV_AXES"]

# Axis order of a packed chunk payload. Part of the fingerprint, so a change of packing
# can never read back chunks written with the old one.
KV_AXES = "layer,kv,token,head,dim"


def dtype_name(dtype: str | torch.dtype) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``, rejecting unknown names."""
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}")
    return name


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything that makes one rank's KV bytes incompatible with another's.

    Two processes produce the same chunk keys only when every field matches.

    ``dtype`` is how the pool stores KV (the bytes of a chunk: ``uint8`` for both fp8
    formats); ``kv_dtype`` is what those bytes mean (``float8_e4m3fn`` or
    ``float8_e5m2``), empty when it is ``dtype`` itself. ``model`` is the weights'
    content identity plus the settings that change KV (see :mod:`.identity`).
    """

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int = 0
    tp_size: int = 1
    layout: str = KV_AXES
    kv_dtype: str = ""
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if self.kv_dtype:
            object.__setattr__(self, "kv_dtype", dtype_name(self.kv_dtype))
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.tp_size,
               self.pp_size) <= 0:
            raise ValueError(f"layer, head, head_dim, tp_size and pp_size must be positive: "
                             f"{self}")
        if not 0 <= self.tp_rank < self.tp_size or not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"rank outside its size: {self}")

    @property
    def digest(self) -> bytes:
        """32-byte SHA-256 of a canonical JSON encoding; stable across processes."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).digest()

    def chunk_layout(self, tokens: int) -> ChunkLayout:
        """The layout of one chunk of ``tokens`` tokens of this model on this rank."""
        return ChunkLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, tokens)


@dataclass(frozen=True)
class ChunkLayout:
    """Shape of one chunk payload: ``(num_layers, 2, tokens, num_kv_heads, head_dim)``.

    The 2 is keys then values. The payload is that tensor's bytes, C-contiguous.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    tokens: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtype_name(self.dtype))
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.tokens) <= 0:
            raise ValueError(f"every dimension must be positive: {self}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.tokens, self.num_kv_heads, self.head_dim)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.torch_dtype.itemsize * math.prod(self.shape)

    def view(self, payload: torch.Tensor) -> torch.Tensor:
        """The ``(nbytes,)`` uint8 ``payload`` as a ``shape`` tensor of ``dtype`` (no copy)."""
        return payload.view(self.torch_dtype).view(self.shape)

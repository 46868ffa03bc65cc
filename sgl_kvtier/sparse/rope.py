"""Rotary position embedding, forward and inverse, from a model's configuration.

SGLang's KV pool holds keys *after* RoPE, but a low-rank basis shared by all positions only
exists for keys *before* it (RoPE turns every position's key by a different angle). A
rotation is undone exactly by the opposite rotation, so the pre-RoPE keys are recovered from
the pool with no hook in the model: ``invert(apply(k, p), p) == k`` up to rounding.

Only the "neox" layout (the two halves of the rotary dimensions pair up, as Llama, Qwen and
Mistral use in SGLang and transformers) is implemented; :func:`rotary_from_config` refuses
other layouts and scaling types by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Rotary", "rotary_from_config", "inv_freq"]


def inv_freq(rotary_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotary dimension pairs, float64 ``(rotary_dim // 2,)``.

    ``scaling`` is the model's ``rope_scaling`` (or ``rope_parameters``) mapping; types
    ``default`` and ``llama3`` (Llama 3.1's long-context smoothing) are supported.
    """
    freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return freq
    if kind != "llama3":
        raise ValueError(f"rope scaling type {kind!r} is not supported by sparse decode "
                         f"(supported: default, llama3)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    # Short wavelengths stay, long ones are slowed by `factor`, the band between blends.
    blend = ((original / wavelen - low) / (high - low)).clamp(0, 1)
    return blend * freq + (1 - blend) * freq / factor


@dataclass(frozen=True)
class Rotary:
    """The rotation of one model's attention heads.

    Attributes
    ----------
    head_dim : int
        ``D``; dimensions ``rotary_dim ..`` pass through unrotated.
    inv_freq : torch.Tensor
        float64 ``(rotary_dim // 2,)``.
    """

    head_dim: int
    inv_freq: torch.Tensor
    # On CPU, [cos, sin] of positions 0.. as computed below, grown on demand: decode
    # rebuilds a few chunks per layer per step, where the transcendental calls dominated.
    _table: list = field(default_factory=list, compare=False, repr=False)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``cos, sin`` of shape ``(T, rotary_dim // 2)`` for ``positions (T,)``."""
        if positions.device.type != "cpu" or positions.numel() == 0:
            return self._angles(positions)
        needed = int(positions.max()) + 1
        if not self._table or self._table[0].shape[0] < needed:
            size = max(needed, 2 * (self._table[0].shape[0] if self._table else 0), 4096)
            self._table[:] = self._angles(torch.arange(size))
        return self._table[0][positions], self._table[1][positions]

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = positions.to(torch.float64)[:, None] * self.inv_freq.to(positions.device)
        return angle.cos().float(), angle.sin().float()

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x (T, H, D)`` to ``positions (T,)``; float32 result.

        ``positions`` may also have ``x``'s shape without ``D`` (one position per vector).
        """
        return self._turn(x, positions, 1.0)

    def invert(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply`: ``x (T, H, D)`` rotated at ``positions`` back to angle zero."""
        return self._turn(x, positions, -1.0)

    def _turn(self, x: torch.Tensor, positions: torch.Tensor, sign: float) -> torch.Tensor:
        assert x.shape[-1] == self.head_dim, x.shape
        if positions.shape != x.shape[:-1]:
            assert x.dim() == 3 and positions.shape == (x.shape[0],), (positions.shape, x.shape)
            positions = positions[:, None].expand(x.shape[:-1])
        cos, sin = self.cos_sin(positions.reshape(-1))
        cos = cos.view(*x.shape[:-1], -1)
        sin = sign * sin.view(*x.shape[:-1], -1)
        half = self.rotary_dim // 2
        x = x.float()
        a, b, rest = x[..., :half], x[..., half:self.rotary_dim], x[..., self.rotary_dim:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def rotary_from_config(config: dict) -> Rotary:
    """:class:`Rotary` of a Hugging Face ``config.json`` mapping (Llama-style models).

    Raises
    ------
    ValueError
        Naming the key, for a layout or scaling this module does not implement.
    """
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    partial = config.get("partial_rotary_factor", 1.0)
    rotary_dim = int(head_dim * partial)
    if rotary_dim % 2:
        raise ValueError(f"partial_rotary_factor {partial} gives an odd rotary dimension")
    return Rotary(head_dim, inv_freq(rotary_dim, float(theta), scaling or None))

"""Small prompts of random tokens and KV payloads for the tier tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sgl_kvtier.tier import ChunkStore, ModelFingerprint, chunk_keys

FP = ModelFingerprint("test-model", "float16", num_layers=3, num_kv_heads=2, head_dim=16)
CHUNK = 16
# 6144 bytes: one and a half 4 KiB pages, so O_DIRECT reads have an unaligned tail.
LAYOUT = FP.chunk_layout(CHUNK)


@dataclass
class Prompt:
    tokens: torch.Tensor  # (chunks * CHUNK,)
    keys: list[str]
    payloads: list[torch.Tensor]  # per chunk, (LAYOUT.nbytes,) uint8

    def chunk_tokens(self, i: int) -> torch.Tensor:
        return self.tokens[i * CHUNK:(i + 1) * CHUNK]

    def all_chunk_tokens(self) -> list[torch.Tensor]:
        return [self.chunk_tokens(i) for i in range(len(self.keys))]

    def put(self, store: ChunkStore, indices: range | list[int] | None = None) -> None:
        for i in indices if indices is not None else range(len(self.keys)):
            store.put(self.keys[i], self.chunk_tokens(i), self.payloads[i], LAYOUT)


def make_prompt(chunks: int, seed: int = 0, namespace: str = "") -> Prompt:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (chunks * CHUNK,), generator=gen)
    payloads = [torch.randint(0, 256, (LAYOUT.nbytes,), dtype=torch.uint8, generator=gen)
                for _ in range(chunks)]
    return Prompt(tokens, chunk_keys(FP, namespace, tokens, CHUNK), payloads)


def tier_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "sgl_kvtier" and r.levelno >= logging.WARNING]

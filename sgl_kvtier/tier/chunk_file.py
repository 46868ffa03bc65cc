"""The chunk file format: a self-describing 4 KiB header, then the payload.

::

    offset 0      header (HEADER_SIZE bytes; checksum of the rest in its last 16 bytes)
    offset 4096   payload (payload_len bytes), zero-padded to a multiple of 4096

Padding the header and the file to 4 KiB keeps every payload read aligned for O_DIRECT.
Both checksums are XXH3-128: the header's is checked whenever a header is read, the
payload's on every load.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from .layout import ChunkLayout

__all__ = ["HEADER_SIZE", "ChunkHeader", "CorruptChunk", "ChecksumMismatch", "pack_header",
           "unpack_header", "payload_checksum", "file_size"]

HEADER_SIZE = 4096
MAGIC = b"SGLKVTC\0"
VERSION = 1
# magic, version, header size, key, token digest, tokens, layers, kv heads, head dim,
# dtype name, payload length, payload checksum
_FIELDS = struct.Struct("<8sHH32s32sIIII16sQ16s")
_CHECKSUM_AT = HEADER_SIZE - 16
# No chunk of any real model comes near this (Llama-3.1-70B, 256 tokens, bf16: 84 MB); a
# header claiming more is corrupt or planted, and would make readers allocate its size.
MAX_PAYLOAD = 1 << 32


class CorruptChunk(Exception):
    """A chunk file that is not what its name promises; the caller quarantines it."""


class ChecksumMismatch(CorruptChunk):
    """The payload read back does not match the checksum written with it."""


@dataclass(frozen=True)
class ChunkHeader:
    key: bytes  # 32-byte digest the file is named after
    token_digest: bytes  # 32-byte SHA-256 of the chunk's token ids
    layout: ChunkLayout
    payload_len: int
    payload_checksum: bytes  # 16-byte XXH3-128 of the payload

    @property
    def file_size(self) -> int:
        return file_size(self.payload_len)


def file_size(payload_len: int) -> int:
    """Bytes on disk for a payload of ``payload_len`` bytes, header and padding included."""
    return HEADER_SIZE + -(-payload_len // HEADER_SIZE) * HEADER_SIZE


def payload_checksum(payload: memoryview) -> bytes:
    return xxhash.xxh3_128_digest(payload)


def pack_header(header: ChunkHeader) -> bytes:
    """The ``HEADER_SIZE`` bytes that start a chunk file."""
    lay = header.layout
    fields = _FIELDS.pack(MAGIC, VERSION, HEADER_SIZE, header.key, header.token_digest,
                          lay.tokens, lay.num_layers, lay.num_kv_heads, lay.head_dim,
                          lay.dtype.encode(), header.payload_len, header.payload_checksum)
    body = fields.ljust(_CHECKSUM_AT, b"\0")
    return body + xxhash.xxh3_128_digest(body)


def unpack_header(block: bytes | memoryview) -> ChunkHeader:
    """Parse and verify the first ``HEADER_SIZE`` bytes of a chunk file.

    Raises
    ------
    CorruptChunk
        If the block is short, its checksum does not match, a field is invalid, or the
        payload length is not what the layout holds (or implausibly large).
    """
    block = memoryview(block)[:HEADER_SIZE]
    if len(block) < HEADER_SIZE:
        raise CorruptChunk(f"header is {len(block)} bytes, expected {HEADER_SIZE}")
    if xxhash.xxh3_128_digest(block[:_CHECKSUM_AT]) != bytes(block[_CHECKSUM_AT:]):
        raise CorruptChunk("header checksum mismatch")
    (magic, version, header_size, key, tokens_digest, tokens, layers, heads, head_dim,
     dtype, payload_len, checksum) = _FIELDS.unpack_from(block)
    if magic != MAGIC or version != VERSION or header_size != HEADER_SIZE:
        raise CorruptChunk(f"unknown format (magic {magic!r}, version {version})")
    try:
        layout = ChunkLayout(layers, heads, head_dim, dtype.rstrip(b"\0").decode(), tokens)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptChunk(f"bad layout: {e}") from None
    if payload_len != layout.nbytes or payload_len > MAX_PAYLOAD:
        raise CorruptChunk(f"payload length {payload_len} does not match its layout "
                           f"({layout.nbytes} bytes, at most {MAX_PAYLOAD})")
    return ChunkHeader(key, tokens_digest, layout, payload_len, checksum)

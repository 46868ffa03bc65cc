"""The chunk header: round trip, and every damaged byte detected."""

import os

import pytest
from tier_helpers import LAYOUT

from sgl_kvtier.tier.chunk_file import (
    HEADER_SIZE,
    ChunkHeader,
    CorruptChunk,
    file_size,
    pack_header,
    unpack_header,
)

HEADER = ChunkHeader(os.urandom(32), os.urandom(32), LAYOUT, LAYOUT.nbytes, os.urandom(16))


def test_header_round_trips_and_fills_4k():
    block = pack_header(HEADER)
    assert len(block) == HEADER_SIZE
    assert unpack_header(block) == HEADER


@pytest.mark.parametrize("offset", [0, 9, 20, 80, 120, 500, HEADER_SIZE - 1])
def test_any_flipped_header_byte_is_detected(offset):
    block = bytearray(pack_header(HEADER))
    block[offset] ^= 0x01
    with pytest.raises(CorruptChunk):
        unpack_header(block)


def test_short_header_is_corrupt():
    with pytest.raises(CorruptChunk):
        unpack_header(pack_header(HEADER)[:100])


def test_file_size_pads_payload_to_4k():
    assert file_size(0) == HEADER_SIZE
    assert file_size(1) == file_size(4096) == 2 * HEADER_SIZE
    assert file_size(LAYOUT.nbytes) == 3 * HEADER_SIZE

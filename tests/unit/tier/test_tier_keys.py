"""Chained chunk keys, the fingerprint, and key -> path containment."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tier_helpers import CHUNK, FP

from sgl_kvtier.tier import chunk_keys, chunk_path
from sgl_kvtier.tier.keys import check_key, is_chunk_name, is_temp_name, temp_name, temp_writer

TOKENS = list(range(1000, 1000 + 4 * CHUNK))


def test_one_key_per_full_chunk_and_none_for_the_tail():
    assert len(chunk_keys(FP, "", TOKENS, CHUNK)) == 4
    assert len(chunk_keys(FP, "", TOKENS + [7] * (CHUNK - 1), CHUNK)) == 4
    assert chunk_keys(FP, "", TOKENS[:CHUNK - 1], CHUNK) == []


def test_keys_are_lowercase_hex_sha256():
    for key in chunk_keys(FP, "", TOKENS, CHUNK):
        assert check_key(key) == key and len(key) == 64


def test_key_covers_the_whole_prefix():
    base = chunk_keys(FP, "", TOKENS, CHUNK)
    changed = list(TOKENS)
    changed[0] += 1  # first chunk only: every later key must change too
    assert all(a != b for a, b in zip(base, chunk_keys(FP, "", changed, CHUNK)))
    changed = list(TOKENS)
    changed[2 * CHUNK] += 1
    other = chunk_keys(FP, "", changed, CHUNK)
    assert other[:2] == base[:2] and other[2] != base[2] and other[3] != base[3]


def test_same_chunk_tokens_after_a_different_previous_chunk_differ():
    a = chunk_keys(FP, "", [1] * CHUNK + [5] * CHUNK, CHUNK)
    b = chunk_keys(FP, "", [2] * CHUNK + [5] * CHUNK, CHUNK)
    assert a[1] != b[1]


def test_namespace_scopes_keys():
    assert chunk_keys(FP, "tenant-a", TOKENS, CHUNK)[0] != chunk_keys(FP, "tenant-b", TOKENS,
                                                                       CHUNK)[0]
    assert chunk_keys(FP, None, TOKENS, CHUNK) == chunk_keys(FP, "", TOKENS, CHUNK)


@pytest.mark.parametrize("field, value", [("model", "other"), ("dtype", "bfloat16"),
                                          ("num_layers", 4), ("num_kv_heads", 4),
                                          ("head_dim", 32), ("tp_size", 2), ("layout", "x")])
def test_every_fingerprint_field_changes_the_keys(field, value):
    other = dataclasses.replace(FP, **{field: value})
    assert chunk_keys(other, "", TOKENS, CHUNK) != chunk_keys(FP, "", TOKENS, CHUNK)


def test_tp_rank_changes_the_keys():
    a = dataclasses.replace(FP, tp_size=2, tp_rank=0)
    b = dataclasses.replace(FP, tp_size=2, tp_rank=1)
    assert chunk_keys(a, "", TOKENS, CHUNK) != chunk_keys(b, "", TOKENS, CHUNK)


def test_token_container_type_does_not_matter():
    expected = chunk_keys(FP, "", TOKENS, CHUNK)
    assert chunk_keys(FP, "", np.array(TOKENS, dtype=np.int32), CHUNK) == expected
    assert chunk_keys(FP, "", torch.tensor(TOKENS), CHUNK) == expected


def test_keys_are_the_same_in_another_process():
    code = ("import sys; from sgl_kvtier.tier import ModelFingerprint, chunk_keys; "
            "fp = ModelFingerprint('test-model', 'float16', 3, 2, 16); "
            f"print(' '.join(chunk_keys(fp, 'ns', list(range(1000, {1000 + 4 * CHUNK})), "
            f"{CHUNK})))")
    # A different hash seed would change hash() but must not change the keys.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    assert out == chunk_keys(FP, "ns", TOKENS, CHUNK)


def test_fingerprint_normalises_and_validates():
    assert dataclasses.replace(FP, dtype=torch.float16) == FP
    with pytest.raises(ValueError):
        dataclasses.replace(FP, dtype="float17")
    with pytest.raises(ValueError):
        dataclasses.replace(FP, tp_rank=1)


@pytest.mark.parametrize("bad", ["../" + "a" * 61, "A" * 64, "a" * 63, "a" * 65,
                                 "/etc/passwd", "g" * 64, "a" * 62 + "/x", 42])
def test_only_hex_digests_name_paths(bad, tmp_path):
    with pytest.raises(ValueError):
        chunk_path(tmp_path, bad)


def test_paths_stay_inside_the_root(tmp_path):
    for key in chunk_keys(FP, "", TOKENS, CHUNK):
        path = chunk_path(tmp_path, key)
        assert path.resolve().is_relative_to(tmp_path.resolve())
        assert path.parent.name == key[:2] and is_chunk_name(path.name)


def test_temp_names_never_look_like_chunks(tmp_path):
    final = chunk_path(tmp_path, chunk_keys(FP, "", TOKENS, CHUNK)[0])
    tmp = temp_name(final.name)
    assert tmp != temp_name(final.name)
    assert is_temp_name(tmp) and not is_chunk_name(tmp)
    assert not is_temp_name(final.name)
    assert Path(tmp).suffix == ".tmp"
    assert temp_writer(tmp) == os.getpid() and temp_writer(".x.tmp") is None

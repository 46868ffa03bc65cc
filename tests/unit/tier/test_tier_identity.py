"""The model identity in every chunk key follows the weights' content, not their names."""

import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

from sgl_kvtier.tier import identity
from sgl_kvtier.tier.identity import model_identity


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path / "cache"))


def model(folder, seed=0, scale=1.0):
    """A small model folder: config plus one safetensors file of a few tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.w": torch.randn(64, 64, generator=g) * scale for i in range(4)}
    tensors["norm"] = torch.ones(64)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def ident(folder, **kwargs) -> str:
    return model_identity(str(folder), **kwargs).split("@")[1]


def test_a_copy_of_the_same_weights_has_the_same_identity(tmp_path):
    a = model(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)  # other path, other mtimes
    assert ident(a) == ident(b)


def test_a_fine_tune_with_same_names_config_and_sizes_differs(tmp_path):
    base = model(tmp_path / "base" / "llama")
    tuned = model(tmp_path / "tuned" / "llama", seed=1)  # same shapes, other values
    assert (base / "model.safetensors").stat().st_size == \
        (tuned / "model.safetensors").stat().st_size
    assert ident(base) != ident(tuned)


def test_one_changed_tensor_changes_the_identity(tmp_path):
    a, b = model(tmp_path / "a"), model(tmp_path / "b")
    from safetensors.torch import load_file

    weights = load_file(str(b / "model.safetensors"))
    weights["layers.2.w"] += 0.01  # like a fine-tune of one matrix
    save_file(weights, str(b / "model.safetensors"))
    assert ident(a) != ident(b)


def test_weights_copied_over_old_ones_are_hashed_again(tmp_path):
    a = model(tmp_path / "a")
    before = ident(a)
    st = (a / "model.safetensors").stat()
    other = model(tmp_path / "other", seed=7)
    shutil.copyfile(other / "model.safetensors", a / "model.safetensors")
    os.utime(a / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert (a / "model.safetensors").stat().st_size == st.st_size
    assert ident(a) != before  # ctime moved: the cached digest is not trusted


def test_settings_that_change_kv_change_the_identity(tmp_path):
    a = model(tmp_path / "a")
    assert ident(a) != ident(a, load_format="dummy")
    assert ident(a) != ident(a, settings={"quantization": "fp8"})
    assert ident(a, settings={"kv_cache_dtype": "auto"}) != \
        ident(a, settings={"kv_cache_dtype": "fp8_e5m2"})


def test_digests_are_cached_by_file_stamp(tmp_path, monkeypatch):
    a = model(tmp_path / "a")
    first = ident(a)
    calls = []
    monkeypatch.setattr(identity, "file_digest", lambda p: calls.append(p) or "x")
    assert ident(a) == first and calls == []  # nothing read again
    time.sleep(0.01)
    (a / "model.safetensors").touch()
    ident(a)
    assert len(calls) == 1


def test_a_hub_name_is_identified_by_name_and_revision():
    assert model_identity("org/model") != model_identity("org/model", revision="v2")
    assert model_identity("org/model").startswith("model@")

"""The embedded model converts into a directory SGLang and transformers can load."""

import json

import pytest

from sgl_kvtier.harness.models import main, model_path
from sgl_kvtier.harness.resolve import resolve_model


@pytest.fixture(scope="module")
def smollm2():
    return model_path("smollm2")


def test_directory_is_complete(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3
    assert "quantization_config" not in config
    assert (smollm2 / "model.safetensors").stat().st_size > 200e6
    assert (smollm2 / "tokenizer.json").is_file()


def test_second_call_reuses_the_conversion(smollm2):
    before = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert model_path("smollm2") == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == before


def test_greedy_answer_from_converted_weights(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).strip().startswith("Paris")


def test_cli_prints_path(smollm2, capsys):
    assert main(["path", "smollm2"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2)


def test_resolve_rejects_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an embedded model"):
        resolve_model(str(tmp_path / "nothing"))


def test_dummy_weight_shapes_have_published_config_and_a_tokenizer(tmp_path, monkeypatch, smollm2):
    from sgl_kvtier.harness.model_shapes import SHAPES

    monkeypatch.setenv("KVTIER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("sgl_kvtier.harness.models.model_path", lambda name: smollm2)
    path = resolve_model("llama-3.1-8b")
    assert path == tmp_path / "shapes" / "llama-3.1-8b"
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 32 and config["num_key_value_heads"] == 8
    assert config["hidden_size"] == 4096 and config["vocab_size"] == 128256
    assert (path / "tokenizer.json").is_file() and not list(path.glob("*.safetensors"))
    mtime = (path / "config.json").stat().st_mtime_ns
    assert resolve_model("llama-3.1-8b") == path  # reused, not rewritten
    assert (path / "config.json").stat().st_mtime_ns == mtime
    assert set(SHAPES) >= {"llama-3.1-8b", "tiny-llama-test"}

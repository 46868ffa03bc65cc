"""Model directories with a published model's shapes and no weights, for SGLang's
``--load-format dummy`` (random weights): performance runs of large models without a
checkpoint download.

Each directory holds a ``config.json`` with the model's published architecture values and
the embedded model's tokenizer files, so text prompts tokenize without a download. Token
ids the borrowed tokenizer does not know are skipped when output is decoded; random
weights produce meaningless text anyway, and the runs that use these shapes measure time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from sgl_kvtier.harness.models import model_path
from sgl_kvtier.paths import cache_dir

__all__ = ["SHAPES", "shape_path"]

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False}

# Published configuration values (architecture only; no weights exist for these paths).
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": {
        **_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": 128001},
    # Small enough for a 2-core CPU, with a vocabulary larger than the borrowed tokenizer's,
    # so the dummy-weights path is tested here as it runs for the large shapes.
    "tiny-llama-test": {
        **_LLAMA, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001},
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def shape_path(name: str) -> Path:
    """Directory for the dummy-weights shape ``name`` (created on first use)."""
    config = {**SHAPES[name], "sgl_kvtier_shape": name}
    target = cache_dir() / "shapes" / name
    if _current(target, config):
        return target
    tokenizer_dir = model_path("smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        for file in _TOKENIZER_FILES:
            if (tokenizer_dir / file).is_file():
                shutil.copy(tokenizer_dir / file, tmp / file)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _current(target: Path, config: dict) -> bool:
    try:
        return json.loads((target / "config.json").read_text()) == config
    except (OSError, ValueError):
        return False

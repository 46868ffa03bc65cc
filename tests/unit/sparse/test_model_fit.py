"""Which model configs sparse decode refuses, and the key each refusal names."""

import pytest

from sgl_kvtier.sparse.model_fit import sparse_unfit_reason

LLAMA = {"model_type": "llama", "num_hidden_layers": 30, "num_key_value_heads": 3}


@pytest.mark.parametrize("hf", [
    LLAMA,
    {**LLAMA, "sliding_window": None},                     # Mistral v0.3
    {**LLAMA, "sliding_window": 4096, "use_sliding_window": False},  # Qwen2 and Qwen3
    {**LLAMA, "layer_types": ["full_attention"] * 30},
    {"model_type": "llava", "text_config": LLAMA},
])
def test_full_attention_models_are_served(hf):
    assert sparse_unfit_reason(hf) is None


@pytest.mark.parametrize("hf, key", [
    ({**LLAMA, "sliding_window": 4096}, "sliding_window: 4096"),  # Mistral v0.1
    ({**LLAMA, "layer_types": ["sliding_attention", "full_attention"]},
     "layer_types has sliding_attention"),  # Gemma 2 and 3
    ({**LLAMA, "kv_lora_rank": 512}, "kv_lora_rank: 512"),  # DeepSeek's MLA
    ({"is_encoder_decoder": True}, "is_encoder_decoder: true"),
    ({"model_type": "gemma3", "text_config": {**LLAMA, "sliding_window": 1024}},
     "sliding_window: 1024"),
])
def test_other_attention_is_refused_naming_its_key(hf, key):
    why = sparse_unfit_reason(hf)
    assert why is not None and key in why

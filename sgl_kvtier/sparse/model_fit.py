"""Which models sparse decode can serve, read from their Hugging Face config.

Sparse decode replaces every layer's attention over the prompt with attention over a
selection, and releases the prompt's pool slots. A layer that attends differently (a
sliding window, cross-attention to an encoder, a compressed latent shared by keys and
values) would either read the released slots through another path or need a selection of
its own; such models are refused at launch rather than served wrong.
"""

from __future__ import annotations

__all__ = ["sparse_unfit_reason"]


def sparse_unfit_reason(hf: dict) -> str | None:
    """Why sparse decode cannot serve this model, or None when it can.

    Parameters
    ----------
    hf : dict
        The model's ``config.json`` (a multimodal model's ``text_config`` is read).

    Returns
    -------
    str or None
        A sentence naming the config key that rules it out.
    """
    if hf.get("is_encoder_decoder"):
        return "the model is an encoder-decoder (is_encoder_decoder: true)"
    text = hf.get("text_config") or hf
    if text.get("kv_lora_rank"):
        return ("the model's keys and values share a compressed latent (kv_lora_rank: "
                f"{text['kv_lora_rank']}), which sparse decode does not split")
    kinds = set(text.get("layer_types") or ())
    if kinds - {"full_attention"}:
        return (f"some layers do not attend the whole context (layer_types has "
                f"{', '.join(sorted(kinds - {'full_attention'}))})")
    window = text.get("sliding_window")
    if window and text.get("use_sliding_window", True) is not False:
        return f"the model attends through a sliding window (sliding_window: {window})"
    return None

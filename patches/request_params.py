"""Refuse malformed kvtier request options where SGLang refuses malformed sampling
parameters (:mod:`sgl_kvtier.request_options`): ``SamplingParams.verify`` runs in the
process that received the request, before it is queued, and a ValueError there is the
client's HTTP 400."""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookType

from sgl_kvtier.request_options import option_error

__all__ = ["HOOKS"]


def _verify(result, params, *args, **kwargs):
    why = option_error(getattr(params, "custom_params", None))
    if why is not None:
        raise ValueError(why)
    return result


HOOKS = [("sglang.srt.sampling.sampling_params.SamplingParams.verify", _verify,
          HookType.AFTER)]

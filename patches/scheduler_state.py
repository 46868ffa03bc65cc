"""Expose what the scheduler process received, through SGLang's ``/get_server_info``.

Target (SGLang 0.5.23): ``sglang.srt.managers.scheduler.Scheduler.get_internal_state``
(AFTER). Adds ``internal_states[i]["kvtier"]``: the kvtier configuration as the scheduler
parsed it from its server arguments, its process id, the attention backend in use and its
counters (decode steps attended in place versus gathered), the radix cache class and the
NVMe tier's counters (``None`` without the tier) and sparse decode's (``None`` when off).
"""

from __future__ import annotations

import os

from sglang.srt.plugins.hook_registry import HookType

from sgl_kvtier.patches._state import config_of, config_path_of


def _get_internal_state(result, scheduler, *args, **kwargs):
    config = config_of(scheduler.server_args)
    if config is None:
        return result
    runner = scheduler.tp_worker.model_runner
    result.internal_state["kvtier"] = {
        "config": config.model_dump(),
        "config_path": config_path_of(scheduler.server_args),
        "scheduler_pid": os.getpid(),
        "attention_backend": type(runner.attn_backend).__name__,
        "attention_stats": dict(getattr(runner.attn_backend, "stats", {})),
        "radix_cache": type(scheduler.tree_cache).__name__,
        "tier": _tier_state(scheduler.tree_cache),
        "sparse": _sparse_state(),
    }
    return result


def _sparse_state() -> dict | None:
    from sgl_kvtier.patches.sparse_bridge import bridge

    link = bridge()
    return None if link is None else link.manager.report()


def _tier_state(tree_cache) -> dict | None:
    state = getattr(tree_cache, "tier_state", None)
    return state() if state is not None else None


HOOKS = [("sglang.srt.managers.scheduler.Scheduler.get_internal_state", _get_internal_state,
          HookType.AFTER)]

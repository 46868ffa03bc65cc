"""Everything in sgl_kvtier that touches SGLang: the plugin entry point and its hooks.

``register`` is the ``sglang.srt.plugins`` entry point. SGLang calls it in every process
(launcher, scheduler, detokenizer). It is idempotent, imports nothing heavy and never
initialises CUDA. Without ``--enable-kvtier`` it only adds the two command-line flags;
with it, it also registers the ``kvtier`` attention backend, the ``kvtier`` radix-cache
backend (the NVMe tier) and the scheduler hooks, then checks that every hook target
resolved (a miss stops the process with one line).
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookRegistry

from sgl_kvtier.patches import _compat, _state

__all__ = ["register", "is_active", "hook_targets"]

log = logging.getLogger("sgl_kvtier")
_registered: list[str] = []


def _hooks(enabled: bool) -> list[tuple]:
    from sgl_kvtier.patches import cli, request_params

    if not enabled:
        return list(cli.HOOKS)
    if _state.is_launcher():  # it receives the requests: their options are checked here
        return list(cli.HOOKS) + list(request_params.HOOKS)
    # The scheduler module costs seconds to import; only its own process needs it.
    from sgl_kvtier.patches import scheduler_state, sparse_cache, tier_loads

    return (list(cli.HOOKS) + list(request_params.HOOKS) + list(scheduler_state.HOOKS)
            + list(tier_loads.HOOKS) + list(sparse_cache.HOOKS))


def register() -> None:
    """Entry point for ``sglang.srt.plugins``; safe to call any number of times."""
    if _registered:
        return
    enabled = _state.is_enabled() or _state.requested_on_command_line()
    hooks = _hooks(enabled)
    for target, fn, kind in hooks:
        HookRegistry.register(target, fn, kind)
    _registered.extend(target for target, _, _ in hooks)
    if enabled and not _state.is_launcher():
        from sgl_kvtier.patches import attention_backend, tier_cache

        attention_backend.install()
        tier_cache.install()
    # Apply now (SGLang applies again after all plugins; patched targets are skipped) so
    # that version drift is caught here, at start, rather than at first use.
    HookRegistry.apply_hooks()
    _compat.fail_on_drift(_compat.unresolved(_registered), enabled)


def is_active() -> bool:
    """True in a process where kvtier is enabled and its hooks are applied."""
    return bool(_registered) and _state.is_enabled()


def hook_targets() -> list[str]:
    """The dotted SGLang targets hooked in this process."""
    return list(_registered)

"""The radix-cache side of sparse decode: a long request lets go of its prompt.

A mixin placed before :class:`KVTierRadixCache` (so it also skips the tier's write-back of
a released request). SGLang 0.5.23's ``RadixCache.checkpoint(req, up_to)`` inserts the
request's row into the tree and re-locks the request's node; ``release_kv_cache`` calls it
again when the request ends, then frees ``[cache_protected_len, owned)`` and unlocks.

- ``checkpoint`` of a whole prompt (not finished, long enough, not opted out) makes the
  request eligible; once its first ``sparse.dense_answer_tokens`` answer tokens are out
  (computed with full attention), the backend copies the prompt out.
- ``flush_pending_backups`` (after every batch) releases converted requests: their lock on
  the prompt is dropped once, and their row's prompt entries are zeroed (slot 0 is SGLang's
  padding slot, never allocated), so a stale slot id can never be read or inserted.
- ``checkpoint`` of a converted request does nothing: its decode tokens' KV came from
  approximate attention and is not served to later requests, and its prompt entries are
  gone. ``cache_protected_len`` stays at the prompt boundary, so SGLang frees exactly the
  decode slots and its memory checks still add up.
- ``on_release`` (finish, abort, retraction) and ``reset`` forget the request.

SGLang shuts admission (``running_batch.batch_is_full``) when a prefill does not fit and
opens it again only when a request leaves the batch. A release frees room without anyone
leaving, so :data:`HOOKS` opens admission before the next prefill is planned
(``Scheduler.get_new_batch_prefill``, BEFORE); otherwise the queue waits for a request to
finish and the released pool sits unused.
"""

from __future__ import annotations

import logging

from sglang.srt.plugins.hook_registry import HookType

from sgl_kvtier.patches.sparse_bridge import bridge
from sgl_kvtier.request_options import valid_budget, valid_dense_tokens
from sgl_kvtier.tier.service import namespace_of

__all__ = ["SparseRelease", "wants_sparse", "budget_of", "dense_tokens_of", "HOOKS"]

log = logging.getLogger("sgl_kvtier")


def wants_sparse(req) -> bool:
    """False when ``sampling_params.custom_params.kvtier_sparse`` is ``false`` (the request
    decodes densely whatever its length: comparisons on one server)."""
    return _custom_param(req, "kvtier_sparse") is not False


def _custom_param(req, key: str):
    params = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    return params.get(key) if isinstance(params, dict) else None


_warned: set[str] = set()


def _warn_once(req, key: str, expected: str, value, setting: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("sgl_kvtier: sparse decode: request %s: custom_params.%s must be %s, "
                    "got %r; the server's sparse.%s applies (said once)", req.rid, key,
                    expected, value, setting)


def budget_of(req) -> float | None:
    """``sampling_params.custom_params.kvtier_sparse_budget``: this request's share of the
    context selected per step, in place of ``sparse.budget_fraction`` (the floor and cap
    still apply). Evaluations send one prompt at several budgets to one server, which
    prefills it once and builds its state once. ``None``: the server's setting. A malformed
    value is refused with the request (``patches/request_params.py``); one that reaches
    here anyway (a request not built by the tokenizer manager) is ignored, with a warning
    the first time."""
    value = _custom_param(req, "kvtier_sparse_budget")
    if value is None:
        return None
    if valid_budget(value):
        return float(value)
    _warn_once(req, "kvtier_sparse_budget", "a number in (0, 1]", value, "budget_fraction")
    return None


def dense_tokens_of(req, default: int) -> int:
    """``sampling_params.custom_params.kvtier_sparse_dense_tokens``: how many of this
    request's first answer tokens are computed with full attention, in place of
    ``sparse.dense_answer_tokens`` (``default``); malformed: ``default``, as
    :func:`budget_of`."""
    value = _custom_param(req, "kvtier_sparse_dense_tokens")
    if value is None:
        return default
    if valid_dense_tokens(value):
        return value
    _warn_once(req, "kvtier_sparse_dense_tokens", "an integer of at least 2", value,
               "dense_answer_tokens")
    return default


class SparseRelease:
    """Radix-cache mixin; inert when the process has no sparse bridge."""

    sparse_released_tokens = 0
    sparse_room_freed = False  # a release since admission last looked (see HOOKS)
    sparse_metrics = None  # patches.tier_metrics.SparseMetrics with --enable-metrics

    @property
    def _sparse_reqs(self) -> dict:
        # rid -> Req of eligible and converted requests (the tree unlocks through them).
        if "_sparse_req_map" not in self.__dict__:
            self.__dict__["_sparse_req_map"] = {}
        return self.__dict__["_sparse_req_map"]

    def decodes_sparsely(self, req) -> bool:
        """True once the backend took the request's prompt out of the pool."""
        link = bridge()
        return link is not None and link.boundary(req.rid) is not None

    def checkpoint(self, req, *, up_to: int):
        if self.decodes_sparsely(req):
            return
        super().checkpoint(req, up_to=up_to)
        link = bridge()
        if link is None or self.disable or req.finished() or not wants_sparse(req):
            return
        boundary = req.kv.cache_protected_len
        if up_to >= len(req.origin_input_ids) and link.manager.wants(boundary):
            tokens = tuple(req.full_untruncated_fill_ids[:boundary])
            self._sparse_reqs[req.rid] = req
            # The first answer token comes from the prefill, token n from the decode
            # step at sequence length prompt + n - 1: sparse from token n + 1.
            dense = dense_tokens_of(req, link.manager.config.dense_answer_tokens)
            link.offer(req.rid, tokens, boundary,
                       namespace_of(req.extra_key, getattr(req, "cache_salt", None)),
                       budget_of(req), convert_at=len(req.origin_input_ids) + dense)

    def flush_pending_backups(self) -> None:
        super().flush_pending_backups()
        link = bridge()
        if link is None:
            return
        for rid, boundary in list(link.converted.items()):
            if rid in link.released:
                continue
            req = self._sparse_reqs.get(rid)
            if req is None or req.finished() or req.lock is None:
                continue
            if req.kv.cache_protected_len != boundary:
                continue  # the tree's view moved (should not happen): keep holding
            self.unlock(req.lock)
            req.lock = None
            self.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :boundary] = 0
            link.released.add(rid)
            self.sparse_room_freed = True
            self.sparse_released_tokens += boundary
            link.manager.counters.pool_tokens_released += boundary
        if self.sparse_metrics is not None:
            self.sparse_metrics.update(link.manager.report())

    def on_release(self, req, *, checkpointed: bool) -> None:
        super().on_release(req, checkpointed=checkpointed)
        self._sparse_reqs.pop(req.rid, None)
        if (link := bridge()) is not None:
            link.forget(req.rid)

    def reset(self):
        super().reset()
        self._sparse_reqs.clear()
        if (link := bridge()) is not None:
            link.clear()


def _reopen_admission(scheduler, running_batch, *args, **kwargs):
    cache = scheduler.tree_cache
    if getattr(cache, "sparse_room_freed", False):
        cache.sparse_room_freed = False
        running_batch.batch_is_full = False


HOOKS = [("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", _reopen_admission,
          HookType.BEFORE)]

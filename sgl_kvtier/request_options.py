"""Per-request kvtier options, sent in ``sampling_params.custom_params``.

``kvtier_sparse: false`` keeps a request on dense decode whatever its length;
``kvtier_sparse_budget: 0.03`` sets its share of the context selected per decode step in
place of ``sparse.budget_fraction``; ``kvtier_sparse_dense_tokens: 4`` sets how many of its
first answer tokens are computed with full attention, in place of
``sparse.dense_answer_tokens``. SGLang carries ``custom_params`` through unchecked, so
``patches/request_params.py`` refuses a malformed option where SGLang refuses malformed
sampling parameters: the client gets HTTP 400 naming the key, rather than a request served
with settings it did not ask for.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["option_error", "valid_budget", "valid_dense_tokens"]


def valid_budget(value) -> bool:
    """A share of the context: a number (not a bool) in (0, 1]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


def valid_dense_tokens(value) -> bool:
    """A count of answer tokens decoded densely: an int (not a bool), at least 2."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 2


def option_error(params: Mapping | None) -> str | None:
    """Why ``params`` (a request's ``custom_params``) holds a malformed kvtier option, or
    None. A key absent or null is the server's setting."""
    if not isinstance(params, Mapping):
        return None
    sparse = params.get("kvtier_sparse")
    if sparse is not None and not isinstance(sparse, bool):
        return f"custom_params.kvtier_sparse must be true or false, got {sparse!r}"
    budget = params.get("kvtier_sparse_budget")
    if budget is not None and not valid_budget(budget):
        return (f"custom_params.kvtier_sparse_budget must be a number in (0, 1] (a share of "
                f"the context: 0.03 is 3 %), got {budget!r}")
    dense = params.get("kvtier_sparse_dense_tokens")
    if dense is not None and not valid_dense_tokens(dense):
        return (f"custom_params.kvtier_sparse_dense_tokens must be an integer of at least 2 "
                f"(the first answer tokens computed with full attention), got {dense!r}")
    return None

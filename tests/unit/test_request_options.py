"""Per-request kvtier options: what is refused, and the message that names the key."""

import pytest

from sgl_kvtier.request_options import option_error, valid_budget, valid_dense_tokens


@pytest.mark.parametrize("params", [None, {}, {"other": 3}, {"kvtier_sparse": False},
                                    {"kvtier_sparse": True, "kvtier_sparse_budget": 1},
                                    {"kvtier_sparse_budget": 0.015},
                                    {"kvtier_sparse_dense_tokens": 2},
                                    {"kvtier_sparse_dense_tokens": 64},
                                    {"kvtier_sparse": None, "kvtier_sparse_budget": None}])
def test_well_formed_options_pass(params):
    assert option_error(params) is None


@pytest.mark.parametrize("params,fragment", [
    ({"kvtier_sparse_budget": 3}, "kvtier_sparse_budget must be a number in (0, 1]"),
    ({"kvtier_sparse_budget": 0}, "got 0"),
    ({"kvtier_sparse_budget": -0.1}, "got -0.1"),
    ({"kvtier_sparse_budget": "0.03"}, "got '0.03'"),
    ({"kvtier_sparse_budget": True}, "got True"),
    ({"kvtier_sparse": "no"}, "custom_params.kvtier_sparse must be true or false, got 'no'"),
    ({"kvtier_sparse": 0}, "got 0"),
    ({"kvtier_sparse_dense_tokens": 1},
     "kvtier_sparse_dense_tokens must be an integer of at least 2"),
    ({"kvtier_sparse_dense_tokens": 4.0}, "got 4.0"),
    ({"kvtier_sparse_dense_tokens": True}, "got True"),
])
def test_malformed_options_are_named(params, fragment):
    assert fragment in option_error(params)


def test_a_budget_is_a_share():
    assert valid_budget(0.5) and valid_budget(1) and not valid_budget(1.01)
    assert not valid_budget(float("nan")) and not valid_budget(False)


def test_dense_tokens_are_at_least_two():
    assert valid_dense_tokens(2) and valid_dense_tokens(100)
    assert not valid_dense_tokens(1) and not valid_dense_tokens(0) and not valid_dense_tokens(True)

"""Byte accounting of a sparse request, from its real buffers."""

import torch

from sgl_kvtier.config import SparseConfig
from sgl_kvtier.sparse.memory import measure_memory


def test_counts_come_from_the_buffers_and_the_saving_grows_with_context():
    config = SparseConfig(budget_max_tokens=256, rank_fraction=0.25)
    short = measure_memory(config, 4096, layers=2, num_kv_heads=2, head_dim=32)
    long = measure_memory(config, 16384, layers=2, num_kv_heads=2, head_dim=32)
    plan = long.plan
    assert long.device["u"] == 2 * plan.middle * plan.rank * 2  # layers x tokens x rank x bf16
    assert long.device["landmarks"] == 2 * 2 * plan.chunks * 32 * 2
    assert long.dense == 2 * (2 * 16384 * 2 * 32 * 2)  # layers x (K+V) x tokens x H x D x bf16
    assert long.host == 2 * plan.middle * 2 * 32 * 2
    assert long.saving > short.saving > 1


def test_float32_doubles_the_bytes():
    config = SparseConfig()
    half = measure_memory(config, 4096, 1, 2, 32, torch.bfloat16)
    full = measure_memory(config, 4096, 1, 2, 32, torch.float32)
    assert full.device["u"] == 2 * half.device["u"] and full.dense == 2 * half.dense


def test_exact_keys_move_the_keys_to_the_host_and_bounds_are_counted():
    lowrank = measure_memory(SparseConfig(), 8192, 2, 2, 32)
    exact = measure_memory(SparseConfig(keys="exact", chunk_tokens=8), 8192, 2, 2, 32)
    bound = measure_memory(SparseConfig(selection="bound"), 8192, 2, 2, 32)
    assert exact.device["u"] == exact.device["sv"] == 0 and lowrank.device["u"] > 0
    assert exact.host == 2 * lowrank.host  # keys beside the values
    assert exact.device_total == lowrank.device_total - lowrank.device["u"] - lowrank.device["sv"]
    # The bound selection's per-chunk min and max: twice the landmarks, on the device.
    assert bound.device["bounds"] == 2 * bound.device["landmarks"]
    assert bound.device_total == lowrank.device_total + bound.device["bounds"]

"""The HiCache L3 adapter against SGLang's real host KV pool on CPU: the v1 contract
(leading-run exists, zero-copy get/set by host index), persistence across instances,
checksums, and config errors."""

import pytest
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig, HiCacheStorageExtraInfo
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost

from sgl_kvtier.patches.hicache_storage import KVTierHiCacheStorage

PAGE = 4


@pytest.fixture
def host():
    pool = MHATokenToKVPool(size=64, page_size=PAGE, dtype=torch.bfloat16, head_num=3,
                            head_dim=64, layer_num=2, device="cpu", enable_memory_saver=False,
                            enable_alt_stream=False)
    return MHATokenToKVPoolHost(pool._mha_buffer_info(), 2.0, 0, PAGE, "page_first",
                                pin_memory=False, device="cpu", device_capacity_tokens=64,
                                start_layer=0, end_layer=1)


def storage(tmp_path, host, **extra) -> KVTierHiCacheStorage:
    config = HiCacheStorageConfig(
        tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
        model_name="m", extra_config={"backend_name": "kvtier", "interface_v1": 1,
                                      "path": str(tmp_path / "l3"), "admission": "always",
                                      **extra})
    s = KVTierHiCacheStorage(config, {})
    s.register_mem_pool_host(host)
    return s


def fill(host, pages: int) -> torch.Tensor:
    idx = host.alloc(pages * PAGE)
    host.kv_buffer[:, idx] = torch.randn(2, len(idx), *host.kv_buffer.shape[2:]).to(
        host.kv_buffer.dtype)
    return idx


def test_v1_round_trip_and_restart(tmp_path, host):
    keys = [f"{i:064x}" for i in range(3)]
    idx = fill(host, 3)
    first = storage(tmp_path, host)
    assert first.batch_set_v1(keys, idx, HiCacheStorageExtraInfo(prefix_keys=[])) == [True] * 3
    assert first.store.flush(30)
    assert first.batch_exists(keys) == 3 and first.batch_exists(["f" * 64] + keys) == 0
    first.close()

    second = storage(tmp_path, host)  # a restarted server finds the pages
    target = host.alloc(3 * PAGE)
    assert second.batch_get_v1(keys, target) == [True, True, True]
    assert torch.equal(host.kv_buffer[:, target], host.kv_buffer[:, idx])
    missing = second.batch_get_v1([keys[0], "e" * 64, keys[2]], host.alloc(3 * PAGE))
    assert missing == [True, False, False]  # HiCache uses only the leading run
    second.close()


def test_corrupt_page_is_a_miss_never_wrong_data(tmp_path, host):
    keys = [f"{i:064x}" for i in range(2)]
    s = storage(tmp_path, host)
    s.batch_set_v1(keys, fill(host, 2))
    assert s.store.flush(30)
    victim = next((tmp_path / "l3").rglob("*.kvc"))
    data = bytearray(victim.read_bytes())
    data[4096 + 100] ^= 0xFF  # inside the payload, after the 4 KiB header
    victim.write_bytes(bytes(data))
    got = s.batch_get_v1(keys, host.alloc(2 * PAGE))
    assert got.count(True) <= 1 and s.store.stats()["checksum_failures"] == 1
    s.close()


def test_generic_calls_and_other_ranks_stay_apart(tmp_path, host):
    s = storage(tmp_path, host)
    page = host.get_data_page(int(fill(host, 1)[0]), flat=True)
    assert s.set("k" * 64, page) and s.store.flush(30)
    assert s.exists("k" * 64) and torch.equal(s.get("k" * 64), page)
    assert not s.exists("j" * 64)
    s.clear()
    assert not s.exists("k" * 64)
    s.close()


def test_bad_settings_are_one_clear_line(tmp_path, host):
    with pytest.raises(ValueError, match="tier.capacity: expected a non-negative size"):
        storage(tmp_path, host, capacity="-1GB")
    with pytest.raises(ValueError, match="tier.bogus: unknown key"):
        storage(tmp_path, host, bogus=1)

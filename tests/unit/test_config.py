"""The kvtier YAML: defaults, valid files, and one clear line for each kind of mistake."""

import pytest

from sgl_kvtier.config import ConfigError, KVTierConfig, config_from_dict, load_config, parse_size


def write(tmp_path, text):
    path = tmp_path / "kvtier.yaml"
    path.write_text(text)
    return path


def error_for(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_defaults_without_a_file():
    config = load_config(None)
    assert config == KVTierConfig()
    assert config.tier.chunk_tokens == 256 and config.sparse.budget_fraction == 0.06
    assert config.features() == []


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == KVTierConfig()


def test_valid_file_overrides_only_what_it_names(tmp_path):
    path = write(tmp_path, "tier:\n  chunk_tokens: 128\n  capacity: 2GiB\n"
                           "sparse:\n  budget_min_tokens: 128\n  kernel: torch\n")
    config = load_config(path)
    assert config.tier.chunk_tokens == 128
    assert config.tier.capacity == 2 * 2**30
    assert config.sparse.budget_min_tokens == 128 and config.sparse.kernel == "torch"
    assert config.prefill == KVTierConfig().prefill


def test_unknown_key_names_key_and_choices(tmp_path):
    message = error_for(write(tmp_path, "tier:\n  chunk_tokenz: 128\n"))
    assert "tier.chunk_tokenz: unknown key" in message
    assert "chunk_tokens" in message


def test_unknown_section(tmp_path):
    message = error_for(write(tmp_path, "nvme:\n  path: /tmp\n"))
    assert "nvme: unknown key; expected one of: tier, prefill, sparse" in message


def test_wrong_type_is_not_coerced(tmp_path):
    message = error_for(write(tmp_path, "tier:\n  chunk_tokens: '128'\n"))
    assert "tier.chunk_tokens:" in message and "integer" in message and "'128'" in message


def test_wrong_choice(tmp_path):
    message = error_for(write(tmp_path, "sparse:\n  kernel: cuda\n"))
    assert "sparse.kernel:" in message and "'triton'" in message


@pytest.mark.parametrize("value", ["-1", "-5GB", "'-1'"])
def test_negative_size(tmp_path, value):
    message = error_for(write(tmp_path, f"tier:\n  capacity: {value}\n"))
    assert "tier.capacity: expected a non-negative size" in message


def test_non_positive_count(tmp_path):
    message = error_for(write(tmp_path, "tier:\n  chunk_tokens: 0\n"))
    assert "tier.chunk_tokens: input should be greater than 0" in message


def test_unreadable_file(tmp_path):
    message = error_for(tmp_path / "missing.yaml")
    assert "cannot read the file" in message


def test_invalid_yaml(tmp_path):
    message = error_for(write(tmp_path, "tier: [unclosed\n"))
    assert "not valid YAML at line" in message


def test_top_level_must_be_a_mapping(tmp_path):
    message = error_for(write(tmp_path, "- tier\n"))
    assert "(top level): expected a mapping" in message


def test_sparse_sizes_are_checked_and_named():
    assert config_from_dict({"sparse": {"enabled": True}}).features() == ["sparse"]
    with pytest.raises(ConfigError, match="sparse.budget_fraction: .*less than or equal to 1"):
        config_from_dict({"sparse": {"budget_fraction": 1.5}})
    with pytest.raises(ConfigError, match="budget_max_tokens .* is below budget_min_tokens"):
        config_from_dict({"sparse": {"budget_min_tokens": 512, "budget_max_tokens": 256}})
    with pytest.raises(ConfigError, match="sparse.dense_answer_tokens: .*greater than or equal"):
        config_from_dict({"sparse": {"dense_answer_tokens": 1}})
    assert config_from_dict({"sparse": {"workspace": "64MiB"}}).sparse.workspace == 64 * 2**20
    assert config_from_dict({"sparse": {"host_memory": "4GiB"}}).sparse.host_memory == 4 * 2**30
    assert config_from_dict({"sparse": {}}).sparse.host_memory is None  # half the machine
    with pytest.raises(ConfigError, match="sparse.host_memory"):
        config_from_dict({"sparse": {"host_memory": 0}})


def test_exact_score_heads_are_layer_head_pairs():
    heads = config_from_dict({"sparse": {"exact_score_heads": [[7, 2], [18, 2]]}})
    assert heads.sparse.exact_score_heads == [[7, 2], [18, 2]]
    assert config_from_dict({}).sparse.exact_score_heads == []
    for bad in ([7], [[7]], [[7, 2, 1]], [[-1, 2]], [["7", 2]]):
        with pytest.raises(ConfigError, match="sparse.exact_score_heads"):
            config_from_dict({"sparse": {"exact_score_heads": bad}})


def test_bidirectional_prefill_needs_the_tier_and_background_loads():
    with pytest.raises(ConfigError, match="prefill.enabled: .* needs tier.enabled: true"):
        config_from_dict({"prefill": {"enabled": True}})
    with pytest.raises(ConfigError, match="prefill.enabled: .* needs tier.async_load: true"):
        config_from_dict({"prefill": {"enabled": True},
                          "tier": {"enabled": True, "async_load": False}})
    config = config_from_dict({"prefill": {"enabled": True, "min_prefix_tokens": 512},
                               "tier": {"enabled": True}})
    assert config.features() == ["tier", "prefill"] and config.prefill.min_prefix_tokens == 512


def test_tier_settings():
    tier = config_from_dict({"tier": {"enabled": True, "capacity": "2TB",
                                      "read_bandwidth_limit": "200MB"}}).tier
    assert tier.enabled and tier.capacity == 2 * 10**12 and tier.read_bandwidth_limit == 2 * 10**8
    for bad, key in [({"capacity": 0}, "tier.capacity"), ({"io_threads": 0}, "tier.io_threads"),
                     ({"admission": "never"}, "tier.admission"),
                     ({"read_bandwidth_limit": 0}, "tier.read_bandwidth_limit")]:
        with pytest.raises(ConfigError, match=key):
            config_from_dict({"tier": bad})


@pytest.mark.parametrize("text,expected", [(4096, 4096), ("512MiB", 512 * 2**20),
                                           ("10GB", 10 * 10**9), ("1.5 KiB", 1536)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [True, "ten", "5 parsecs", None])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_config_is_frozen():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        KVTierConfig().tier.chunk_tokens = 3


def test_documented_example_is_valid_and_states_the_defaults():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "docs" / "kvtier.example.yaml"
    assert load_config(example) == KVTierConfig()


def test_sparse_keys_and_chunks_left_to_the_device_resolve_per_device():
    from sgl_kvtier.sparse.budget import plan_for

    auto = KVTierConfig().sparse
    cpu, gpu = auto.resolved("cpu"), auto.resolved("cuda")
    assert (cpu.keys, cpu.chunk_tokens) == ("exact", 4)
    assert (gpu.keys, gpu.chunk_tokens) == ("lowrank", 8)
    assert plan_for(cpu, 4096, 3, 64).rank == 0 and plan_for(gpu, 4096, 3, 64).rank == 32
    chosen = config_from_dict({"sparse": {"keys": "lowrank", "chunk_tokens": 16}}).sparse
    assert chosen.resolved("cpu") == chosen  # what the file says stays
    exact = config_from_dict({"sparse": {"keys": "exact"}}).sparse.resolved("cuda")
    assert exact.chunk_tokens == 4
    with pytest.raises(ValueError, match="left to the device"):
        plan_for(auto, 4096, 3, 64)


def test_store_settings_come_from_the_tier_section_and_defaults_agree(tmp_path):
    import dataclasses

    from sgl_kvtier.config import TierConfig
    from sgl_kvtier.tier.config import StoreConfig

    tier = TierConfig()
    built = StoreConfig.from_tier(tier, tmp_path)
    defaults = {f.name: f.default for f in dataclasses.fields(StoreConfig)}
    shared = {"admission": "admission", "read_bandwidth_limit": "read_bandwidth_limit",
              "read_threads": "io_threads", "direct_io": "direct_io"}
    for store_name, tier_name in shared.items():
        assert defaults[store_name] == getattr(tier, tier_name), store_name
        assert getattr(built, store_name) == getattr(tier, tier_name), store_name
    assert built.capacity_bytes == tier.capacity

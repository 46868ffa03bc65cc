"""Real SGLang servers over HTTP on the embedded model (CPU): stock versus --enable-kvtier."""

import os

import pytest
from serverlib import SERVER_BASE

from sgl_kvtier import __version__
from sgl_kvtier.config import load_config
from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server

pytestmark = pytest.mark.integration

TEXT_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                "List three colours of the rainbow:", "Once upon a time, in a small village,"]
KVTIER_YAML = "tier:\n  chunk_tokens: 128\n  capacity: 3GiB\nsparse:\n  budget_min_tokens: 128\n"


@pytest.fixture(scope="module")
def prompts(model_dir):
    tok = load_tokenizer(model_dir)
    base = token_prompt(tok, 600, offset=5000)
    # The second shares the first's 600 tokens, so its extend runs on a cached prefix.
    return TEXT_PROMPTS + [base, base + token_prompt(tok, 150, offset=9000),
                           token_prompt(tok, 300, offset=12000)]


@pytest.fixture(scope="module")
def stock(model_dir, stock_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("stock")
    args = ["--attention-backend", "torch_native", "--model-path", str(model_dir), *SERVER_BASE]
    with Server(args, logs / "server.log", env=stock_env) as server:
        yield server


@pytest.fixture(scope="module")
def kvtier(model_dir, clean_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("kvtier")
    config = logs / "kvtier.yaml"
    config.write_text(KVTIER_YAML)
    # No environment prepared: --enable-kvtier must make the CPU engine start by itself.
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path", str(model_dir),
            *SERVER_BASE]
    with Server(args, logs / "server.log", env=clean_env) as server:
        server.config_path = config
        yield server


def test_greedy_outputs_identical_with_and_without_kvtier(stock, kvtier, prompts):
    for prompt in prompts:
        ours, theirs = kvtier.generate(prompt, 24), stock.generate(prompt, 24)
        assert ours.output_ids == theirs.output_ids, (prompt if isinstance(prompt, str)
                                                      else len(prompt), ours.text, theirs.text)
    # The shared-prefix prompt really ran on a cached prefix in both servers.
    assert kvtier.generate(prompts[5], 1).cached_tokens >= 600


def test_config_reaches_the_scheduler_process(kvtier):
    state = kvtier.server_info()["internal_states"][0]
    received = state["kvtier"]
    assert received["config"] == load_config(kvtier.config_path).model_dump()
    assert received["config"]["tier"]["chunk_tokens"] == 128
    assert received["config_path"] == str(kvtier.config_path)
    assert received["scheduler_pid"] not in (os.getpid(), kvtier.proc.pid)
    assert received["attention_backend"] == "KVTierAttnBackend"


def test_decode_attends_to_the_pool_in_place(kvtier):
    def stats():
        return kvtier.server_info()["internal_states"][0]["kvtier"]["attention_stats"]

    before = stats()
    kvtier.generate("Name the planets of the solar system:", 8, ignore_eos=True)
    after = stats()
    # 7 decode steps (the first token comes from prefill) in each of 30 layers; a lone
    # request's KV slots are consecutive, so none needs the gathering fallback.
    assert after["decode_in_place"] - before["decode_in_place"] == 7 * 30
    assert after["decode_gathered"] == before["decode_gathered"]


def test_one_start_line_lists_features(kvtier):
    log = kvtier.log_path.read_text()
    lines = [line for line in log.splitlines() if f"sgl_kvtier {__version__} on SGLang" in line]
    assert len(lines) == 1
    assert "enabled; attention backend kvtier; features: none" in lines[0]


def test_stock_server_has_no_kvtier_state(stock):
    state = stock.server_info()["internal_states"][0]
    assert "kvtier" not in state and state["attention_backend"] == "torch_native"
    log = stock.log_path.read_text()
    assert "sgl_kvtier:" not in log and f"sgl_kvtier {__version__}" not in log


def test_cached_2k_prompt_first_token_at_least_3x_faster(kvtier, model_dir):
    prompt = token_prompt(load_tokenizer(model_dir), 2048, offset=30000)
    kvtier.flush_cache()
    cold = kvtier.generate(prompt, 1)
    cached = kvtier.generate(prompt, 1)
    assert cold.cached_tokens == 0 and cached.cached_tokens == 2047
    assert cold.output_ids == cached.output_ids
    ratio = cold.ttft_s / cached.ttft_s
    print(f"2k prompt: cold {cold.ttft_s:.2f} s, cached {cached.ttft_s:.3f} s ({ratio:.1f}x)")
    assert ratio >= 3.0

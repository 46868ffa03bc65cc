"""Session fixtures of the NVMe tier's server tests (one reference server for all)."""

import pytest
from serverlib import SERVER_BASE
from tierlib import NEW_TOKENS, tier_yaml, wait_idle

from sgl_kvtier.harness.prompts import load_tokenizer, token_prompt
from sgl_kvtier.harness.server import Server


@pytest.fixture(scope="session")
def prompts(model_dir):
    tok = load_tokenizer(model_dir)
    return {"long": token_prompt(tok, 2048, offset=31_000),
            "other": token_prompt(tok, 1024, offset=52_000)}


@pytest.fixture(scope="session")
def reference(model_dir, clean_env, tmp_path_factory, prompts):
    """Greedy outputs of every prompt, each computed once from scratch, and the folder of
    the chunks that server wrote: the KV of each prompt as computed without any fault."""
    logs = tmp_path_factory.mktemp("reference")
    config = logs / "kvtier.yaml"
    config.write_text(tier_yaml(logs / "tier"))
    args = ["--enable-kvtier", "--kvtier-config", str(config), "--model-path", str(model_dir),
            *SERVER_BASE]
    with Server(args, logs / "server.log", env=clean_env) as server:
        outputs = {name: server.generate(p, NEW_TOKENS) for name, p in prompts.items()}
        assert all(g.cached_tokens == 0 for g in outputs.values())  # computed, not loaded
        wait_idle(server, chunks=12)
    return {"outputs": {name: g.output_ids for name, g in outputs.items()},
            "tier": logs / "tier"}

"""The kvtier backend factory: the CPU class on CPU, SGLang's FlashInfer backend on a GPU."""

import types

import pytest

pytest.importorskip("sglang")

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

from sgl_kvtier.patches import attention_backend


def test_install_is_idempotent_and_registers_the_name():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES

    attention_backend.install()
    attention_backend.install()
    assert ATTENTION_BACKENDS["kvtier"] is attention_backend._create
    assert ATTENTION_BACKEND_CHOICES.count("kvtier") == 1


def test_gpu_runner_gets_sglangs_flashinfer_backend(monkeypatch):
    # No GPU here: the runner and FlashInfer's factory are stand-ins; what is checked is
    # that the kvtier factory hands a CUDA runner to the registered "flashinfer" factory.
    seen = []
    monkeypatch.setitem(ATTENTION_BACKENDS, "flashinfer",
                        lambda runner: seen.append(runner) or "fi")
    runner = types.SimpleNamespace(device="cuda")
    assert attention_backend._create(runner) == "fi" and seen == [runner]


def test_backend_class_only_replaces_the_two_attention_loops():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    cls = attention_backend.KVTierAttnBackend
    assert issubclass(cls, TorchNativeAttnBackend)
    own = {name for name in vars(cls) if not name.startswith("__") and name != "_abc_impl"}
    helpers = {"_gather", "_decode_runs"}
    assert own == {"init_forward_metadata", "_run_sdpa_forward_extend",
                   "_run_sdpa_forward_decode"} | helpers
    # The overridden methods still exist upstream with these names (SGLang drift guard).
    for name in own - helpers:
        assert callable(getattr(TorchNativeAttnBackend, name))

import os

import pytest

from sgl_kvtier.cuda_shim import cpu_engine_env
from sgl_kvtier.harness.models import model_path

_OURS = ("KVTIER_ENABLED", "SGLANG_USE_CPU_ENGINE", "LD_LIBRARY_PATH")


@pytest.fixture(scope="session")
def model_dir():
    return model_path("smollm2")


@pytest.fixture(scope="session")
def clean_env():
    """This environment without anything that would make a CPU server start by itself."""
    return {k: v for k, v in os.environ.items() if k not in _OURS}


@pytest.fixture(scope="session")
def stock_env(clean_env):
    """What a stock SGLang CPU server needs on a host without an NVIDIA driver."""
    return {**clean_env, **cpu_engine_env()}

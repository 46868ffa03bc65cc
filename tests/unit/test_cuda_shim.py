"""The no-device driver shim is generated from what the installed wheels import."""

import ctypes
import os
import subprocess
import sys

import pytest

from sgl_kvtier import cuda_shim

# A bare environment, except for where the shim is cached.
_KEPT = ("HOME", "XDG_CACHE_HOME", "KVTIER_CACHE_DIR")
BARE = {"PATH": "/usr/bin:/bin", **{k: os.environ[k] for k in _KEPT if k in os.environ}}

pytestmark = pytest.mark.skipif(cuda_shim.has_real_driver(),
                                reason="a real NVIDIA driver is present; the shim is not used")


def test_symbols_come_from_the_installed_libraries():
    symbols, libraries = cuda_shim.imported_symbols()
    assert any("sgl_kernel" in str(p) for p in libraries)
    assert "cuInit" in symbols
    assert all(s.startswith("cu") for s in symbols)


def test_built_shim_has_soname_and_answers_no_device():
    path = cuda_shim.build()
    assert path.name == "libcuda.so.1"
    dynamic = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True).stdout
    assert "Library soname: [libcuda.so.1]" in dynamic
    lib = ctypes.CDLL(str(path))
    assert lib.cuInit(0) == 100  # CUDA_ERROR_NO_DEVICE
    symbols, _ = cuda_shim.imported_symbols()
    exported = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True,
                              text=True).stdout
    missing = [s for s in symbols if f" {s}\n" not in exported + "\n"]
    assert missing == []


def test_sgl_kernel_imports_only_with_the_shim():
    code = "import sgl_kernel; import torch; print(torch.cuda.is_available())"
    env_without = BARE
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env_without)
    assert bare.returncode != 0 and "libcuda.so.1" in bare.stderr
    shimmed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env_without, **cuda_shim.cpu_engine_env()})
    assert shimmed.returncode == 0, shimmed.stderr[-2000:]
    assert shimmed.stdout.strip().endswith("False")


def test_activate_works_without_environment_set_beforehand():
    code = ("from sgl_kvtier import cuda_shim; cuda_shim.activate(); import sgl_kernel; "
            "import os; print(os.environ['LD_LIBRARY_PATH'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=BARE)
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(cuda_shim.shim_path().parent) in out.stdout

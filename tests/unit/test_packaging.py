"""Both a plain and an editable install expose patches/ and kernels/ as subpackages."""

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_this_environment_is_an_editable_install():
    import sgl_kvtier.kernels
    import sgl_kvtier.patches

    assert Path(sgl_kvtier.patches.__file__) == ROOT / "patches" / "__init__.py"
    assert Path(sgl_kvtier.kernels.__file__) == ROOT / "kernels" / "__init__.py"
    plugins = entry_points(group="sglang.srt.plugins")
    assert any(ep.value == "sgl_kvtier.patches:register" for ep in plugins)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True)
    return next(out.glob("sgl_kvtier-*.whl"))


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module of the source tree, so a subpackage missing from pyproject's explicit
    # package list cannot slip through.
    sources = {f"sgl_kvtier/{p.relative_to(ROOT / 'sgl_kvtier')}"
               for p in (ROOT / "sgl_kvtier").rglob("*.py")}
    sources |= {f"sgl_kvtier/{d}/{p.relative_to(ROOT / d)}" for d in ("patches", "kernels")
                for p in (ROOT / d).rglob("*.py")}
    assert sources - names == set()
    assert "sgl_kvtier/patches/cli.py" in sources and "sgl_kvtier/tier/store.py" in sources
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[sglang.srt.plugins]" in text and "sgl_kvtier.patches:register" in text


def test_plain_install_imports_from_site_packages(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import sgl_kvtier.patches as p, "
            "sgl_kvtier.kernels as k; print(p.__file__); print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                         text=True, cwd=tmp_path, check=True).stdout.split()
    assert out == [str(target / "sgl_kvtier/patches/__init__.py"),
                   str(target / "sgl_kvtier/kernels/__init__.py")]

"""Only patches/ imports sglang; the core imports with sglang unavailable."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE_DIRS = ["sgl_kvtier", "kernels", "eval"]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_outside_patches_imports_sglang():
    offenders = [str(p.relative_to(ROOT)) for d in CORE_DIRS for p in (ROOT / d).rglob("*.py")
                 if "sglang" in imported_modules(p)]
    assert offenders == []


def test_patches_do_import_sglang():
    # The check above would pass vacuously if it could not see imports at all.
    assert "sglang" in imported_modules(ROOT / "patches" / "cli.py")


def test_core_imports_with_sglang_blocked():
    code = ("import sys; sys.modules['sglang'] = None\n"
            "import sgl_kvtier, sgl_kvtier.config, sgl_kvtier.attention.dense, "
            "sgl_kvtier.harness.models, sgl_kvtier.harness.resolve, sgl_kvtier.harness.server, "
            "sgl_kvtier.harness.prompts, sgl_kvtier.harness.demo, sgl_kvtier.cuda_shim, "
            "sgl_kvtier.tier, sgl_kvtier.tier.faults, sgl_kvtier.kernels\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr

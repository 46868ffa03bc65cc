"""The README's main job, exactly as shipped: it completes and its gates hold."""

from pathlib import Path

import pytest

from sgl_kvtier.eval.__main__ import main

pytestmark = pytest.mark.integration
QUICKSTART = Path(__file__).resolve().parents[2] / "eval" / "configs" / "quickstart.yaml"


def test_quickstart_completes_with_its_gates_passing(tmp_path, capsys):
    assert main(["run", str(QUICKSTART), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    folder = next(tmp_path.iterdir())
    assert (folder / "COMPLETE").is_file() and (folder / "ttft.png").is_file()
    assert "| kvtier | torch_native | 511 |" in out  # 1024 tokens, the second half scored
    assert "| kvtier | restart | 2048 | 2047 |" in out  # from disk after the restart
    assert "| torch_native | restart | 2048 | 0 |" in out
    assert out.count("| pass |") == 4 and "FAIL" not in out

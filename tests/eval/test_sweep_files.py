"""The shipped sweep files of eval/bidirectional_server.py are valid."""

import importlib.util
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]


def sweep_module():
    spec = importlib.util.spec_from_file_location("bidirectional_server",
                                                  ROOT / "eval" / "bidirectional_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", sorted((ROOT / "eval" / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_sweep_files_are_valid(path):
    spec = sweep_module().SweepSpec.model_validate(yaml.safe_load(path.read_text()))
    assert spec.prefix_tokens and spec.load_over_compute


def test_a_mistyped_key_is_refused():
    with pytest.raises(ValidationError, match="load_over_computing"):
        sweep_module().SweepSpec.model_validate(
            {"name": "x", "prefix_tokens": [1024], "load_over_compute": [1],
             "load_over_computing": [2]})

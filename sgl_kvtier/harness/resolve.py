"""One name for any model the harness can serve: embedded, dummy-weights shape, or path."""

from __future__ import annotations

from pathlib import Path

from sgl_kvtier.harness.model_shapes import SHAPES, shape_path
from sgl_kvtier.harness.models import EMBEDDED, model_path

__all__ = ["resolve_model"]


def resolve_model(name_or_path: str) -> Path:
    """A model directory for an embedded model's short name, a dummy-weights shape name
    (see :mod:`sgl_kvtier.harness.model_shapes`) or an existing path."""
    if name_or_path in EMBEDDED:
        return model_path(name_or_path)
    if name_or_path in SHAPES:
        return shape_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join([*EMBEDDED, *SHAPES])
        raise FileNotFoundError(f"model {name_or_path!r}: not an embedded model or shape "
                                f"({known}) and not a directory with a config.json")
    return path

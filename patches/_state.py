"""Whether kvtier is on in this process.

The main process learns it from ``--enable-kvtier``; SGLang's spawned processes (scheduler,
detokenizer) inherit ``KVTIER_ENABLED=1`` from it, and the scheduler additionally
receives the parsed configuration on its server arguments.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

from sgl_kvtier.config import KVTierConfig

ENABLE_ENV = "KVTIER_ENABLED"
_enabled = False


def mark_enabled() -> None:
    global _enabled
    _enabled = True


def is_enabled() -> bool:
    """True once ``--enable-kvtier`` was parsed here, or when inherited from the parent."""
    return _enabled or os.environ.get(ENABLE_ENV) == "1"


def is_launcher() -> bool:
    """True in the process the operator started (not in a spawned SGLang child)."""
    return multiprocessing.parent_process() is None


def requested_on_command_line() -> bool:
    # Before argument parsing, the only way to know the operator asked for kvtier. Spawned
    # children get the launcher's argv copied, so only the launcher may look.
    return is_launcher() and any(a == "--enable-kvtier" for a in sys.argv)


def config_of(server_args) -> KVTierConfig | None:
    """The kvtier configuration the launcher parsed and put on the server arguments
    (``None`` without ``--enable-kvtier``): the one way every consumer reads it."""
    received = getattr(server_args, "_kvtier", None)
    return None if received is None else KVTierConfig.model_validate(received["config"])


def config_path_of(server_args) -> str | None:
    """The ``--kvtier-config`` file the configuration came from, if any."""
    received = getattr(server_args, "_kvtier", None)
    return None if received is None else received["config_path"]

"""Test-only fault injection: make a named point of the tier fail or stall on purpose.

Off unless the environment variable ``SGL_KVTIER_FAULTS`` is set when the process starts
(SGLang's scheduler inherits it from the launcher). Its value is a comma-separated list of
``point:action``::

    SGL_KVTIER_FAULTS="copy:delay=3"              # every copy-out job waits 3 s first
    SGL_KVTIER_FAULTS="write:raise,scan:oserror"  # a bug in the writer, EIO in the scan

Actions: ``raise`` (a ``RuntimeError``: an unexpected bug), ``oserror`` (``OSError(EIO)``:
the storage failing), ``delay=SECONDS`` (sleep, to hold a window open). Points:

========  ================================================================
open      opening the tier (radix-cache factory, before the store exists)
scan      the start-up scan of the tier folder
match     looking a prompt up (``match_prefix``)
load      loading a disk hit into KV slots
offer     offering a computed prefix for writing (``checkpoint``)
copy      a copy-out job, before it reads the KV pool (once per job)
flush     ``flush_pending_backups`` (after every batch)
write     committing one chunk, on the writer thread
block     before each 4 MiB block of a chunk file is written
========  ================================================================

Nothing here is meant for production use; the tests that use it are the proof that each
point fails safely (the server keeps serving correct answers, one log line).
"""

from __future__ import annotations

import errno
import os
import time

__all__ = ["ENV", "POINTS", "InjectedFault", "hit", "parse", "active"]

ENV = "SGL_KVTIER_FAULTS"
POINTS = ("open", "scan", "match", "load", "offer", "copy", "flush", "write", "block")


class InjectedFault(RuntimeError):
    """Raised by a ``raise`` fault: stands for any unexpected bug at that point."""


def parse(spec: str) -> dict[str, tuple[str, float]]:
    """``"copy:delay=3,write:raise"`` -> ``{"copy": ("delay", 3.0), "write": ("raise", 0)}``.

    Raises
    ------
    ValueError
        Naming the part of ``spec`` that is not ``point:action`` with a known point and action.
    """
    faults: dict[str, tuple[str, float]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, action = part.partition(":")
        name, _, value = action.partition("=")
        if point not in POINTS or name not in ("raise", "oserror", "delay"):
            raise ValueError(f"{ENV}: {part!r} is not point:action with a point in "
                             f"{', '.join(POINTS)} and an action raise, oserror or delay=S")
        try:
            seconds = float(value) if name == "delay" else 0.0
        except ValueError:
            raise ValueError(f"{ENV}: {part!r}: delay needs seconds, e.g. delay=2") from None
        faults[point] = (name, seconds)
    return faults


_FAULTS = parse(os.environ.get(ENV, ""))


def active() -> dict[str, tuple[str, float]]:
    """The faults this process was started with (empty in production)."""
    return dict(_FAULTS)


def hit(point: str) -> None:
    """Pass a fault point: does nothing unless a fault is configured there."""
    if not _FAULTS:
        return
    fault = _FAULTS.get(point)
    if fault is None:
        return
    action, seconds = fault
    if action == "delay":
        time.sleep(seconds)
    elif action == "oserror":
        raise OSError(errno.EIO, f"injected I/O error at {point}")
    else:
        raise InjectedFault(f"injected fault at {point}")

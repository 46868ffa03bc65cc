"""The host memory this process may use: the machine's, capped by its memory cgroup.

A server in a container sees the host's physical memory through ``sysconf``, but the
kernel kills it at its cgroup's limit; a default budget taken from the former can exceed
the latter. Both cgroup versions are read, and every ancestor of the process's group, since
a limit set on a parent binds the children too.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["physical_memory", "cgroup_memory_limit", "usable_memory"]

# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value.
_V1_UNLIMITED = 1 << 62


def physical_memory() -> int:
    """Bytes of memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cgroup_memory_limit(root: Path = Path("/sys/fs/cgroup"),
                        membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """The smallest memory limit over this process's cgroups and their ancestors.

    Parameters
    ----------
    root : Path
        Where the cgroup file systems are mounted.
    membership : Path
        The process's ``/proc/<pid>/cgroup`` lines (``id:controllers:path``).

    Returns
    -------
    int or None
        Bytes, or None when no group on the way sets a limit (or none can be read).
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, group = parts
        if controllers == "":
            limits += _walk(root, root / "unified", group, "memory.max")
        elif "memory" in controllers.split(","):
            limits += _walk(root / "memory", None, group, "memory.limit_in_bytes")
    limits = [x for x in limits if x < _V1_UNLIMITED]
    return min(limits) if limits else None


def usable_memory() -> int:
    """Physical memory, capped by the cgroup limit when one is set."""
    limit = cgroup_memory_limit()
    return physical_memory() if limit is None else min(physical_memory(), limit)


def _walk(mount: Path, alt_mount: Path | None, group: str, name: str) -> list[int]:
    """Limits in ``name`` from ``group`` up to the mount's top, under whichever mount
    exists (cgroup v2 sits at the root on pure-v2 hosts, under ``unified`` on hybrid ones)."""
    found: list[int] = []
    if ".." in Path(group).parts:
        return found  # a group path that would leave the mount: read nothing outside it
    for base in (mount, alt_mount):
        if base is None or not base.is_dir():
            continue
        node = base / group.strip("/")
        for directory in (node, *node.parents):
            value = _read_limit(directory / name)
            if value is not None:
                found.append(value)
            if directory == base:
                break
    return found


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit

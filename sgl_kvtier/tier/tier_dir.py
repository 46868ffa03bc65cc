"""The tier's folder, reached only through directory file descriptors.

Anything under the folder may have been planted: a symlink where a shard folder should be,
a FIFO or a device under a chunk name, a file of another user. So, after the folder itself
is opened once (the operator's path may hold symlinks; its last component may not):

- every name is resolved relative to an open directory descriptor, with ``O_NOFOLLOW``:
  a symlink anywhere below the root is refused, never followed, so nothing outside the
  folder is ever created, read, renamed or deleted;
- files are opened with ``O_NONBLOCK`` and accepted only if ``fstat`` says they are
  regular files owned by this process's user and writable by nobody else; folders only
  if they are real folders with the same owner and no group or other write bit;
- the root must be owned by this user (or root) and not writable by group or others;
  a root of ours with a loose mode is fixed to 0700 (one log line), anything else refused.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ._log import log_once
from .direct_io import DirectFile, IOMode
from .keys import CHUNK_SUFFIX, check_key, temp_name

__all__ = ["TierDir", "UntrustedRoot", "UntrustedEntry", "QUARANTINE_DIR"]

QUARANTINE_DIR = "quarantine"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_FILE = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_LOOSE = stat.S_IWGRP | stat.S_IWOTH


class UntrustedRoot(OSError):
    """The tier folder itself cannot be trusted (owner, mode, or a symlink)."""


class UntrustedEntry(OSError):
    """Something under the folder that is not what a chunk or shard may be."""


def _check(st: os.stat_result, what: str, want_dir: bool) -> None:
    kind_ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not kind_ok:
        raise UntrustedEntry(errno.EPERM, f"{what} is not a regular "
                                          f"{'folder' if want_dir else 'file'}")
    if st.st_uid != os.geteuid():
        raise UntrustedEntry(errno.EPERM, f"{what} belongs to uid {st.st_uid}")
    if st.st_mode & _LOOSE:
        raise UntrustedEntry(errno.EPERM, f"{what} is writable by group or others "
                                          f"(mode {stat.S_IMODE(st.st_mode):o})")


class TierDir:
    """One tier folder (``root``), opened once; all access goes through its descriptor.

    Parameters
    ----------
    root
        The folder. Its parent is created if needed and may be reached through symlinks
        (the operator's choice); ``root`` itself is created with mode 0700 and must not
        be a symlink.

    Raises
    ------
    UntrustedRoot
        ``root`` is a symlink, not a folder, or owned by another user; or its parent is
        owned by another user than this one and root.
    OSError
        The folder cannot be created or opened.
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        parent = Path(os.path.realpath(root.parent))
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = parent / root.name
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _trusted_parent(parent_fd, parent)
            self.fd = _open_root(parent_fd, root.name, self.root)
        finally:
            os.close(parent_fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -------------------------------------------------------------------- folders

    @contextmanager
    def folder(self, name: str, create: bool = False) -> Iterator[int]:
        """A descriptor of the subfolder ``name`` (a shard or the quarantine).

        Raises ``FileNotFoundError`` if it is missing (and not ``create``),
        ``UntrustedEntry`` if it is a symlink, not a folder, or not ours.
        """
        fd = self.open_folder(name, create)
        try:
            yield fd
        finally:
            os.close(fd)

    def open_folder(self, name: str, create: bool = False) -> int:
        """As :meth:`folder`, returning the descriptor for the caller to close."""
        try:
            fd = os.open(name, _DIR, dir_fd=self.fd)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(name, 0o700, dir_fd=self.fd)
            except FileExistsError:
                pass  # another writer made it meanwhile
            fd = os.open(name, _DIR, dir_fd=self.fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UntrustedEntry(errno.EPERM, f"{self.root / name} is not a folder "
                                                  f"(a symlink?)") from None
            raise
        try:
            _check(os.fstat(fd), str(self.root / name), want_dir=True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---------------------------------------------------------------------- files

    def open_chunk(self, key: str, mode: IOMode, flags: int = os.O_RDONLY,
                   shard_fd: int | None = None) -> DirectFile:
        """Open the chunk file of ``key``; only a regular file of ours is accepted.

        ``shard_fd`` is its shard folder, already opened with :meth:`folder` (a scan opens
        each shard once). Raises ``FileNotFoundError`` when absent and ``UntrustedEntry``
        for a symlink, FIFO, device, folder, or a file of another user.
        """
        shard, name = _split(key)
        if shard_fd is None:
            with self.folder(shard) as dfd:
                return self.open_chunk(key, mode, flags, dfd)
        try:
            f = mode.open(name, flags | _FILE, dir_fd=shard_fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UntrustedEntry(errno.EPERM, f"{self.root / shard / name} is a "
                                                  f"symlink") from None
            raise
        try:
            _check(os.fstat(f.fd), str(self.root / shard / name), want_dir=False)
        except BaseException:
            os.close(f.fd)
            raise
        return f

    def create_temp(self, key: str, mode: IOMode) -> tuple[DirectFile, str]:
        """A new temporary file beside ``key``'s chunk file, open for writing."""
        shard, name = _split(key)
        tmp = temp_name(name)
        with self.folder(shard, create=True) as dfd:
            f = mode.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE, dir_fd=dfd)
        return f, tmp

    def publish(self, key: str, tmp: str, fsync: bool = False) -> bool:
        """Rename ``tmp`` to ``key``'s chunk name (the commit point); False, deleting
        ``tmp``, when the chunk already exists (another writer was first)."""
        shard, name = _split(key)
        with self.folder(shard) as dfd:
            if _exists(name, dfd):
                _unlink(tmp, dfd)
                return False
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            if fsync:
                os.fsync(dfd)
        return True

    def discard_temp(self, key: str, tmp: str) -> None:
        shard, _ = _split(key)
        try:
            with self.folder(shard) as dfd:
                _unlink(tmp, dfd)
        except OSError:
            pass

    def stat_chunk(self, key: str) -> os.stat_result | None:
        """The chunk file's ``lstat``, or None if it is absent or not a trusted file."""
        shard, name = _split(key)
        try:
            with self.folder(shard) as dfd:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            _check(st, name, want_dir=False)
        except OSError:
            return None
        return st

    def remove(self, key: str) -> bool:
        """Delete ``key``'s chunk file (whatever it is: a symlink is removed, not
        followed); True if something was deleted."""
        shard, name = _split(key)
        try:
            with self.folder(shard) as dfd:
                return _unlink(name, dfd)
        except OSError:
            return False

    def quarantine(self, key: str, reason: str, keep: int = 32) -> bool:
        """Move ``key``'s chunk file into ``quarantine/`` (delete it where that is not
        possible); True unless it had already gone. Logs the first time."""
        shard, name = _split(key)
        try:
            with self.folder(shard) as dfd:
                if not _exists(name, dfd):
                    return False
                self._set_aside(name, dfd, keep)
        except OSError:
            return False
        log_once("quarantine", logging.WARNING, "kv tier: quarantined %s: %s (later bad chunks "
                 "are counted in stats, not logged)", self.root / shard / name, reason)
        return True

    def _set_aside(self, name: str, dfd: int, keep: int) -> None:
        try:
            with self.folder(QUARANTINE_DIR, create=True) as qfd:
                os.rename(name, f"{name}.{time.time_ns()}", src_dir_fd=dfd, dst_dir_fd=qfd)
                _trim(qfd, keep)
        except OSError:
            _unlink(name, dfd)  # cannot set it aside: at least never read it again

    # ------------------------------------------------------------------ listing

    def shards(self) -> tuple[list[str], int]:
        """Names of the shard folders (two hex digits), and how many entries with a shard
        name were not real folders (symlinks, files: removed, the entry itself)."""
        good, bad = [], 0
        with os.scandir(self.fd) as it:
            for entry in it:
                if not _is_shard_name(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    good.append(entry.name)
                else:
                    bad += 1
                    _unlink(entry.name, self.fd)
        return sorted(good), bad

    def entries(self, shard: str,
                want_stat: Callable[[str], bool]) -> list[tuple[str, bool, os.stat_result | None]]:
        """``(name, is a regular file, lstat)`` of every entry of one shard folder; the
        kind comes from the listing itself, ``lstat`` only for names ``want_stat`` picks
        (a start-up scan of many thousand chunks then costs one listing per shard)."""
        out = []
        with self.folder(shard) as dfd, os.scandir(dfd) as it:
            for entry in it:
                try:
                    regular = entry.is_file(follow_symlinks=False)
                    st = entry.stat(follow_symlinks=False) if want_stat(entry.name) else None
                except FileNotFoundError:
                    continue
                out.append((entry.name, regular, st))
        return out

    def unlink_in(self, shard: str, name: str) -> bool:
        """Delete one entry of a shard folder (a temp file, a planted non-file)."""
        try:
            with self.folder(shard) as dfd:
                return _unlink(name, dfd)
        except OSError:
            return False

    def open_control(self, name: str) -> int:
        """A small control file of the root (lock, usage), opened read-write."""
        fd = os.open(name, os.O_RDWR | os.O_CREAT | _FILE, 0o600, dir_fd=self.fd)
        try:
            _check(os.fstat(fd), str(self.root / name), want_dir=False)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _trusted_parent(parent_fd: int, parent: Path) -> None:
    st = os.fstat(parent_fd)
    if st.st_uid not in (os.geteuid(), 0):
        raise UntrustedRoot(errno.EPERM, f"{parent} belongs to uid {st.st_uid}, not to this "
                                         f"server's user (uid {os.geteuid()})")
    # A sticky folder (like /tmp) lets nobody else rename or replace what we create in it.
    if st.st_mode & _LOOSE and not st.st_mode & stat.S_ISVTX:
        if st.st_uid != os.geteuid():
            raise UntrustedRoot(errno.EPERM, f"{parent} is writable by group or others "
                                             f"(mode {stat.S_IMODE(st.st_mode):o})")
        _fix_mode(parent_fd, parent, st)


def _open_root(parent_fd: int, name: str, where: Path) -> int:
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(name, _DIR, dir_fd=parent_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UntrustedRoot(errno.EPERM, f"{where} is not a folder (a symlink?)") from None
        raise
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise UntrustedRoot(errno.EPERM, f"{where} belongs to uid {st.st_uid}, not to this "
                                         f"server's user (uid {os.geteuid()})")
    if st.st_mode & _LOOSE:
        _fix_mode(fd, where, st)
    return fd


def _fix_mode(fd: int, path: Path, st: os.stat_result) -> None:
    os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~_LOOSE)
    log_once(f"mode:{path}", logging.WARNING, "kv tier: %s was writable by group or others "
             "(mode %o); removed those permissions", path, stat.S_IMODE(st.st_mode))


def _split(key: str) -> tuple[str, str]:
    check_key(key)
    return key[:2], f"{key}{CHUNK_SUFFIX}"


def _is_shard_name(name: str) -> bool:
    return len(name) == 2 and all(c in "0123456789abcdef" for c in name)


def _exists(name: str, dfd: int) -> bool:
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink(name: str, dfd: int) -> bool:
    try:
        os.unlink(name, dir_fd=dfd)
        return True
    except OSError:
        return False


def _trim(qfd: int, keep: int) -> None:
    """Keep the newest ``keep`` quarantined files (their names end in a time in ns)."""
    with os.scandir(qfd) as it:
        names = [e.name for e in it]
    names.sort(key=lambda n: int(s) if (s := n.rsplit(".", 1)[-1]).isdigit() else 0)
    for name in names[:-keep] if keep else names:
        _unlink(name, qfd)


"""File-system helpers shared by checkpoint and data writers (no torch import)."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

# Staging paths are named .<name>.tmp-<host>-<pid>-<random> beside their target: a later writer
# can tell that the process which made one is gone (same host, pid not alive) and remove what it
# left. A SIGKILL gives a process no chance to clean up after itself.
HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support it; the rename is still atomic
    finally:
        os.close(fd)


def staging_path(target: Path) -> Path:
    """A fresh hidden path beside ``target`` to build it under before renaming it into place."""
    return target.with_name(f".{target.name}.tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging files and folders of ``target`` (:func:`staging_path`) left by killed
    writers on this host: their process is gone, so nothing will finish or rename them. Those of
    live processes, of other hosts (a shared filesystem) and of any other name are left alone.
    Returns what was removed."""
    removed = []
    prefix = f".{target.name}.tmp-"
    pattern = re.compile(re.escape(prefix) + re.escape(HOST) + r"-(\d+)-[0-9a-f]+$")
    for path in target.parent.glob(f"{glob_escape(prefix)}*"):
        match = pattern.match(path.name)
        if not match or pid_alive(int(match.group(1))):
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", text)


class FolderLock:
    """An exclusive advisory lock on a folder: ``flock`` on the folder itself (no lock file to
    leave behind), held until :meth:`release` or the end of the process, however it ends (the
    kernel drops it on SIGKILL too, so a lock never goes stale). Not inherited by child processes.
    Where ``flock`` does not exist or the filesystem refuses it, locking is skipped: it guards
    against mistakes, and must not stop a run on such a system."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Take the lock if the folder exists; False only when another process holds it."""
        if self._fd is not None:
            return True
        try:
            import fcntl
        except ImportError:  # not a Unix system
            return True
        try:
            fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return True  # no folder yet: nothing to guard
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:
            os.close(fd)
            return True  # the filesystem does not lock
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def disk_full_error(exc: BaseException) -> OSError | None:
    """The "no space left" (or over quota) OSError behind ``exc``, if any: itself, its cause or
    its context."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None

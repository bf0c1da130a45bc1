"""File-system helpers shared by checkpoint and data writers (no torch import)."""

from __future__ import annotations

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

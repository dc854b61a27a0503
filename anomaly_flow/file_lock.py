"""Advisory locks on a small file beside what they guard (``flock``), for the places where
two processes must not work at once: a scoring run's output, a training's checkpoints, a
new sqlite store. The holder writes who it is into the file, so that the one refused can
say which process to wait for.

Where the platform has no ``flock`` (Windows), :data:`SUPPORTED` is false and callers
hold nothing; where the file system refuses locks (NFS without lockd, some FUSE mounts),
:func:`lock` raises ``OSError`` and each caller decides whether that is worth a warning.
"""

from __future__ import annotations

import os
import socket
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

SUPPORTED = fcntl is not None


def lock(handle: IO[Any], *, wait: bool = False) -> bool:
    """Lock the open file ``handle`` (exclusive): ``flock`` locks belong to an open file,
    so another ``open`` of the same path, in this process or another, is another holder.

    Returns:
        True once held; False where another open file holds it (only without ``wait``).

    Raises:
        OSError: The file system takes no locks.
    """
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def unlock(handle: IO[Any]) -> None:
    """Release :func:`lock` before ``handle`` is closed (closing it releases it too)."""
    fcntl.flock(handle, fcntl.LOCK_UN)


def claim(handle: IO[Any]) -> None:
    """Write who holds the lock into its file (opened for writing), in place of what a
    holder before wrote. Unbuffered: a write the disk refused raises here, not at close.

    Raises:
        OSError: The write failed (a full disk).
    """
    handle.seek(0)
    handle.truncate()
    os.write(handle.fileno(), f"pid {os.getpid()} on {socket.gethostname()}\n".encode())


def holder(handle: IO[Any]) -> str:
    """Who :func:`claim` says holds the lock ``handle`` could not take, on one line."""
    handle.seek(0)
    return " ".join(handle.read(200).split()) or "another process"

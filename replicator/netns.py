"""Entering a named network namespace for the current thread (``ip netns`` style).

Python 3.11 has no ``os.setns``, so this calls libc's ``setns(2)`` through ctypes.
A netlink socket belongs to the namespace it was *created* in, so the kernel port can
create its sockets inside a namespace and then return to the original one: the rest of
the process (trio, the control socket) stays where it was. Used by the tests and by the
``netns`` option of the daemon; production daemons simply run inside the namespace.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ReplicatorError

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise ReplicatorError(f"setns failed: {os.strerror(err)}")


@contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace ``name``.

    ``None`` means "stay where we are" so callers need no special case.
    """
    if name is None:
        yield
        return
    path = os.path.join(NETNS_RUN_DIR, name)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ReplicatorError(f"network namespace {name!r} not found: {exc}") from exc
    own = f"/proc/self/task/{threading.get_native_id()}/ns/net"
    original = os.open(own, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)

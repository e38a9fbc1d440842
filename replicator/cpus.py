"""Keeping two threads on different CPUs: the event loop's, and a helper's.

Why: a commit's sending thread (:func:`replicator.inject.run_overlapped`) spends its
time inside ``sendto`` while the event loop's thread builds the next datagram; the
overlap is the point. On a virtual machine the scheduler would rather not wake a
thread on an idle virtual CPU (one that halted looks preempted to the guest, see
``available_idle_cpu``), so the two threads were measured taking turns on one CPU
while the other idled (a 10 k-entry commit inside the daemon 30 ms, the same write in
a fresh process 22 ms; ``perf sched`` showed the sending thread preempted by the event
loop's on CPU 0, CPU 1 idle). Firewalls run as virtual machines often enough that the
two are kept apart while a commit writes: the event loop's thread on the CPU it was
on, the sending thread on the others (keeping only the sending thread off it was not
enough: woken by the sending thread, the event loop's thread followed it to its CPU).

Linux only (``sched_getcpu``, per-thread affinity); where either is missing, or the
process has one CPU, nothing is changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable, Iterator

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_sched_getcpu = getattr(_libc, "sched_getcpu", None)


def current_cpu() -> int | None:
    """The CPU the calling thread runs on right now, or ``None`` if unknown."""
    if _sched_getcpu is None:
        return None
    cpu = int(_sched_getcpu())
    return cpu if cpu >= 0 else None


def affinity() -> set[int]:
    """The CPUs the calling thread may run on (empty if unknown)."""
    try:
        return os.sched_getaffinity(0)  # 0: the calling thread
    except OSError:
        return set()


@contextlib.contextmanager
def kept_on(cpu: int | None) -> Iterator[None]:
    """Within the block, keep the calling thread on ``cpu``, then restore its affinity.
    Does nothing if ``cpu`` is ``None``, not one the thread may use, or the only one."""
    with _affinity(cpu, affinity(), lambda allowed: allowed & {cpu}):
        yield


@contextlib.contextmanager
def kept_off(cpu: int | None, allowed: set[int] | None = None) -> Iterator[None]:
    """Within the block, keep the calling thread on the CPUs of ``allowed`` (default:
    its affinity) but ``cpu``; afterwards it may use all of ``allowed``. Does nothing if
    ``cpu`` is ``None``, not in ``allowed``, or the only one.

    Pass the other thread's affinity from before it was kept on ``cpu``: a thread it
    starts meanwhile inherits ``{cpu}`` alone."""
    with _affinity(cpu, affinity() if allowed is None else allowed,
                   lambda allowed: allowed - {cpu}):
        yield


@contextlib.contextmanager
def _affinity(cpu: int | None, allowed: set[int], mask: Callable[[set[int]], set[int]]
              ) -> Iterator[None]:
    """Set the calling thread's affinity to ``mask(allowed)`` within the block, then to
    ``allowed``."""
    if cpu is None or cpu not in allowed or len(allowed) < 2:
        yield
        return
    try:
        os.sched_setaffinity(0, mask(allowed))
    except OSError:  # e.g. a cpuset changed meanwhile: run where the scheduler likes
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, allowed)

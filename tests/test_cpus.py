"""Keeping two threads on different CPUs for the length of a block (replicator.cpus)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from replicator import cpus

T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread (its affinity is its own); what it returned."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    (result,) = out
    return result


def boom() -> None:
    raise RuntimeError("boom")


def test_the_current_cpu_is_one_the_thread_may_run_on() -> None:
    cpu = cpus.current_cpu()
    assert cpu is None or cpu in os.sched_getaffinity(0)


def test_a_thread_is_kept_on_or_off_a_cpu_inside_the_block_only() -> None:
    def probe() -> tuple[set[int], set[int], set[int], set[int]]:
        allowed = os.sched_getaffinity(0)
        cpu = min(allowed)
        with cpus.kept_on(cpu):
            on = os.sched_getaffinity(0)
        with cpus.kept_off(cpu):
            off = os.sched_getaffinity(0)
        return allowed, on, off, os.sched_getaffinity(0)

    allowed, on, off, after = in_thread(probe)
    assert after == allowed
    cpu = min(allowed)
    if len(allowed) < 2:  # one CPU: nothing to keep apart, nothing changed
        assert on == off == allowed
    else:
        assert on == {cpu}
        assert off == allowed - {cpu}


def test_nothing_changes_for_an_unknown_or_unusable_cpu() -> None:
    def probe() -> list[set[int]]:
        allowed = os.sched_getaffinity(0)
        seen = []
        for cpu in (None, max(allowed) + 1):
            with cpus.kept_on(cpu):
                seen.append(os.sched_getaffinity(0))
            with cpus.kept_off(cpu):
                seen.append(os.sched_getaffinity(0))
        return [allowed, *seen]

    allowed, *seen = in_thread(probe)
    assert all(s == allowed for s in seen)


def test_the_affinity_is_restored_when_the_block_raises() -> None:
    def probe() -> tuple[set[int], set[int]]:
        allowed = os.sched_getaffinity(0)
        with contextlib.suppress(RuntimeError), cpus.kept_off(min(allowed)):
            boom()
        return allowed, os.sched_getaffinity(0)

    allowed, after = in_thread(probe)
    assert after == allowed


def test_a_thread_started_while_the_loop_was_kept_on_its_cpu_is_freed_by_kept_off() -> None:
    """A thread started meanwhile inherits the one CPU; given the loop's affinity from
    before, kept_off moves it to the others, and leaves it free to use them all."""
    full = os.sched_getaffinity(0)
    cpu = min(full)

    def probe() -> tuple[set[int], set[int]]:
        os.sched_setaffinity(0, {cpu})  # as inherited
        with cpus.kept_off(cpu, full):
            inside = os.sched_getaffinity(0)
        return inside, os.sched_getaffinity(0)

    inside, after = in_thread(probe)
    if len(full) < 2:
        assert inside == after == {cpu}
    else:
        assert inside == full - {cpu}
        assert after == full

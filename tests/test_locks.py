"""replicator.locks: a free lock is taken without giving the turn away."""

from __future__ import annotations

import trio

from replicator import locks


async def test_a_free_lock_is_taken_without_letting_another_task_run() -> None:
    # trio runs the tasks ready at a turn in either order, so a lock taken by giving
    # the turn away would let the other task run first only half of the time: twenty
    # are taken.
    lock = trio.Lock()
    ran: list[int] = []
    for i in range(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_note, ran, i)  # ready to run at the next turn
            async with locks.held(lock):
                assert lock.locked() and len(ran) == i
            assert not lock.locked() and len(ran) == i
    assert ran == list(range(20))


async def test_a_held_lock_is_waited_for() -> None:
    lock = trio.Lock()
    order: list[str] = []

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with lock:
            task_status.started()
            await trio.sleep(0.01)
            order.append("released")

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        await locks.acquire(lock)
        order.append("acquired")
        lock.release()
    assert order == ["released", "acquired"]


async def test_a_cancelled_wait_for_a_held_lock_takes_nothing() -> None:
    lock = trio.Lock()
    release = trio.Event()

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with lock:
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        with trio.move_on_after(0.01) as scope:
            await locks.acquire(lock)
        assert scope.cancelled_caught
        release.set()
    assert not lock.locked()


async def _note(ran: list[int], i: int) -> None:
    ran.append(i)

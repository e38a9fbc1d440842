"""The role runner: actions performed one at a time, completions fed back, races."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from replicator.errors import KernelError
from replicator.logs import KeyValueFormatter
from replicator.role import Action, RoleMachine, Verdict, VrrpEvent, VrrpKind, VrrpState
from replicator.roletask import RoleRunner


def ev(state: VrrpState) -> VrrpEvent:
    return VrrpEvent(VrrpKind.GROUP, "VG", state, 100)


class Performer:
    """Records actions; an action blocks until the test releases it (when gated)."""

    def __init__(self, gated: set[Action] | None = None, failing: set[Action] | None = None):
        self.log: list[Action] = []
        self.gated = gated or set()
        self.failing = failing or set()
        self.release = trio.Event()

    async def __call__(self, action: Action) -> None:
        self.log.append(action)
        if action in self.gated:
            await self.release.wait()
        if action in self.failing:
            raise KernelError("commit refused", errno=12)


async def test_plan_runs_in_order(nursery: trio.Nursery) -> None:
    performer = Performer()
    runner = RoleRunner(RoleMachine(hot=False), performer)
    await nursery.start(runner.run)
    assert runner.feed(ev(VrrpState.MASTER)).verdict is Verdict.ACCEPTED
    await trio.testing.wait_all_tasks_blocked()
    assert performer.log == [Action.COMMIT, Action.BECOME_SENDER, Action.BULK_SEND]
    assert runner.machine.settled


async def test_backup_during_a_slow_commit(nursery: trio.Nursery) -> None:
    performer = Performer(gated={Action.COMMIT})
    runner = RoleRunner(RoleMachine(hot=False), performer)
    await nursery.start(runner.run)
    runner.feed(ev(VrrpState.MASTER))
    await trio.testing.wait_all_tasks_blocked()
    assert performer.log == [Action.COMMIT]  # blocked in the commit
    assert runner.feed(ev(VrrpState.BACKUP)).start is None
    assert runner.feed(ev(VrrpState.BACKUP)).verdict is Verdict.DUPLICATE
    performer.release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert performer.log == [
        Action.COMMIT,
        Action.BECOME_RECEIVER,
        Action.SHORTEN_TIMERS,
        Action.REQUEST_RESYNC,
    ]


async def test_a_failed_action_does_not_stop_the_failover(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    performer = Performer(failing={Action.COMMIT})
    runner = RoleRunner(RoleMachine(hot=False), performer)
    await nursery.start(runner.run)
    runner.feed(ev(VrrpState.MASTER))
    await trio.testing.wait_all_tasks_blocked()
    assert performer.log == [Action.COMMIT, Action.BECOME_SENDER, Action.BULK_SEND]
    failures = [r for r in caplog.records if r.getMessage() == "role action failed"]
    assert len(failures) == 1
    line = KeyValueFormatter(journal=False).format(failures[0])
    assert line.endswith('msg="role action failed" action=commit error="commit refused"')


async def test_lines_fed_before_the_runner_starts_are_not_lost() -> None:
    performer = Performer()
    runner = RoleRunner(RoleMachine(hot=True), performer)
    runner.feed(ev(VrrpState.FAULT))
    async with trio.open_nursery() as nursery:
        await nursery.start(runner.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert performer.log == [Action.BECOME_RECEIVER, Action.SHORTEN_TIMERS]

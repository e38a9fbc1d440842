"""The trio shell around :class:`~replicator.role.RoleMachine`: runs its actions.

Notify lines reach :meth:`RoleRunner.feed` from any task (the FIFO reader, the control
socket's ``notify`` command); :meth:`RoleRunner.run` performs the actions the machine
hands out, one at a time, and reports each completion back to it. All sequencing and
race decisions stay in the pure machine; this class only waits and calls.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio

from .errors import ReplicatorError
from .logs import fields
from .role import Action, FeedResult, RoleMachine, VrrpEvent

log = logging.getLogger(__name__)

#: Carries out one action (commit, bulk send, ...). A ReplicatorError it raises is
#: logged and the action counts as completed: failover must go on.
Perform = Callable[[Action], Awaitable[None]]


class RoleRunner:
    """Feeds notify lines to the machine and performs its actions in order."""

    def __init__(self, machine: RoleMachine, perform: Perform) -> None:
        self.machine = machine
        self._perform = perform
        self._wakeup = trio.Event()

    def feed(self, event: VrrpEvent) -> FeedResult:
        """Hand one notify line to the machine (synchronous: safe from any task)."""
        result = self.machine.feed(event)
        log.info(
            "keepalived transition",
            extra=fields(
                kind=event.kind,
                name=event.name,
                state=event.state,
                priority=event.priority,
                verdict=result.verdict,
                role=self.machine.role,
            ),
        )
        if result.start is not None:
            self._wakeup.set()
        return result

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Perform actions as the machine hands them out, forever."""
        task_status.started()
        while True:
            action = self.machine.running
            if action is None:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            log.info("role action started", extra=fields(action=action))
            failure: ReplicatorError | None = None
            try:
                await self._perform(action)
            except ReplicatorError as exc:
                failure = exc
            if failure is None:
                log.info("role action done", extra=fields(action=action))
            else:
                log.error("role action failed", extra=fields(action=action, error=failure))
            self.machine.done(action)

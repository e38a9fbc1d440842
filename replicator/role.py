"""keepalived transitions → ordered actions: a pure state machine.

Theory of operation
-------------------
keepalived tells us what this node *is* (``MASTER``, ``BACKUP``, ``FAULT``, ``STOP``,
``DELETED``) through lines ``GROUP|INSTANCE name STATE priority``, either as arguments of
a ``notify`` script (``replicator notify ...``) or through ``vrrp_notify_fifo`` (the same
fields, with the name in double quotes). Each accepted transition has a fixed *plan*, an
ordered list of :class:`Action`, the equivalent of conntrackd's ``primary-backup.sh``:

=================  ===============================================================
new role           plan
=================  ===============================================================
``MASTER``         ``COMMIT`` (cache mode only: in hot mode the peer's entries are
                   already in the kernel), ``BECOME_SENDER``, ``BULK_SEND``
``BACKUP``         ``BECOME_RECEIVER``, ``SHORTEN_TIMERS``, ``REQUEST_RESYNC``
``FAULT``          ``BECOME_RECEIVER``, ``SHORTEN_TIMERS``
``STOPPED``        ``BECOME_RECEIVER``, ``SHORTEN_TIMERS``
=================  ===============================================================

``STOP`` (keepalived is shutting down) and ``DELETED`` (the instance left keepalived's
configuration) both mean "this node will not forward for the VIPs any more", which is
what ``FAULT`` means too: the node stops claiming its table and lets the entries it no
longer owns expire soon. ``BECOME_RECEIVER`` comes first in every non-master plan so
that a node that lost mastership stops acting as the source of truth before anything
else; in the ``BACKUP`` plan ``SHORTEN_TIMERS`` precedes ``REQUEST_RESYNC`` so that the
peer's full resync restores the real timeouts of every entry that is still alive there.

The plan of a transition does not depend on where it came from: ``INIT → MASTER`` and
``BACKUP → MASTER`` run the same actions, which keeps the behaviour predictable.

Sequencing and races
--------------------
Actions run strictly one at a time. The caller starts the action this machine hands out
and reports its completion with :meth:`RoleMachine.done`; only then is the next action
handed out. This makes every race explicit:

* A transition that arrives while an action is running *supersedes* the pending rest of
  the current plan: the running action is never interrupted (a half-done commit would
  leave the kernel in an unknown state, and commits take about a second for 200 k
  entries), but once it completes, the new plan runs from its first action and the
  superseded plan's remaining actions are dropped.
  Example: ``MASTER`` starts ``COMMIT``; ``BACKUP`` arrives during the commit; when the
  commit completes the machine hands out ``BECOME_RECEIVER`` (not ``BECOME_SENDER``).
* A line whose state equals the target of the latest accepted transition is a
  *duplicate* and changes nothing, even while that transition's plan is still running
  (keepalived repeats states, e.g. a ``GROUP`` line after its ``INSTANCE`` lines).
* ``MASTER → BACKUP → MASTER`` in quick succession is two real transitions: the second
  ``MASTER`` plan runs in full (its ``COMMIT`` is an idempotent upsert).
* Informational lines (``MASTER_RX_LOWER_PRI``, ``MASTER_PRIORITY``,
  ``BACKUP_PRIORITY``) and lines for another group/instance than the one followed are
  reported as such and change nothing.
* A failed action still counts as completed: failover must go on (the caller logs and
  counts the failure), so completion carries no success flag.

Invariants (checked by the hypothesis tests): at most one action is running; the actions
started on behalf of one transition are a prefix of its plan, in order, each at most
once; the latest transition's plan always runs to its end; the role is the target of the
latest non-duplicate followed line.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from .errors import NotifyDecodeError, RoleError

#: Longest notify line accepted (keepalived names are short; this only bounds garbage).
MAX_NOTIFY_LINE = 512


class VrrpState(enum.StrEnum):
    """The state word of a keepalived notify line."""

    MASTER = "MASTER"
    BACKUP = "BACKUP"
    FAULT = "FAULT"
    STOP = "STOP"
    DELETED = "DELETED"
    #: Informational FIFO-only events: they never change the role.
    MASTER_RX_LOWER_PRI = "MASTER_RX_LOWER_PRI"
    MASTER_PRIORITY = "MASTER_PRIORITY"
    BACKUP_PRIORITY = "BACKUP_PRIORITY"


class VrrpKind(enum.StrEnum):
    """Whether a notify line is about a ``vrrp_sync_group`` or a ``vrrp_instance``."""

    GROUP = "GROUP"
    INSTANCE = "INSTANCE"


class Role(enum.StrEnum):
    """What this node is, as far as replication is concerned."""

    #: No notify line seen yet since the daemon started.
    INIT = "INIT"
    MASTER = "MASTER"
    BACKUP = "BACKUP"
    FAULT = "FAULT"
    #: keepalived stopped, or the followed instance was deleted from its configuration.
    STOPPED = "STOPPED"


class Action(enum.StrEnum):
    """One step of a transition plan, carried out by the daemon."""

    #: Write the external cache (the peer's entries) into the kernel (``conntrackd -c``).
    COMMIT = "commit"
    #: This node's kernel table is now the source of truth: stream it to the peer.
    BECOME_SENDER = "become-sender"
    #: Send every entry of the internal cache to the peer (``conntrackd -B``).
    BULK_SEND = "bulk-send"
    #: The peer's table is the source of truth: hold (hot mode: apply) its entries.
    BECOME_RECEIVER = "become-receiver"
    #: Lower the kernel timeouts of entries this node no longer owns (``conntrackd -t``).
    SHORTEN_TIMERS = "shorten-timers"
    #: Ask the peer for a full resync of its table (``conntrackd -n``).
    REQUEST_RESYNC = "request-resync"


class VrrpEvent(NamedTuple):
    """One keepalived notify line."""

    kind: VrrpKind
    name: str
    state: VrrpState
    priority: int


class Verdict(enum.StrEnum):
    """What the machine made of a notify line."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    NOT_FOLLOWED = "not-followed"
    INFORMATIONAL = "informational"


class FeedResult(NamedTuple):
    """Outcome of :meth:`RoleMachine.feed`: the verdict and the action to start now."""

    verdict: Verdict
    start: Action | None


_TARGET = {
    VrrpState.MASTER: Role.MASTER,
    VrrpState.BACKUP: Role.BACKUP,
    VrrpState.FAULT: Role.FAULT,
    VrrpState.STOP: Role.STOPPED,
    VrrpState.DELETED: Role.STOPPED,
}


def target_role(state: VrrpState) -> Role | None:
    """The role a state word moves to, or ``None`` for informational states."""
    return _TARGET.get(state)


def plan(role: Role, *, hot: bool) -> tuple[Action, ...]:
    """The ordered actions of a transition to ``role`` (see the module docstring)."""
    if role is Role.MASTER:
        master = (Action.BECOME_SENDER, Action.BULK_SEND)
        return master if hot else (Action.COMMIT, *master)
    if role is Role.BACKUP:
        return (Action.BECOME_RECEIVER, Action.SHORTEN_TIMERS, Action.REQUEST_RESYNC)
    if role in (Role.FAULT, Role.STOPPED):
        return (Action.BECOME_RECEIVER, Action.SHORTEN_TIMERS)
    raise RoleError(f"no transition leads to {role}")


def parse_notify(line: str) -> VrrpEvent:
    """Parse ``GROUP|INSTANCE name STATE priority`` (name optionally in double quotes).

    Raises :class:`~replicator.errors.NotifyDecodeError` and nothing else.
    """
    if len(line) > MAX_NOTIFY_LINE:
        raise NotifyDecodeError(f"notify line longer than {MAX_NOTIFY_LINE} characters")
    text = line.strip()
    head, sep, rest = text.partition(" ")
    if not sep:
        raise NotifyDecodeError(f"notify line has too few fields: {text!r}")
    rest = rest.lstrip(" ")
    if rest.startswith('"'):
        # keepalived's FIFO quotes the name: INSTANCE "VI_1" MASTER 100
        name, quote, tail = rest[1:].partition('"')
        if not quote:
            raise NotifyDecodeError(f"unterminated quoted name: {text!r}")
        fields = tail.split()
    else:
        name, _, tail = rest.partition(" ")
        fields = tail.split()
    if len(fields) != 2:
        raise NotifyDecodeError(f"expected 'GROUP|INSTANCE NAME STATE PRIORITY': {text!r}")
    state_word, priority_word = fields
    try:
        kind = VrrpKind(head)
    except ValueError:
        raise NotifyDecodeError(f"unknown kind {head!r} (GROUP or INSTANCE)") from None
    try:
        state = VrrpState(state_word)
    except ValueError:
        raise NotifyDecodeError(f"unknown state {state_word!r}") from None
    if not name or any(c.isspace() or c == '"' for c in name):
        raise NotifyDecodeError(f"bad group/instance name {name!r}")
    if not (priority_word.isascii() and priority_word.isdigit()) or len(priority_word) > 3:
        raise NotifyDecodeError(f"bad priority {priority_word!r}")
    priority = int(priority_word)
    if priority > 255:
        raise NotifyDecodeError(f"priority {priority} out of range 0..255")
    return VrrpEvent(kind, name, state, priority)


def format_notify(event: VrrpEvent) -> str:
    """The line :func:`parse_notify` reads back as ``event`` (unquoted name)."""
    return f"{event.kind} {event.name} {event.state} {event.priority}"


class RoleMachine:
    """The keepalived role state machine. Pure: no I/O, no clock.

    ``follow`` names the ``vrrp_sync_group`` or ``vrrp_instance`` whose lines drive the
    role; empty follows every line (fine for a single instance with a notify script).
    ``hot`` drops ``COMMIT`` from the master plan.
    """

    def __init__(self, *, hot: bool, follow: str = "") -> None:
        self._hot = hot
        self._follow = follow
        self._role = Role.INIT
        self._transitions = 0
        self._running: Action | None = None
        self._pending: list[Action] = []

    @property
    def role(self) -> Role:
        """Target role of the latest accepted transition (its plan may still be running)."""
        return self._role

    @property
    def transitions(self) -> int:
        """How many transitions were accepted so far (a serial for logs)."""
        return self._transitions

    @property
    def running(self) -> Action | None:
        """The action handed out and not yet reported done."""
        return self._running

    @property
    def pending(self) -> tuple[Action, ...]:
        """Actions still to hand out for the latest transition, in order."""
        return tuple(self._pending)

    @property
    def settled(self) -> bool:
        """True when the latest transition's plan has run to its end."""
        return self._running is None and not self._pending

    def feed(self, event: VrrpEvent) -> FeedResult:
        """Take one notify line; return the verdict and the action to start now, if any."""
        if self._follow and event.name != self._follow:
            return FeedResult(Verdict.NOT_FOLLOWED, None)
        role = target_role(event.state)
        if role is None:
            return FeedResult(Verdict.INFORMATIONAL, None)
        if role is self._role:
            return FeedResult(Verdict.DUPLICATE, None)
        self._role = role
        self._transitions += 1
        self._pending = list(plan(role, hot=self._hot))
        if self._running is not None:
            # Superseded: the running action finishes first (see "Sequencing and races").
            return FeedResult(Verdict.ACCEPTED, None)
        return FeedResult(Verdict.ACCEPTED, self._next())

    def done(self, action: Action) -> Action | None:
        """Report that ``action`` completed (successfully or not); return the next one."""
        if self._running is not action:
            raise RoleError(f"{action} completed but {self._running or 'nothing'} was running")
        self._running = None
        return self._next()

    def _next(self) -> Action | None:
        if self._pending:
            self._running = self._pending.pop(0)
        return self._running

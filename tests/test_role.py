"""The keepalived role machine: plans, parsing, every order of events, races."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.errors import NotifyDecodeError, RoleError
from replicator.role import (
    Action,
    Role,
    RoleMachine,
    Verdict,
    VrrpEvent,
    VrrpKind,
    VrrpState,
    format_notify,
    parse_notify,
    plan,
    target_role,
)

A = Action
MASTER_CACHE = (A.COMMIT, A.BECOME_SENDER, A.BULK_SEND)
MASTER_HOT = (A.BECOME_SENDER, A.BULK_SEND)
BACKUP = (A.BECOME_RECEIVER, A.SHORTEN_TIMERS, A.REQUEST_RESYNC)
NOT_MASTER = (A.BECOME_RECEIVER, A.SHORTEN_TIMERS)


def ev(state: VrrpState, name: str = "VG_FW", kind: VrrpKind = VrrpKind.GROUP) -> VrrpEvent:
    return VrrpEvent(kind, name, state, 100)


def run_to_end(machine: RoleMachine, first: Action | None) -> list[Action]:
    """Complete actions one by one until the machine is settled; return them in order."""
    done: list[Action] = []
    action = first
    while action is not None:
        done.append(action)
        action = machine.done(action)
    assert machine.settled
    return done


# --- plans ---------------------------------------------------------------------------


def test_plans_match_the_documented_table() -> None:
    assert plan(Role.MASTER, hot=False) == MASTER_CACHE
    assert plan(Role.MASTER, hot=True) == MASTER_HOT
    for hot in (False, True):
        assert plan(Role.BACKUP, hot=hot) == BACKUP
        assert plan(Role.FAULT, hot=hot) == NOT_MASTER
        assert plan(Role.STOPPED, hot=hot) == NOT_MASTER


def test_init_has_no_plan() -> None:
    with pytest.raises(RoleError):
        plan(Role.INIT, hot=False)


def test_state_words_map_to_roles() -> None:
    assert target_role(VrrpState.STOP) is Role.STOPPED
    assert target_role(VrrpState.DELETED) is Role.STOPPED
    assert target_role(VrrpState.MASTER_PRIORITY) is None


@pytest.mark.parametrize(
    ("state", "hot", "expected"),
    [
        (VrrpState.MASTER, False, MASTER_CACHE),
        (VrrpState.MASTER, True, MASTER_HOT),
        (VrrpState.BACKUP, False, BACKUP),
        (VrrpState.FAULT, False, NOT_MASTER),
        (VrrpState.STOP, True, NOT_MASTER),
        (VrrpState.DELETED, False, NOT_MASTER),
    ],
)
def test_each_transition_from_init_runs_its_plan(
    state: VrrpState, hot: bool, expected: tuple[Action, ...]
) -> None:
    machine = RoleMachine(hot=hot)
    result = machine.feed(ev(state))
    assert result.verdict is Verdict.ACCEPTED
    assert run_to_end(machine, result.start) == list(expected)
    assert machine.transitions == 1


@pytest.mark.parametrize(
    ("first", "second"),
    list(itertools.permutations([VrrpState.MASTER, VrrpState.BACKUP, VrrpState.FAULT], 2)),
)
def test_every_settled_pair_of_transitions(first: VrrpState, second: VrrpState) -> None:
    machine = RoleMachine(hot=False)
    run_to_end(machine, machine.feed(ev(first)).start)
    result = machine.feed(ev(second))
    role = target_role(second)
    assert role is not None
    assert run_to_end(machine, result.start) == list(plan(role, hot=False))
    assert machine.role is role


# --- duplicates, filters, informational lines ----------------------------------------


def test_duplicate_is_ignored_even_while_its_plan_runs() -> None:
    machine = RoleMachine(hot=False)
    first = machine.feed(ev(VrrpState.MASTER)).start
    assert first is A.COMMIT
    # keepalived repeats: the INSTANCE lines, then the GROUP line, all MASTER.
    assert machine.feed(ev(VrrpState.MASTER)) == (Verdict.DUPLICATE, None)
    assert run_to_end(machine, first) == list(MASTER_CACHE)
    assert machine.feed(ev(VrrpState.MASTER)) == (Verdict.DUPLICATE, None)
    assert machine.transitions == 1


def test_stop_and_deleted_are_the_same_role() -> None:
    machine = RoleMachine(hot=False)
    run_to_end(machine, machine.feed(ev(VrrpState.STOP)).start)
    assert machine.feed(ev(VrrpState.DELETED)).verdict is Verdict.DUPLICATE


def test_lines_of_other_instances_are_not_followed() -> None:
    machine = RoleMachine(hot=False, follow="VG_FW")
    result = machine.feed(ev(VrrpState.MASTER, name="VI_OTHER", kind=VrrpKind.INSTANCE))
    assert result == (Verdict.NOT_FOLLOWED, None)
    assert machine.role is Role.INIT
    assert machine.feed(ev(VrrpState.MASTER)).verdict is Verdict.ACCEPTED


def test_without_follow_every_name_drives() -> None:
    machine = RoleMachine(hot=True)
    assert machine.feed(ev(VrrpState.BACKUP, name="anything")).verdict is Verdict.ACCEPTED


@pytest.mark.parametrize(
    "state", [VrrpState.MASTER_RX_LOWER_PRI, VrrpState.MASTER_PRIORITY, VrrpState.BACKUP_PRIORITY]
)
def test_informational_lines_change_nothing(state: VrrpState) -> None:
    machine = RoleMachine(hot=False)
    assert machine.feed(ev(state)) == (Verdict.INFORMATIONAL, None)
    assert machine.role is Role.INIT
    assert machine.settled


# --- races ---------------------------------------------------------------------------


def test_backup_during_master_commit_waits_for_the_commit_then_runs_backup() -> None:
    machine = RoleMachine(hot=False)
    assert machine.feed(ev(VrrpState.MASTER)).start is A.COMMIT
    result = machine.feed(ev(VrrpState.BACKUP))
    assert result == (Verdict.ACCEPTED, None)  # the commit is still running
    assert machine.running is A.COMMIT
    assert machine.pending == BACKUP
    assert machine.role is Role.BACKUP
    # The commit completes: the master plan's rest is dropped, the backup plan runs.
    assert run_to_end(machine, A.COMMIT) == [A.COMMIT, *BACKUP]


def test_master_backup_master_during_a_commit_runs_the_second_master_plan_in_full() -> None:
    machine = RoleMachine(hot=False)
    machine.feed(ev(VrrpState.MASTER))
    machine.feed(ev(VrrpState.BACKUP))
    assert machine.feed(ev(VrrpState.MASTER)).verdict is Verdict.ACCEPTED
    assert machine.transitions == 3
    assert run_to_end(machine, A.COMMIT) == [A.COMMIT, *MASTER_CACHE]


def test_fault_in_the_middle_of_a_backup_plan() -> None:
    machine = RoleMachine(hot=True)
    first = machine.feed(ev(VrrpState.BACKUP)).start
    assert first is A.BECOME_RECEIVER
    second = machine.done(A.BECOME_RECEIVER)
    assert second is A.SHORTEN_TIMERS
    machine.feed(ev(VrrpState.FAULT))
    assert run_to_end(machine, second) == [A.SHORTEN_TIMERS, *NOT_MASTER]


def test_completing_an_action_that_is_not_running_is_a_bug() -> None:
    machine = RoleMachine(hot=False)
    with pytest.raises(RoleError, match="nothing was running"):
        machine.done(A.COMMIT)
    machine.feed(ev(VrrpState.MASTER))
    with pytest.raises(RoleError, match="commit was running"):
        machine.done(A.BULK_SEND)


# --- hypothesis: arbitrary interleavings of lines and completions --------------------

FOLLOWED = "VG_FW"
line_events = st.builds(
    VrrpEvent,
    kind=st.sampled_from(VrrpKind),
    name=st.sampled_from([FOLLOWED, "VI_OTHER"]),
    state=st.sampled_from(VrrpState),
    priority=st.integers(0, 255),
)
# An input is either a notify line or "the running action completes now" (None).
inputs = st.lists(st.one_of(line_events, st.none()), max_size=40)


@given(inputs, st.booleans())
def test_invariants_over_any_interleaving(steps: list[VrrpEvent | None], hot: bool) -> None:
    machine = RoleMachine(hot=hot, follow=FOLLOWED)
    started: list[tuple[int, Action]] = []  # (transition serial, action) in start order
    expected_role = Role.INIT
    expected_transitions = 0

    def record(action: Action | None, serial: int) -> None:
        if action is not None:
            started.append((serial, action))

    for step in steps:
        if step is None:
            if machine.running is None:
                continue
            # Whatever starts next must belong to the latest transition (checked below).
            record(machine.done(machine.running), expected_transitions)
            continue
        was_running = machine.running
        result = machine.feed(step)
        role = target_role(step.state)
        if step.name != FOLLOWED:
            assert result.verdict is Verdict.NOT_FOLLOWED
        elif role is None:
            assert result.verdict is Verdict.INFORMATIONAL
        elif role is expected_role:
            assert result.verdict is Verdict.DUPLICATE
        else:
            assert result.verdict is Verdict.ACCEPTED
            expected_role = role
            expected_transitions += 1
        if result.verdict is not Verdict.ACCEPTED:
            assert result.start is None
        elif was_running is not None:
            # Never two actions at once: a superseding line starts nothing.
            assert result.start is None
            assert machine.running is was_running
        else:
            assert result.start == plan(expected_role, hot=hot)[0]
        record(result.start, expected_transitions)
        assert machine.role is expected_role
        assert machine.transitions == expected_transitions

    # Drain: the latest transition's plan always runs to its end.
    while machine.running is not None:
        record(machine.done(machine.running), expected_transitions)
    assert machine.settled

    for serial, group in itertools.groupby(started, key=lambda item: item[0]):
        actions = [action for _, action in group]
        role_plan = _plan_of_transition(steps, serial, hot)
        # Per transition: a prefix of its plan, in order, each action at most once.
        assert tuple(actions) == role_plan[: len(actions)]
        if serial == expected_transitions:
            assert tuple(actions) == role_plan


def _plan_of_transition(
    steps: list[VrrpEvent | None], serial: int, hot: bool
) -> tuple[Action, ...]:
    """The plan of the ``serial``-th accepted transition, recomputed from the inputs."""
    current = Role.INIT
    count = 0
    for step in steps:
        if step is None or step.name != FOLLOWED:
            continue
        role = target_role(step.state)
        if role is None or role is current:
            continue
        current = role
        count += 1
        if count == serial:
            return plan(role, hot=hot)
    raise AssertionError(f"no transition {serial}")


# --- notify line parsing --------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("INSTANCE VI_1 MASTER 100", ev(VrrpState.MASTER, "VI_1", VrrpKind.INSTANCE)),
        ('INSTANCE "VI_1" MASTER 100\n', ev(VrrpState.MASTER, "VI_1", VrrpKind.INSTANCE)),
        ('GROUP "VG_FW" BACKUP 100', ev(VrrpState.BACKUP)),
        ("GROUP VG_FW  FAULT   100", ev(VrrpState.FAULT)),
    ],
)
def test_parse_notify(line: str, expected: VrrpEvent) -> None:
    assert parse_notify(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        "",
        "INSTANCE",
        "INSTANCE VI_1 MASTER",
        "INSTANCE VI_1 MASTER 100 extra",
        "VS VI_1 MASTER 100",
        "INSTANCE VI_1 PRIMARY 100",
        "INSTANCE VI_1 MASTER 256",
        "INSTANCE VI_1 MASTER -1",
        "INSTANCE VI_1 MASTER \u0661\u0660\u0660",  # non-ASCII (Arabic-Indic) digits
        'INSTANCE "VI_1 MASTER 100',
        'INSTANCE "" MASTER 100',
        'INSTANCE "V I" MASTER 100',
        "INSTANCE VI_1 MASTER 1000",
        "INSTANCE " + "x" * 600 + " MASTER 100",
    ],
)
def test_parse_notify_rejects(line: str) -> None:
    with pytest.raises(NotifyDecodeError):
        parse_notify(line)


@given(st.text(max_size=80))
def test_parse_notify_raises_only_its_error(line: str) -> None:
    with contextlib.suppress(NotifyDecodeError):
        parse_notify(line)


@given(line_events.filter(lambda e: e.name.isprintable()))
def test_format_and_parse_round_trip(event: VrrpEvent) -> None:
    assert parse_notify(format_notify(event)) == event

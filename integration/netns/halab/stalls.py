"""Why a flow stalled: its longest gap set against what brought the path back (pure).

Every time is in seconds after the failover started (``PhaseResult.takeover`` is when
both VIPs were up). The path is *back* (``PhaseResult.path_back``) once both VIPs are
up on the new master and, if the new master committed the peer's entries into its
kernel after the event (cache mode), once that commit finished: before that the new
master drops the flow's packets as invalid. A TCP flow whose segment was lost resumes
only when one of its two sockets retransmits after the path is back (RTO at least
200 ms, doubling at each retry); the retransmission that got through is the last one,
on either side, sent before the flow's first round trip after the gap.
"""

from __future__ import annotations

from dataclasses import dataclass

from integration.netns.halab.drill import FlowOutcome, PhaseResult
from integration.netns.halab.traffic import Retrans


@dataclass(frozen=True)
class Stall:
    """One flow's longest gap, explained."""

    flow: FlowOutcome
    #: The gap's length.
    length: float
    #: Last round trip before the gap, first one after it (None: never resumed).
    lost: float
    resumed: float | None
    path_back: float
    #: Retransmissions in the gap: the requester's and the echo server's.
    requester: tuple[Retrans, ...]
    echo: tuple[Retrans, ...]
    #: The retransmission that got through: ("requester"|"echo", its 1-based number
    #: within the gap, it) or None if none came before the resume (give or take
    #: :data:`POLL_SLACK`).
    through: tuple[str, int, Retrans] | None

    @property
    def waited(self) -> float | None:
        """How long the path was back before the retransmission that got through (None
        when none did, or it was sent before the path was back)."""
        if self.through is None or self.through[2].t < self.path_back:
            return None
        return self.through[2].t - self.path_back


#: A retransmission is timed when the agent's poll (every 10 ms, on a loaded host
#: sometimes later) saw it: one seen this long after the resume may have caused it.
POLL_SLACK = 0.05


def _in_gap(retrans: tuple[Retrans, ...], start: float, end: float | None) -> tuple[Retrans, ...]:
    return tuple(r for r in retrans if r.t > start and (end is None or r.t <= end + POLL_SLACK))


def explain(flow: FlowOutcome, result: PhaseResult,
            gap: tuple[float, float | None] | None) -> Stall | None:
    """``flow``'s ``gap`` against the path's return (None: no gap)."""
    if gap is None:
        return None
    lost, resumed = gap
    requester = _in_gap(flow.retrans, lost, resumed)
    echo = _in_gap(flow.echo_retrans, lost, resumed)
    candidates = [("requester", i, r) for i, r in enumerate(requester, 1)]
    candidates += [("echo", i, r) for i, r in enumerate(echo, 1)]
    through = max(candidates, key=lambda c: c[2].t) if candidates and resumed is not None \
        else None
    return Stall(flow, flow.gap_length(gap), lost, resumed, result.path_back, requester,
                 echo, through)


def worst(result: PhaseResult, prefix: str = "tcp", *, failover: bool = True) -> Stall | None:
    """The explained stall of the phase's worst-stalled flow of kind ``prefix`` (``""``:
    of any kind): with ``failover``, of the gaps that overlap the failover window
    (``PhaseResult.failover_gap``), else of the whole phase (the flow's ``stall``)."""
    stalls = []
    for flow in result.of_kind(prefix):
        stall = explain(flow, result, result.failover_gap(flow) if failover else flow.gap)
        if stall is not None:
            stalls.append(stall)
    return max(stalls, key=lambda s: s.length, default=None)


def overlapped(result: PhaseResult, stall: Stall) -> list[str]:
    """The parts of the phase ``stall``'s gap overlapped, in order: ``"before the
    failover"``, ``"the failover window"``, ``"the hold"`` (after the window, before the
    idle probe), ``"the idle probe"`` (from its start to the report)."""
    start, end = result.failover_window
    probe = result.probe_at if result.probe_at is not None else float("inf")
    parts = [("before the failover", -float("inf"), start), ("the failover window", start, end),
             ("the hold", end, probe), ("the idle probe", probe, float("inf"))]
    return [name for name, a, b in parts
            if a < b and stall.lost < b and (stall.resumed is None or stall.resumed > a)]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:+.0f}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _retrans(side: str, retrans: tuple[Retrans, ...]) -> str:
    if not retrans:
        return f"{side} none"
    # The backoff as the poll saw it: an acknowledged retransmission already reset it.
    return f"{side} " + ", ".join(f"{_ms(r.t)} (backoff {r.backoff})" for r in retrans)


def describe(stall: Stall) -> list[str]:
    """Lines saying when the flow lost its path, what retransmitted (TCP) or how its
    requests fared (UDP), and when it resumed."""
    flow = stall.flow
    udp = flow.kind.startswith("udp")
    lines = [f"{flow.kind} {flow.local}: stall {stall.length * 1000:.0f} ms, last reply "
             f"{_ms(stall.lost)} ms, path back {_ms(stall.path_back)} ms"]
    if udp:
        # No retransmissions: the client sends a request every interval regardless.
        lines.append(f"  requests: {flow.sent} sent, {flow.oks} answered ({flow.late} late), "
                     f"{flow.duplicates} duplicate replies, longest round trip "
                     f"{flow.max_rtt * 1000:.0f} ms")
    else:
        lines.append("  retransmitted (ms): " + "; ".join(
            (_retrans("requester", stall.requester), _retrans("echo side", stall.echo))))
    if stall.resumed is None:
        lines.append("  never resumed")
        return lines
    text = (f"  resumed {_ms(stall.resumed)} ms: {(stall.resumed - stall.lost) * 1000:.0f} ms "
            f"after the loss, {(stall.resumed - stall.path_back) * 1000:.0f} ms after the "
            "path came back")
    if not udp:
        text += _resumed_with(stall)
    lines.append(text)
    return lines


def _resumed_with(stall: Stall) -> str:
    """Which retransmission (TCP) the flow resumed with, and when it was sent."""
    if stall.through is None:
        return ", with no retransmission in the gap"
    side, n, r = stall.through
    text = f", with the {side}'s {_ordinal(n)} retransmission (seen {_ms(r.t)} ms)"
    waited = stall.waited
    if waited is not None:
        return text + f" (sent {waited * 1000:.0f} ms after the path came back)"
    return text + " (sent before the path came back)"

"""Why a flow stalled: its longest gap set against what brought the path back (pure).

Every time is in seconds after the failover started (``PhaseResult.takeover`` is when
both VIPs were up). The path is *back* once both VIPs
are up on the new master and, if the new master committed the peer's entries into its
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


def path_back(result: PhaseResult) -> float:
    """When the path through the new master was back: VIPs up, and its first commit
    after the event that applied entries finished (if any; in hot mode the entries are
    in the kernel already and the commit applies none)."""
    commits = [t for t, _, applied in result.commits if applied > 0]
    return max(result.takeover, min(commits, default=0.0))


#: A gap is the failover's if it ended after the failover started and began before the
#: path was back or at most this long after (a packet lost just before is retried later).
FAILOVER_SLACK = 0.5


def failover_gap(flow: FlowOutcome, result: PhaseResult) -> tuple[float, float | None] | None:
    """The flow's longest gap (over 0.1 s) around the failover, i.e. one the failover
    can have caused, never one from the idle probe on (None: no such gap)."""
    gaps: list[tuple[float, float | None]] = list(flow.gaps)
    if flow.gap is not None and flow.gap[1] is None:
        gaps.append(flow.gap)
    last_start = path_back(result) + FAILOVER_SLACK
    if result.probe_at is not None:
        last_start = min(last_start, result.probe_at)
    gaps = [g for g in gaps if g[0] < last_start and (g[1] is None or g[1] > 0)]
    return max(gaps, key=lambda g: _length(g, flow), default=None)


def _length(gap: tuple[float, float | None], flow: FlowOutcome) -> float:
    # A final silence lasted until the report: the flow's stall.
    return (gap[1] - gap[0]) if gap[1] is not None else flow.stall


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
    return Stall(flow, _length(gap, flow), lost, resumed, path_back(result), requester,
                 echo, through)


def worst(result: PhaseResult, prefix: str = "tcp", *, failover: bool = True) -> Stall | None:
    """The explained stall of the phase's worst-stalled flow of kind ``prefix`` (``""``:
    of any kind): with ``failover``, of the gaps that began before the idle probe, else
    of the whole phase (the flow's ``stall``)."""
    stalls = []
    for flow in result.of_kind(prefix):
        stall = explain(flow, result, failover_gap(flow, result) if failover else flow.gap)
        if stall is not None:
            stalls.append(stall)
    return max(stalls, key=lambda s: s.length, default=None)


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
    """Lines saying when the flow lost its path, what retransmitted, and when it resumed."""
    flow = stall.flow
    lines = [f"{flow.kind} {flow.local}: stall {stall.length * 1000:.0f} ms, last reply "
             f"{_ms(stall.lost)} ms, path back {_ms(stall.path_back)} ms",
             "  retransmitted (ms): " + "; ".join((_retrans("requester", stall.requester),
                                                   _retrans("echo side", stall.echo)))]
    if stall.resumed is None:
        lines.append("  never resumed")
        return lines
    text = (f"  resumed {_ms(stall.resumed)} ms: {(stall.resumed - stall.lost) * 1000:.0f} ms "
            f"after the loss, {(stall.resumed - stall.path_back) * 1000:.0f} ms after the "
            "path came back")
    if stall.through is None:
        text += ", with no retransmission in the gap"
    else:
        side, n, r = stall.through
        text += f", with the {side}'s {_ordinal(n)} retransmission (seen {_ms(r.t)} ms)"
        waited = stall.waited
        if waited is not None:
            text += f" (sent {waited * 1000:.0f} ms after the path came back)"
        else:
            text += " (sent before the path came back)"
    lines.append(text)
    return lines

"""Plain-text rendering of drill results (for test output and ``make demo``)."""

from __future__ import annotations

from collections.abc import Sequence

from integration.netns.halab import stalls
from integration.netns.halab.drill import EventKind, FlowOutcome, PhaseResult
from integration.netns.halab.tcpstats import COUNTERS as TCP_COUNTERS

KINDS = ("tcp-snat", "udp-snat", "tcp-dnat")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _mapping_line(kind: str, flows: Sequence[FlowOutcome]) -> str:
    flow = flows[0]
    after = flow.mapping_after or "(no reply)"
    same = sum(1 for f in flows if f.mapping_after == f.mapping_before)
    return (f"    NAT {kind:<9} {flow.local} -> {flow.target}: server saw "
            f"{flow.mapping_before} before, {after} after ({same}/{len(flows)} unchanged)")


def format_phase(index: int, result: PhaseResult, verbose: bool = False) -> str:
    """One phase: takeover, survival per flow kind, stalls, NAT, transitions, counters."""
    if result.forced:
        how = " (keepalived stopped by the drill: no track script watches the daemon)"
    elif result.event.kind is EventKind.DAEMON_KILL:
        how = " (keepalived moved the VIPs by itself: its track script failed)"
    else:
        how = ""
    verdict = "within target" if result.within_target else "MISSED target"
    _, window_end = result.failover_window
    lines = [
        f"{index}. {result.event} -> fw{result.new_master} master{how}",
        f"    VRRP takeover {_ms(result.takeover)}; failover gap "
        f"{_gap(result.failover_stall())} (longest stall overlapping the failover window, "
        f"0 to {_when(window_end)}; target <= {_ms(result.target)}: {verdict})",
        "    " + _overall(result),
    ]
    survival = []
    for kind in KINDS:
        flows = result.of_kind(kind)
        if flows:
            alive = [f for f in flows if f.survived]
            worst = max(f.stall for f in flows)
            text = (f"{kind} {len(alive)}/{len(flows)} (failover gap "
                    f"{_gap(result.failover_stall(kind))}, worst stall {_ms(worst)}")
            if kind.startswith("udp"):
                text += (f"; {sum(f.oks for f in flows)}/{sum(f.sent for f in flows)} "
                         f"requests answered, {sum(f.late for f in flows)} late, "
                         f"{sum(f.duplicates for f in flows)} duplicate replies")
                strays = sum(f.strays for f in flows)
                if strays:
                    text += f", {strays} STRAY"
            survival.append(text + ")")
    lines.append("    survived: " + ", ".join(survival))
    failed: dict[str, int] = {}
    for probe in result.idle:
        for why, n in probe.results.items():
            if why != "ok":
                failed[why] = failed.get(why, 0) + n
    failures = ", ".join(f"{n} {why}" for why, n in sorted(failed.items()))
    lines.append(f"    idle connections answering after: {result.idle_ok}/{result.idle_total}"
                 + (f" (failed: {failures})" if failures else ""))
    for kind in KINDS:
        flows = result.of_kind(kind)
        if flows:
            lines.append(_mapping_line(kind, flows))
    lines.append("    keepalived: " + (", ".join(
        f"{t * 1000:+.0f} ms fw{node} {state}" for t, node, state in result.transitions)
        or "(no transitions logged)"))
    lines.append("    conntrack entries before: " + ", ".join(
        f"fw{name} {n}" for name, n in sorted(result.conntrack.items()))
        + (f" (replication caught up {_ms(result.catch_up)} after the settle time)"
           if result.catch_up else ""))
    lines.append("    dropped as invalid: " + ", ".join(
        f"fw{name} {c.get('invalid_forward', 0)} forwarded + {c.get('invalid_input', 0)} to VIP"
        for name, c in sorted(result.counters.items())))
    lines += _why_lines(result)
    if verbose:
        for flow in result.flows:
            state = "survived" if flow.survived else "BROKEN"
            lines.append(f"      {flow.kind:<9} {flow.local:<21} {state:<8} stall "
                         f"{_ms(flow.stall):>8}  {flow.mapping_before} -> {flow.mapping_after}"
                         + (f"  error: {flow.error}" if flow.error else ""))
    return "\n".join(lines)


def _gap(stall: float | None) -> str:
    return "< 100 ms" if stall is None else _ms(stall)


def _kind_gap(result: PhaseResult, prefix: str) -> str:
    return _gap(result.failover_stall(prefix)) if result.of_kind(prefix) else "-"


def _overall(result: PhaseResult) -> str:
    """The phase's longest stall of any flow, and what it overlapped."""
    text = f"longest stall of the phase {_ms(result.max_stall)}"
    stall = stalls.worst(result, "", failover=False)
    if stall is None:
        return text
    return (f"{text} ({stall.flow.kind} {stall.flow.local}, last reply {_when(stall.lost)}, "
            + ("never resumed" if stall.resumed is None else f"resumed {_when(stall.resumed)}")
            + "; overlapping " + " and ".join(stalls.overlapped(result, stall)) + ")")


def _drops(counters: dict[str, int]) -> str:
    invalid = counters.get("invalid_forward", 0) + counters.get("invalid_input", 0)
    return f"{invalid}/{counters.get('refused_forward', 0)}"


def _when(seconds: float | None) -> str:
    return "not seen" if seconds is None else f"{seconds * 1000:+.0f} ms"


def _why_lines(result: PhaseResult) -> list[str]:
    """What explains the stalls: endpoints' TCP counters, drops and ARP over time, the
    commit, and the worst TCP flow's timeline (times after the failover started)."""
    short = {name: name.removeprefix("TcpExt").removeprefix("Tcp") for name in TCP_COUNTERS}
    lines = ["    endpoint TCP counters over the event window: " + "; ".join(
        f"{ns} " + ", ".join(f"{short[k]} {v}" for k, v in stats.items())
        for ns, stats in sorted(result.tcp_stats.items()))]
    lines.append("    dropped since the event, invalid/refused: " + ", ".join(
        f"by {t * 1000:+.0f} ms " + " ".join(f"fw{name} {_drops(c)}"
                                             for name, c in sorted(by_fw.items()))
        for t, by_fw in result.drop_samples))
    path = (f"    path: VIPs up on fw{result.new_master} {_when(result.takeover)}; ARP entry "
            "for the VIP turned to it: " + ", ".join(
                f"{ns} {_when(t)}" for ns, t in sorted(result.arp.items())))
    if result.commits:
        path += "; commit done " + ", ".join(
            f"{_when(t)} (applied {applied}, took {seconds * 1000:.0f} ms)"
            for t, seconds, applied in result.commits)
    if result.probe_at is not None:
        path += f"; idle connections probed {_when(result.probe_at)}"
    lines.append(path)
    # In the failover window: the worst TCP flow, and the worst flow of all if that is
    # not a TCP one.
    tcp, every = stalls.worst(result, "tcp"), stalls.worst(result, "")
    if every is None:
        lines.append("    in the failover window: no flow went 100 ms without a round trip")
    for stall in (tcp, every if every is not None and every.flow is not _flow(tcp)
                  else None):
        if stall is not None:
            first, *rest = stalls.describe(stall)
            lines.append("    worst in the failover window: " + first)
            lines += ["    " + line for line in rest]
    return lines


def _flow(stall: stalls.Stall | None) -> FlowOutcome | None:
    return None if stall is None else stall.flow


def format_report(title: str, results: Sequence[PhaseResult], verbose: bool = False) -> str:
    """A whole drill: a title line, then every phase."""
    body = "\n".join(format_phase(i, r, verbose) for i, r in enumerate(results, 1))
    return f"== failover drill: {title}\n{body}"


def _through(stall: stalls.Stall | None) -> tuple[str, str, str]:
    """The worst TCP flow's resume after the path came back, the retransmission that
    got through and how long the path had been back when it was sent."""
    if stall is None or stall.resumed is None:
        return "-", "-", "-"
    after = _ms(stall.resumed - stall.path_back)
    if stall.through is None:
        return after, "none", "-"
    side, n, _ = stall.through
    waited = "-" if stall.waited is None else _ms(stall.waited)
    return after, f"{side} #{n}", waited


def stall_summary(results: Sequence[PhaseResult]) -> str:
    """One line per phase: the VRRP takeover; the failover's own gap (longest stall of a
    flow overlapping the failover window), of TCP and of UDP flows, its difference to
    the takeover and whether it met the target; the phase's longest stall of any flow
    and what it overlapped; then for the worst TCP flow in the failover window: when the
    path came back, how long after that it resumed, the retransmission that got through
    and how long after the path came back that retransmission was sent."""
    lines = [f"    {'event':<16} {'takeover':>9} {'failover gap':>13} {'tcp':>9} {'udp':>9}"
             f" {'gap - takeover':>15} {'target':>7} {'phase max':>10} {'overlapping':<38}"
             f" {'path back':>10} {'resumed after':>14} {'got through':>13}"
             f" {'sent after':>11}"]
    for result in results:
        stall = stalls.worst(result)
        overall = stalls.worst(result, "", failover=False)
        after, through, waited = _through(stall)
        back = "-" if stall is None else _ms(stall.path_back)
        gap = result.failover_stall()
        # A gap under 0.1 s is not recorded: its difference to the takeover is unknown.
        over = "-" if gap is None else _ms(gap - result.takeover)
        met = "met" if gap is None or gap <= result.target else "MISSED"
        where = "-" if overall is None else "+".join(
            part.removeprefix("the ") for part in stalls.overlapped(result, overall))
        lines.append(f"    {result.event!s:<16} {_ms(result.takeover):>9} {_gap(gap):>13} "
                     f"{_kind_gap(result, 'tcp'):>9} "
                     f"{_kind_gap(result, 'udp'):>9} {over:>15} {met:>7} "
                     f"{_ms(result.max_stall):>10} {where:<38} {back:>10} {after:>14} "
                     f"{through:>13} {waited:>11}")
    return "\n".join(lines)

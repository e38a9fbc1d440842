"""Failover drills on a real keepalived firewall pair (see ``halab``).

The negative control runs every failover event with no state replication at all:
the strict ruleset must then break every established TCP flow, in both directions,
and the new master must have dropped their packets as invalid. That is what makes a
surviving flow in a replication drill mean something.

The positive control runs the same drill with conntrackd (FTFW, wired to keepalived as
conntrack-tools documents): every flow must survive, with its NAT mapping unchanged.
That proves the harness can show survival, so a replicator drill that fails does so
because of replicator.

The replicator drills run the same scenario (planned keepalived stop, daemon SIGKILL,
links cut, each followed by the fail-back) once per standby mode, ``cache`` and
``hot``, with keepalived wired as docs/operations.md says (``halab/replicator.py``):
every flow must survive with its NAT mapping unchanged and every idle connection must
still answer. The daemon SIGKILL is not helped along: keepalived's ``replicator check``
track script must notice the dead daemon and move the VIPs by itself (the controls'
daemons are not tracked by keepalived, so there the drill stops the master's
keepalived after the kill). The failover's own gap (longest stall of a flow
overlapping the failover window) is printed against the VRRP takeover, never asserted
(the host is shared), with what explains the worst ones (``halab.stalls``):
retransmissions of both endpoints, drops on both firewalls, ARP and commit times.
"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from integration.netns.halab import agent, stalls, tcpstats
from integration.netns.halab.conntrackd import ConntrackdReplication
from integration.netns.halab.drill import (
    DEFAULT_SCENARIO,
    DrillConfig,
    Event,
    EventKind,
    FlowOutcome,
    PhaseResult,
    drill_lab,
    flow_outcome,
)
from integration.netns.halab.replication import NoReplication
from integration.netns.halab.replicator import (
    DRILL_CONFIG,
    ReplicatorReplication,
    commit_lines,
)
from integration.netns.halab.report import format_report, stall_summary
from integration.netns.halab.traffic import Retrans, StreamRecord

# --- how a flow is judged (pure) --------------------------------------------------------
# Event at t=10, both VIPs up on the new master at t=10.3, report at t=13.


def _record(last_ok: float, max_gap: float, error: str | None = None,
            mappings: tuple[tuple[float, str], ...] = ((1.0, "10.0.0.1:5"),)) -> StreamRecord:
    return StreamRecord("tcp-snat", "10.0.0.9:7", "10.0.0.2:5", sent=100, oks=90,
                        last_ok=last_ok, max_gap=max_gap, mappings=mappings, error=error)


def _judge(record: StreamRecord) -> tuple[bool, float, str | None, str | None]:
    outcome = flow_outcome(record, t_event=10.0, t_up=10.3, t_report=13.0, alive_window=0.5)
    return outcome.survived, round(outcome.stall, 3), outcome.mapping_before, \
        outcome.mapping_after


def test_a_flow_answering_through_the_new_master_survived() -> None:
    assert _judge(_record(12.98, 0.4)) == (True, 0.4, "10.0.0.1:5", "10.0.0.1:5")


def test_replies_before_the_takeover_do_not_count_as_survival() -> None:
    # Its last reply came between the event and the takeover (via the old master).
    assert _judge(_record(10.2, 0.05)) == (False, 2.8, "10.0.0.1:5", None)


def test_a_flow_that_went_quiet_before_the_report_did_not_survive() -> None:
    assert _judge(_record(11.0, 0.9)) == (False, 2.0, "10.0.0.1:5", "10.0.0.1:5")


def test_a_flow_with_an_error_did_not_survive() -> None:
    assert _judge(_record(12.99, 0.1, error="closed by peer"))[0] is False


def test_mappings_before_and_after_the_event_are_told_apart() -> None:
    moved = ((1.0, "10.0.0.1:5"), (10.5, "10.0.0.1:6"))
    assert _judge(_record(12.99, 0.5, mappings=moved))[2:] == ("10.0.0.1:5", "10.0.0.1:6")


def test_the_longest_gap_and_the_retransmissions_are_timed_from_the_origin() -> None:
    record = StreamRecord("tcp-snat", "10.0.0.9:7", "10.0.0.2:5", sent=100, oks=90,
                          last_ok=12.98, max_gap=0.9, mappings=((1.0, "10.0.0.1:5"),),
                          error=None, gap_start=10.1, gap_end=11.0,
                          retrans=(Retrans(10.4, 1, 0, 204),))
    outcome = flow_outcome(record, t_event=9.0, t_up=10.3, t_report=13.0, alive_window=0.5,
                           echo=(Retrans(10.6, 3, 1, 408),), origin=10.0)
    assert outcome.gap is not None
    assert [round(t, 3) for t in outcome.gap if t is not None] == [0.1, 1.0]
    assert [round(r.t, 3) for r in outcome.retrans + outcome.echo_retrans] == [0.4, 0.6]


def test_a_final_silence_is_a_gap_that_never_ended() -> None:
    outcome = flow_outcome(_record(11.0, 0.9), t_event=10.0, t_up=10.3, t_report=13.0,
                           alive_window=0.5)
    assert outcome.gap == (1.0, None)


# --- what explains a stall (pure) ---------------------------------------------------------
# Failover started at 0; VIPs up at +0.3; the flow's last reply at +0.01.


def _phase(retrans: tuple[Retrans, ...], echo: tuple[Retrans, ...], resumed: float | None,
           commits: tuple[tuple[float, float, int], ...] = (),
           probe_gap: float = 0.0) -> PhaseResult:
    """One flow with a gap from +0.01 to ``resumed``, and optionally, once the idle
    connections were probed at +4, a gap of ``probe_gap``."""
    gaps: tuple[tuple[float, float], ...] = () if resumed is None else ((0.01, resumed),)
    if probe_gap:
        gaps += ((4.1, 4.1 + probe_gap),)
    longest = max(gaps, key=lambda g: g[1] - g[0], default=(0.01, 0.01))
    last_ok = 4.5 if probe_gap else resumed if resumed is not None else 0.01
    record = StreamRecord("tcp-snat", "10.0.0.9:7", "10.0.0.2:5", sent=100, oks=90,
                          last_ok=last_ok, max_gap=longest[1] - longest[0],
                          mappings=((-1.0, "10.0.0.1:5"),), error=None,
                          gap_start=longest[0], gap_end=longest[1], retrans=retrans, gaps=gaps)
    flow = flow_outcome(record, t_event=0.0, t_up=0.3, t_report=last_ok + 0.01,
                        alive_window=0.5, echo=echo)
    return PhaseResult(event=Event(EventKind.PLANNED), new_master="b", forced=False,
                       takeover=0.3, flows=(flow,), idle=(), transitions=(), counters={},
                       conntrack={}, stall_margin=0.2, commits=commits, probe_at=4.0)


def _explained(result: PhaseResult) -> stalls.Stall:
    stall = stalls.worst(result)
    assert stall is not None
    return stall


def test_a_flow_resumes_with_the_first_retransmission_after_the_path_is_back() -> None:
    # Loss probe +0.24, RTO +0.45 (path still down), RTO +0.87 seen 3 ms after the
    # resume (the poll is late): that one got through, sent 0.57 s after the VIPs.
    result = _phase((Retrans(0.24, 1, 0, 204), Retrans(0.45, 2, 1, 408),
                     Retrans(0.873, 3, 0, 204)), (), resumed=0.87)
    stall = _explained(result)
    assert stall.through is not None and stall.through[:2] == ("requester", 3)
    assert stall.waited is not None and round(stall.waited, 3) == 0.573
    text = "\n".join(stalls.describe(stall))
    assert "with the requester's 3rd retransmission" in text
    assert "860 ms after the loss, 570 ms after the path came back" in text


def test_the_path_is_back_only_once_the_commit_finished() -> None:
    result = _phase((Retrans(0.45, 1, 1, 408),), (Retrans(0.9, 1, 1, 408),), resumed=0.91,
                    commits=((0.6, 0.25, 2200),))
    stall = _explained(result)
    assert stall.path_back == 0.6
    assert stall.through is not None and stall.through[:2] == ("echo", 1)
    # The requester's retransmission came before the commit: it was lost.
    assert [r.t for r in stall.requester] == [0.45]


def test_a_commit_that_applied_nothing_does_not_hold_the_path_back() -> None:
    # Hot mode: the entries were in the kernel already.
    assert _explained(_phase((), (), resumed=0.35, commits=((0.6, 0.02, 0),))).path_back == 0.3


def test_a_longer_gap_during_the_idle_probe_is_not_the_failovers() -> None:
    result = _phase((), (), resumed=0.15, probe_gap=0.25)
    assert round(_explained(result).length, 3) == 0.14
    overall = stalls.worst(result, failover=False)
    assert overall is not None and round(overall.lost, 3) == 4.1
    assert stalls.overlapped(result, overall) == ["the idle probe"]
    report = format_report("t", [result])
    assert "longest stall of the phase 250 ms" in report
    assert "overlapping the idle probe" in report


def test_the_target_is_judged_on_the_failovers_gap_not_the_idle_probes() -> None:
    # Target: takeover 0.3 + 0.2. The idle probe's 0.6 s gap is the phase's longest.
    result = _phase((), (), resumed=0.35, probe_gap=0.6)
    assert round(result.max_stall, 3) == 0.6
    stall = result.failover_stall()
    assert stall is not None and round(stall, 3) == 0.34
    assert result.within_target
    line = stall_summary([result]).splitlines()[1]
    assert " met " in line and "idle probe" in line
    assert "failover gap 340 ms" in format_report("t", [result])
    # The same failover gap over the target misses it, whatever the idle probe did.
    missed = _phase((), (), resumed=0.56)
    assert missed.failover_stall() is not None and not missed.within_target
    assert "MISSED" in stall_summary([missed])


def _flow_with(gaps: tuple[tuple[float, float], ...]) -> FlowOutcome:
    """A TCP flow that answered until the report (+4.5) but for ``gaps``."""
    longest = max(gaps, key=lambda g: g[1] - g[0])
    record = StreamRecord("tcp-snat", "10.0.0.9:7", "10.0.0.2:5", sent=100, oks=90,
                          last_ok=4.5, max_gap=longest[1] - longest[0],
                          mappings=((-1.0, "10.0.0.1:5"),), error=None,
                          gap_start=longest[0], gap_end=longest[1], gaps=gaps)
    return flow_outcome(record, t_event=0.0, t_up=0.3, t_report=4.51, alive_window=0.5)


def test_the_failover_window_runs_until_half_a_second_after_the_path_came_back() -> None:
    # VIPs up at +0.3, commit applying entries done at +0.6: the window is 0 to +1.1.
    flows = (_flow_with(((1.0, 1.3),)), _flow_with(((1.2, 1.8),)),
             _flow_with(((-0.5, 0.05),)), _flow_with(((-0.5, -0.2),)))
    result = PhaseResult(event=Event(EventKind.PLANNED), new_master="b", forced=False,
                         takeover=0.3, flows=flows, idle=(), transitions=(), counters={},
                         conntrack={}, stall_margin=0.2, commits=((0.6, 0.25, 2200),),
                         probe_at=4.0)
    assert result.failover_window == (0.0, 1.1)
    # Began inside the window; began after it; began before the failover and ended in
    # it; ended before the failover started.
    assert [result.failover_gap(f) for f in flows] == [(1.0, 1.3), None, (-0.5, 0.05), None]
    stall = result.failover_stall()
    assert stall is not None and round(stall, 3) == 0.55
    # The idle probe ends the window early.
    early = PhaseResult(event=Event(EventKind.PLANNED), new_master="b", forced=False,
                        takeover=0.3, flows=flows, idle=(), transitions=(), counters={},
                        conntrack={}, stall_margin=0.2, probe_at=0.7)
    assert early.failover_window == (0.0, 0.7)
    assert early.failover_gap(flows[0]) is None


def test_a_gap_long_after_the_path_came_back_is_not_the_failovers() -> None:
    result = _phase((), (), resumed=None, probe_gap=0.25)
    assert stalls.worst(result) is None
    assert "no flow went 100 ms without a round trip" in format_report("t", [result])


def test_a_resume_without_retransmission_and_a_flow_that_never_resumed() -> None:
    stall = _explained(_phase((), (), resumed=0.35))
    assert stall.through is None and stall.waited is None
    assert "with no retransmission in the gap" in stalls.describe(stall)[-1]
    never = _explained(_phase((Retrans(0.24, 1, 0, 204),), (), resumed=None))
    assert never.resumed is None and stalls.describe(never)[-1] == "  never resumed"


def test_stall_summary_names_the_retransmission_that_got_through() -> None:
    result = _phase((Retrans(0.45, 1, 1, 408),), (), resumed=0.46)
    assert "requester #1" in stall_summary([result]).splitlines()[1]


# --- how a UDP stream counts its replies (the agent's Stream, pure) ------------------------
# Requests every 30 ms from t=0 (request 0 opens the flow); replies 1 ms later.


def _udp_run(requests: int, replies: list[tuple[int, float]],
             mapping: str = "10.0.0.1:5") -> agent.Stream:
    """A stream that sent ``requests`` requests and got ``replies`` ``(seq, arrival)``,
    everything fed in time order."""
    stream = agent.Stream("udp", "10.0.0.2:9")
    events = sorted([(n * 0.03, 0, n) for n in range(requests)]
                    + [(at, 1, seq) for seq, at in replies])
    for at, is_reply, seq in events:
        if is_reply:
            stream.reply(f"{seq} {mapping}".encode(), at)
        else:
            assert stream.request(at) == seq
    return stream


def test_udp_replies_are_round_trips_when_they_arrive() -> None:
    # Requests 4-11 are lost in an outage.
    stream = _udp_run(20, [(n, n * 0.03 + 0.001) for n in (*range(4), *range(12, 20))])
    assert (stream.sent, stream.oks, stream.late, stream.duplicates) == (20, 12, 0, 0)
    # The gap runs from the reply to request 3 to the one to request 12: 270 ms, the
    # path's outage to within one interval (not a client's reply timeout).
    assert [(round(a, 3), round(b, 3)) for a, b in stream.gaps] == [(0.091, 0.361)]
    assert round(stream.max_gap, 3) == 0.27 and stream.error is None
    assert round(stream.max_rtt, 3) == 0.001
    assert sorted(stream.pending) == list(range(4, 12))


def test_a_late_udp_reply_still_proves_the_path_and_a_duplicate_is_not_counted() -> None:
    # Request 6's reply arrives at +0.4, after request 13 was sent: a round trip then,
    # and a late one. Both 6 and 14 are answered twice (duplicated by the network).
    stream = _udp_run(20, [(0, 0.001), (1, 0.031), (2, 0.061), (3, 0.091), (6, 0.4),
                           (14, 0.421), (6, 0.43), (14, 0.44)])
    assert (stream.oks, stream.late, stream.duplicates, stream.strays) == (6, 1, 2, 0)
    assert [(round(a, 3), round(b, 3)) for a, b in stream.gaps] == [(0.091, 0.4)]
    assert round(stream.max_rtt, 3) == 0.22 and stream.last_ok == 0.421
    assert stream.error is None


def test_a_udp_reply_to_no_request_sent_is_an_error_not_a_round_trip() -> None:
    stream = _udp_run(3, [(0, 0.001), (7, 0.05)])
    stream.reply(b"\xff garbage", 0.06)
    assert (stream.oks, stream.strays) == (1, 2)
    assert stream.error == "reply to request 7, never sent"


def test_a_udp_reply_with_a_new_mapping_is_recorded() -> None:
    stream = _udp_run(2, [(0, 0.001)])
    stream.reply(b"1 10.0.0.1:6", 0.031)
    assert stream.mappings == [(0.001, "10.0.0.1:5"), (0.031, "10.0.0.1:6")]


def test_a_udp_stream_sends_every_interval_without_waiting_for_replies() -> None:
    stream = agent.Stream("udp", "10.0.0.2:9")
    sent: list[bytes] = []
    five = asyncio.Event()

    class Silent:
        """A transport whose requests are never answered."""

        def sendto(self, data: bytes) -> None:
            sent.append(data)
            if len(sent) == 5:
                five.set()

    client = agent.UdpClient(stream)
    client.connection_made(cast(asyncio.BaseTransport, Silent()))

    async def five_requests() -> None:
        task = asyncio.create_task(agent.run_udp_stream(client, 0.0))
        await five.wait()
        task.cancel()

    asyncio.run(five_requests())
    assert sent[:5] == [b"0", b"1", b"2", b"3", b"4"] and stream.oks == 0
    # Replies come in whenever they arrive, in any order, to the socket's protocol.
    client.datagram_received(b"3 10.0.0.1:5", ("10.0.0.2", 9))
    client.datagram_received(b"1 10.0.0.1:5", ("10.0.0.2", 9))
    client.datagram_received(b"3 10.0.0.1:5", ("10.0.0.2", 9))
    assert (stream.oks, stream.duplicates) == (2, 1) and client.answered.is_set()


# --- parsers (pure) -----------------------------------------------------------------------


def test_tcp_counters_are_named_as_nstat_names_them() -> None:
    text = ("Tcp: RtoAlgorithm RetransSegs\nTcp: 1 17\n"
            "TcpExt: TCPTimeouts TCPLossProbes\nTcpExt: 3 5\n")
    assert tcpstats.parse(text) == {"TcpRtoAlgorithm": 1, "TcpRetransSegs": 17,
                                    "TcpExtTCPTimeouts": 3, "TcpExtTCPLossProbes": 5}
    assert tcpstats.delta({"TcpRetransSegs": 17}, {"TcpRetransSegs": 20}) == \
        {"TcpRetransSegs": 3}


def test_commit_times_come_from_the_daemon_log() -> None:
    log = ('ts=2026-11-26T09:32:56.038+00:00 level=info logger=replicator.daemon '
           'msg="commit done" applied=12 failed=0 seconds=0.25\n'
           'ts=2026-11-26T09:32:57.000+00:00 level=info logger=x msg="other" seconds=1\n')
    assert commit_lines(log) == [(1795685576.038, 0.25, 12)]


# --- drills -------------------------------------------------------------------------------


def test_without_replication_every_failover_breaks_established_tcp(
        capsys: pytest.CaptureFixture[str]) -> None:
    config = DrillConfig()
    with drill_lab(NoReplication(), config) as drill:
        results = drill.run(DEFAULT_SCENARIO)
    with capsys.disabled():
        print("\n" + format_report("no replication (negative control)", results))
    assert [r.new_master for r in results] == ["b", "a"] * 3
    for result in results:
        tcp = result.of_kind("tcp")
        assert len(tcp) == config.tcp_snat + config.tcp_dnat
        # Established and answering through the old master before the event...
        assert all(f.mapping_before is not None for f in tcp), result.event
        # ...and dead after it: nothing came back through the new master.
        # (A reply may still arrive just after the takeover instant, through the old
        # master while neighbours' ARP caches move: seen once on a fail-back. Such a
        # flow still goes silent for good, which is what `survived` judges.)
        assert not any(f.survived for f in tcp), result.event
        assert result.idle_total == config.idle_snat + config.idle_dnat
        assert result.idle_ok == 0, result.event
        # The new master dropped their packets as invalid (no conntrack entry, no SYN).
        assert result.counters[result.new_master]["invalid_forward"] > 0, result.event
        # UDP from the LAN is allowed to start afresh on the new master, with the same
        # SNAT mapping: proof that the drill does detect a flow that keeps working.
        for flow in result.of_kind("udp"):
            assert flow.survived, (result.event, flow)
            assert flow.mapping_after == flow.mapping_before, (result.event, flow)


def test_with_conntrackd_every_failover_keeps_established_flows(
        capsys: pytest.CaptureFixture[str]) -> None:
    config = DrillConfig()
    replication = ConntrackdReplication()
    with drill_lab(replication, config) as drill:
        results = drill.run(DEFAULT_SCENARIO)
    with capsys.disabled():
        print("\n" + format_report(f"{replication.name} (positive control)", results))
    assert [r.new_master for r in results] == ["b", "a"] * 3
    for result in results:
        assert len(result.flows) == config.tcp_snat + config.udp_snat + config.tcp_dnat
        for flow in result.flows:
            assert flow.survived, (result.event, flow)
            assert flow.mapping_after == flow.mapping_before, (result.event, flow)
        assert result.idle_total == config.idle_snat + config.idle_dnat
        assert result.idle_ok == result.idle_total, (result.event, result.idle)


# --- replicator -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["cache", "hot"])
def test_with_replicator_every_failover_keeps_established_flows(
        mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = DRILL_CONFIG
    replication = ReplicatorReplication(mode)
    with drill_lab(replication, config) as drill:
        results = drill.run(DEFAULT_SCENARIO)
    with capsys.disabled():
        print("\n" + format_report(replication.name, results))
        print(stall_summary(results))
    assert [r.new_master for r in results] == ["b", "a"] * 3
    # The kill moved the VIPs through keepalived alone (the drill checked that the old
    # master's keepalived, untouched, left MASTER by itself).
    assert not any(r.forced for r in results)
    for result in results:
        assert len(result.flows) == config.tcp_snat + config.udp_snat + config.tcp_dnat
        for flow in result.flows:
            assert flow.survived, (result.event, flow)
            assert flow.mapping_after == flow.mapping_before, (result.event, flow)
        assert result.idle_total == config.idle_snat + config.idle_dnat
        assert result.idle_ok == result.idle_total, (result.event, result.idle)

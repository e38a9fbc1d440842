"""Failover events on the running pair, and what they did to the traffic.

A drill is a sequence of phases, one per :class:`Event`. Each phase opens fresh
traffic (streaming TCP through SNAT, streaming UDP through SNAT, streaming TCP from the
WAN through the DNAT port forward, and many idle TCP connections), lets it settle,
fires the event, times the VRRP takeover (event -> both VIPs up on the new master, from
rtnetlink address events), holds the traffic a while, probes every idle connection
once, and records per flow whether it survived, its longest stall and its NAT mapping
before and after.

The failover's own gap (what the target ``takeover + stall_margin`` is about) is the
longest gap of a flow that overlaps the *failover window*: from the moment the failover
started to :data:`FAILOVER_SLACK` after the path through the new master came back (VIPs
up and, in cache mode, the peer's entries committed), never past the idle probe
(:attr:`PhaseResult.failover_window`). The phase's longest stall of any flow
(:attr:`PhaseResult.max_stall`) is reported too, with what it overlapped.

Events (``node`` is the firewall acted on):

``planned``      SIGTERM ``node``'s keepalived (it must be master); the peer takes over.
``daemon-kill``  SIGKILL ``node``'s replication daemon (it must be master). If keepalived
                 tracks the daemon (:attr:`Replication.tracked_by_keepalived`: replicator's
                 ``check`` track script), the drill touches nothing else: keepalived must
                 move the VIPs by itself, the takeover is timed from the kill, and the
                 phase fails unless ``node``'s keepalived, still running, left MASTER.
                 Otherwise (conntrackd wired as conntrack-tools documents, no
                 replication) the kill cannot move the VIPs: after ``kill_grace``
                 ``node``'s keepalived is stopped as in ``planned`` (a *forced* phase),
                 so the peer takes over with whatever state it got before the kill. With
                 :class:`NoReplication` the kill is a no-op and this is a planned failover.
``crash``        set ``node``'s inside and outside links down (it must be master).
``failback``     restore ``node`` (revive its daemon, links up, start keepalived); being
                 the preferred node it preempts and takes the VIPs back.

What explains a stall (reported, never judged): per flow, the round trips around its
longest gap and every retransmission of its two sockets (requester and echo side, from
the agents' ``TCP_INFO`` polls); per phase, the endpoints' TCP counters over the event
window (event to the end of ``hold``: ``tcpstats``), the firewalls' drop counters since
the event, read at the takeover, ``drop_sample`` s later and at the end of ``hold``, when
each endpoint's ARP
entry for its VIP turned to the new master's MAC, and the new master's commits of the
peer's entries (``Replication.commits``; cache mode). :mod:`stalls` puts them together.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from integration.netns.halab import firewall, tcpstats
from integration.netns.halab.keepalived import Keepalived, Timing, Transition
from integration.netns.halab.replication import Replication
from integration.netns.halab.topology import LAN_IF, WAN_IF, Firewall, HaLab, ha_lab
from integration.netns.halab.traffic import (
    AddressWatch,
    Agent,
    Driver,
    NeighbourWatch,
    ProbeResult,
    Retrans,
    StreamRecord,
    echo_retrans,
    start_servers,
)


class DrillError(RuntimeError):
    """The drill itself could not proceed (e.g. no takeover happened at all)."""


class EventKind(enum.Enum):
    """The failover events of the drill."""

    PLANNED = "planned"
    DAEMON_KILL = "daemon-kill"
    CRASH = "crash"
    FAILBACK = "failback"


@dataclass(frozen=True)
class Event:
    """One failover event acting on firewall ``node``."""

    kind: EventKind
    node: str = "a"

    def __str__(self) -> str:
        return f"{self.kind.value}({self.node})"


#: Every event once, each followed by the fail-back to the preferred node ``a``.
DEFAULT_SCENARIO = (
    Event(EventKind.PLANNED), Event(EventKind.FAILBACK),
    Event(EventKind.DAEMON_KILL), Event(EventKind.FAILBACK),
    Event(EventKind.CRASH), Event(EventKind.FAILBACK),
)


@dataclass(frozen=True)
class DrillConfig:
    """Traffic and timing of each phase."""

    #: Streaming flows per phase: TCP and UDP from the client through SNAT, TCP from the
    #: server through the DNAT port forward.
    tcp_snat: int = 4
    udp_snat: int = 2
    tcp_dnat: int = 2
    #: Idle TCP connections per phase from the client (SNAT) and from the server (DNAT).
    idle_snat: int = 2000
    idle_dnat: int = 200
    #: Seconds between two requests of a streaming flow.
    interval: float = 0.03
    #: Traffic runs this long before the event (lets replication catch up).
    settle: float = 0.5
    #: Traffic runs this long after the takeover before the flows are judged.
    hold: float = 2.0
    #: How long each idle connection may take to answer the probe.
    probe_timeout: float = 1.5
    #: No takeover within this long is a :class:`DrillError`.
    takeover_timeout: float = 10.0
    #: ``daemon-kill`` of a daemon keepalived does not track: seconds between the kill
    #: and the keepalived stop that forces the failover.
    kill_grace: float = 1.0
    #: Allowed stall beyond the takeover time (the issue's target).
    stall_margin: float = 0.2
    #: The firewalls' drop counters are also read this long after the takeover.
    drop_sample: float = 0.5

    @property
    def alive_window(self) -> float:
        """A flow whose last round trip is older than this at the end is not alive."""
        return max(0.5, 10 * self.interval)


@dataclass(frozen=True)
class FlowOutcome:
    """What a failover did to one streaming flow."""

    kind: str
    local: str
    target: str
    survived: bool
    #: Longest time without a successful round trip, including the final one.
    stall: float
    #: Source address the server saw before the event and at the end (None: no reply
    #: after the takeover).
    mapping_before: str | None
    mapping_after: str | None
    error: str | None
    #: Seconds after the failover started of the round trips around the longest stall
    #: (the end is None if the stall is the final silence).
    gap: tuple[float, float | None] | None = None
    #: TCP: changes of the retransmission count of the requesting socket and of the
    #: echo server's socket, seconds after the failover started.
    retrans: tuple[Retrans, ...] = ()
    echo_retrans: tuple[Retrans, ...] = ()
    #: Every gap longer than 0.1 s (the final silence not included), same times.
    gaps: tuple[tuple[float, float], ...] = ()
    #: Requests sent and answered (each at most once), the longest request-to-reply
    #: time, and (UDP) replies counted late, duplicate replies and stray ones (see
    #: :class:`StreamRecord`).
    sent: int = 0
    oks: int = 0
    max_rtt: float = 0.0
    late: int = 0
    duplicates: int = 0
    strays: int = 0

    def gap_length(self, gap: tuple[float, float | None]) -> float:
        """How long ``gap`` lasted (a final silence lasted until the report: the
        flow's ``stall``)."""
        return (gap[1] - gap[0]) if gap[1] is not None else self.stall

    def gaps_overlapping(self, start: float, end: float) -> list[tuple[float, float | None]]:
        """The flow's gaps over 0.1 s, the final silence included, that overlap the
        window from ``start`` to ``end``: began before ``end`` and ended after ``start``."""
        gaps: list[tuple[float, float | None]] = list(self.gaps)
        if self.gap is not None and self.gap[1] is None:
            gaps.append(self.gap)
        return [g for g in gaps if g[0] < end and (g[1] is None or g[1] > start)]


#: The failover window ends this long after the path came back: a gap that began
#: before then can be the failover's (a request lost just before the path was back is
#: retried, and shows as a gap, later).
FAILOVER_SLACK = 0.5


@dataclass(frozen=True)
class PhaseResult:
    """The measurements of one event."""

    event: Event
    new_master: str
    #: ``daemon-kill`` only: keepalived does not track the daemon, so the drill stopped it.
    forced: bool
    #: Seconds from the event (for ``daemon-kill`` the kill, or the keepalived stop when
    #: forced) to both VIPs up.
    takeover: float
    flows: tuple[FlowOutcome, ...]
    idle: tuple[ProbeResult, ...]
    #: Keepalived transitions on both nodes, as (seconds after the event, node, state).
    transitions: tuple[tuple[float, str, str], ...]
    #: Counter increases on each firewall during the phase (see ``firewall.COUNTERS``).
    counters: dict[str, dict[str, int]]
    #: Conntrack entries on each firewall just before the event.
    conntrack: dict[str, int]
    stall_margin: float
    #: Seconds the replication took, after ``settle``, to catch up before the event.
    catch_up: float = 0.0
    #: The endpoints' TCP counter increases ("client", "server") from the event to the
    #: end of the hold (see ``tcpstats.COUNTERS``).
    tcp_stats: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Firewall counter increases since the event, read at several moments: (seconds
    #: after the failover started, {firewall: {counter: increase}}).
    drop_samples: tuple[tuple[float, dict[str, dict[str, int]]], ...] = ()
    #: Seconds after the failover started when each endpoint's ARP entry for its VIP
    #: first pointed at the new master (None: not seen before the end of the hold).
    arp: dict[str, float | None] = field(default_factory=dict)
    #: The new master's commits of the peer's entries after the failover started:
    #: (seconds after that when it finished, seconds it took, entries applied).
    commits: tuple[tuple[float, float, int], ...] = ()
    #: Seconds after the failover started when the idle connections were probed (their
    #: thousands of round trips at once load the shared host: gaps from then on are not
    #: the failover's).
    probe_at: float | None = None

    def of_kind(self, prefix: str) -> list[FlowOutcome]:
        """Flows whose kind starts with ``prefix`` (``"tcp"``, ``"udp-snat"``, ...)."""
        return [f for f in self.flows if f.kind.startswith(prefix)]

    @property
    def max_stall(self) -> float:
        """Longest stall of any streaming flow anywhere in the phase (also outside the
        failover window, e.g. during the idle probe): see :attr:`failover_stall`."""
        return max((f.stall for f in self.flows), default=0.0)

    @property
    def path_back(self) -> float:
        """When the path through the new master was back: VIPs up, and its first commit
        after the event that applied entries finished (if any; in hot mode the entries
        are in the kernel already and the commit applies none)."""
        commits = [t for t, _, applied in self.commits if applied > 0]
        return max(self.takeover, min(commits, default=0.0))

    @property
    def failover_window(self) -> tuple[float, float]:
        """The failover's window, in seconds after the failover started: from then until
        :data:`FAILOVER_SLACK` after the path came back (:attr:`path_back`), but never
        past the idle probe (its thousands of round trips at once load the shared host).
        """
        end = self.path_back + FAILOVER_SLACK
        if self.probe_at is not None:
            end = min(end, self.probe_at)
        return 0.0, end

    def failover_gap(self, flow: FlowOutcome) -> tuple[float, float | None] | None:
        """``flow``'s longest gap over 0.1 s that overlaps the failover window (None:
        none did)."""
        return max(flow.gaps_overlapping(*self.failover_window), key=flow.gap_length,
                   default=None)

    def failover_stall(self, prefix: str = "") -> float | None:
        """The failover's own gap: the longest gap of a flow of kind ``prefix`` (``""``:
        any) that overlaps the failover window (None: no such flow went 0.1 s without
        a round trip there)."""
        lengths = []
        for flow in self.of_kind(prefix):
            gap = self.failover_gap(flow)
            if gap is not None:
                lengths.append(flow.gap_length(gap))
        return max(lengths, default=None)

    @property
    def target(self) -> float:
        """The longest failover gap allowed: the VRRP takeover plus the margin."""
        return self.takeover + self.stall_margin

    @property
    def idle_ok(self) -> int:
        """Idle connections that answered the probe with an unchanged mapping."""
        return sum(p.ok for p in self.idle)

    @property
    def idle_total(self) -> int:
        """Idle connections probed."""
        return sum(p.total for p in self.idle)

    @property
    def within_target(self) -> bool:
        """Every flow survived, every idle connection answered, and the failover's own
        gap was no longer than takeover + margin (a gap under 0.1 s always is)."""
        stall = self.failover_stall()
        return (all(f.survived for f in self.flows) and self.idle_ok == self.idle_total
                and (stall is None or stall <= self.target))


def flow_outcome(record: StreamRecord, *, t_event: float, t_up: float, t_report: float,
                 alive_window: float, echo: Sequence[Retrans] = (),
                 origin: float | None = None) -> FlowOutcome:
    """Judge one flow: survived = no error, a reply after the takeover (``t_up``) and
    one within ``alive_window`` before the report; stall includes the final silence.
    ``echo``: the echo server's retransmissions on this flow. Times in the outcome are
    seconds after ``origin`` (default ``t_event``; the drill passes the moment the
    failover started)."""
    origin = t_event if origin is None else origin
    before = [m for t, m in record.mappings if t <= t_event]
    # Replies between the event and the takeover still came through the old master.
    replied_after = record.last_ok > t_up
    trailing = t_report - record.last_ok
    gap: tuple[float, float | None] | None
    if trailing > record.max_gap:
        gap = (record.last_ok - origin, None)
    elif record.gap_start is not None and record.gap_end is not None:
        gap = (record.gap_start - origin, record.gap_end - origin)
    else:
        gap = None
    return FlowOutcome(
        kind=record.kind, local=record.local, target=record.target,
        survived=record.error is None and replied_after and trailing <= alive_window,
        stall=max(record.max_gap, trailing),
        mapping_before=before[-1] if before else None,
        mapping_after=record.mappings[-1][1] if replied_after else None,
        error=record.error, gap=gap,
        retrans=tuple(r.shifted(origin) for r in record.retrans),
        echo_retrans=tuple(r.shifted(origin) for r in echo),
        gaps=tuple((a - origin, b - origin) for a, b in record.gaps),
        sent=record.sent, oks=record.oks, max_rtt=record.max_rtt, late=record.late,
        duplicates=record.duplicates, strays=record.strays)


class Drill:
    """The running pair: keepalived on both firewalls, echo servers, address watches."""

    def __init__(self, ha: HaLab, replication: Replication, config: DrillConfig,
                 timing: Timing) -> None:
        self.ha = ha
        self.replication = replication
        self.config = config
        self.timing = timing
        self.keepalived: dict[str, Keepalived] = {}
        self.watch: dict[str, AddressWatch] = {}
        #: ARP entries of the endpoints ("client", "server"), and the VIP each one uses.
        self.neighbours: dict[str, NeighbourWatch] = {}
        self.endpoint_vip = {"client": ha.plan.inside_vip, "server": ha.plan.outside_vip}
        #: Each firewall's MAC address on the client's and the server's side.
        self.macs: dict[str, dict[str, str]] = {}
        self._servers: list[Agent] = []
        self._killed: set[str] = set()
        self._cut: set[str] = set()
        self._phases = 0

    @property
    def vips(self) -> tuple[str, str]:
        """The inside and outside VIP."""
        return (self.ha.plan.inside_vip, self.ha.plan.outside_vip)

    def start(self) -> None:
        """Rulesets, replication, echo servers, then keepalived: ``a`` master, ``b`` backup."""
        for fw in self.ha.firewalls:
            firewall.configure(fw, self.ha.plan)
        self.replication.start(self.ha, self.ha.fw_a, self.ha.fw_b)
        for fw in self.ha.firewalls:
            self.watch[fw.name] = AddressWatch(self.ha, fw.ns, fw.workdir / "addrwatch.log")
            self.keepalived[fw.name] = Keepalived(self.ha, fw, self.timing,
                                                  self.replication.keepalived(fw))
        for fw in self.ha.firewalls:
            self.macs[fw.name] = {"client": _mac(fw, LAN_IF), "server": _mac(fw, WAN_IF)}
        for name, ns in (("client", self.ha.client), ("server", self.ha.server)):
            self.neighbours[name] = NeighbourWatch(self.ha, ns,
                                                   self.ha.workdir / f"{name}-neigh.log")
        self._servers = start_servers(self.ha)
        self.keepalived["a"].start()
        self._await_master("a", since=0.0)
        self.keepalived["b"].start()
        self._await_state("b", "BACKUP")

    def close(self) -> None:
        """Stop the echo servers and address watches (keepalived dies with the lab)."""
        for agent in self._servers:
            agent.stop()
        for watch in self.watch.values():
            watch.stop()
        for neighbours in self.neighbours.values():
            neighbours.stop()

    # --- state ---------------------------------------------------------------------------

    def holds_vips(self, name: str) -> bool:
        """Whether firewall ``name`` currently has both VIPs."""
        held: dict[str, bool] = {}
        for ev in self.watch[name].events():
            held[ev.addr] = ev.op == "add"
        return all(held.get(vip, False) for vip in self.vips)

    def master(self) -> str | None:
        """The firewall holding both VIPs (``None`` if neither or, briefly, both do)."""
        holders = [fw.name for fw in self.ha.firewalls if self.holds_vips(fw.name)]
        return holders[0] if len(holders) == 1 else None

    def _await_master(self, name: str, since: float) -> float:
        """Wait until ``name`` holds both VIPs; the time the later one came up."""
        deadline = time.monotonic() + self.config.takeover_timeout
        while time.monotonic() < deadline:
            if self.holds_vips(name):
                last_up = {ev.addr: ev.t for ev in self.watch[name].events() if ev.op == "add"}
                ups = [last_up[vip] for vip in self.vips]
                if min(ups) >= since:
                    return max(ups)
            time.sleep(0.005)
        raise DrillError(f"fw{name} did not take both VIPs within "
                         f"{self.config.takeover_timeout} s\n{self.diagnostics()}")

    def _await_demoted(self, name: str, since_wall: float) -> None:
        """Require that fw``name``'s keepalived, untouched by the drill, left MASTER by
        itself after ``since_wall`` (its notify script logs the transition)."""
        ka = self.keepalived[name]
        deadline = time.monotonic() + self.config.takeover_timeout
        while time.monotonic() < deadline:
            if not ka.running:
                raise DrillError(f"keepalived on fw{name} is not running\n{self.diagnostics()}")
            if any(t.state != "MASTER" for t in ka.transitions() if t.wall_time >= since_wall):
                return
            time.sleep(0.02)
        raise DrillError(f"fw{name}'s keepalived did not leave MASTER by itself\n"
                         f"{self.diagnostics()}")

    def _await_state(self, name: str, state: str) -> None:
        deadline = time.monotonic() + self.config.takeover_timeout
        while time.monotonic() < deadline:
            transitions = self.keepalived[name].transitions()
            if transitions and transitions[-1].state == state:
                return
            time.sleep(0.02)
        raise DrillError(f"fw{name} did not reach {state}\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        """The tail of every keepalived and replication log (for failure messages)."""
        parts = []
        for name, ka in self.keepalived.items():
            text = ka.log.read_text() if ka.log.exists() else ""
            parts.append(f"--- fw{name} keepalived.log (tail)\n{text[-3000:]}")
        for title, text in self.replication.diagnostics().items():
            parts.append(f"--- {title} (tail)\n{text[-3000:]}")
        return "\n".join(parts)

    # --- events ----------------------------------------------------------------------------

    def _endpoints_tcp(self) -> dict[str, dict[str, int]]:
        return {"client": tcpstats.read(self.ha.client),
                "server": tcpstats.read(self.ha.server)}

    def _counters_since(self, before: dict[str, dict[str, int]], origin: float
                        ) -> tuple[float, dict[str, dict[str, int]]]:
        now = {f.name: firewall.counters(f) for f in self.ha.firewalls}
        return (time.monotonic() - origin,
                {name: {k: now[name][k] - before[name].get(k, 0) for k in now[name]}
                 for name in now})

    def _arp_moved(self, new_master: str, origin: float) -> dict[str, float | None]:
        """When (after ``origin``) each endpoint's ARP entry for its VIP first named
        ``new_master``'s MAC."""
        found: dict[str, float | None] = {}
        for name, watch in self.neighbours.items():
            mac = self.macs[new_master][name]
            found[name] = next((ev.t - origin for ev in watch.events()
                                if ev.t >= origin and ev.dst == self.endpoint_vip[name]
                                and ev.lladdr == mac and ev.op == "add"), None)
        return found

    def _set_links(self, fw: Firewall, up: bool) -> None:
        for iface in (LAN_IF, WAN_IF):
            fw.ns.run(["ip", "link", "set", iface, "up" if up else "down"])

    def _fire(self, event: Event, fw: Firewall) -> tuple[float, bool]:
        """Fire ``event``; the time the failover started and whether it was forced."""
        t0 = time.monotonic()
        if event.kind is EventKind.PLANNED:
            self.keepalived[fw.name].terminate()
        elif event.kind is EventKind.CRASH:
            self._cut.add(fw.name)
            self._set_links(fw, up=False)
        elif event.kind is EventKind.DAEMON_KILL:
            if self.replication.kill(fw):
                self._killed.add(fw.name)
                if self.replication.tracked_by_keepalived:
                    # keepalived's own track script must notice: nothing else is done.
                    return t0, False
                time.sleep(self.config.kill_grace)
            t0 = time.monotonic()
            self.keepalived[fw.name].terminate()
            return t0, True
        else:
            if fw.name in self._killed:
                self.replication.revive(fw)
                self._killed.discard(fw.name)
            t0 = time.monotonic()
            if fw.name in self._cut:
                self._set_links(fw, up=True)
                self._cut.discard(fw.name)
            if not self.keepalived[fw.name].running:
                self.keepalived[fw.name].start()
        return t0, False

    def _drivers(self) -> list[Driver]:
        plan, cfg, wd = self.ha.plan, self.config, self.ha.workdir
        self._phases += 1
        server = f"{plan.server}:{plan.server_tcp_port}"
        forward = f"{plan.outside_vip}:{plan.forward_port}"
        drivers = [
            Driver(self.ha, self.ha.client, direction="snat",
                   streams=[f"tcp:{server}:{cfg.tcp_snat}",
                            f"udp:{plan.server}:{plan.server_udp_port}:{cfg.udp_snat}"],
                   idle=[f"{server}:{cfg.idle_snat}"], interval=cfg.interval,
                   log=wd / f"phase{self._phases}-client.log"),
            Driver(self.ha, self.ha.server, direction="dnat",
                   streams=[f"tcp:{forward}:{cfg.tcp_dnat}"],
                   idle=[f"{forward}:{cfg.idle_dnat}"], interval=cfg.interval,
                   log=wd / f"phase{self._phases}-server.log"),
        ]
        for driver in drivers:
            driver.ready(timeout=120)
        return drivers

    def phase(self, event: Event) -> PhaseResult:
        """Run one event with fresh traffic and measure it."""
        cfg = self.config
        fw = self.ha.firewall(event.node)
        if event.kind is EventKind.FAILBACK:
            new_master = fw.name
        else:
            # Waits out a moment of two masters (e.g. the backup's start-up under load).
            deadline = time.monotonic() + cfg.takeover_timeout
            while self.master() != fw.name:
                if time.monotonic() > deadline:
                    raise DrillError(f"{event}: fw{fw.name} is not the master")
                time.sleep(0.01)
            new_master = self.ha.peer(fw).name
        drivers = self._drivers()
        try:
            time.sleep(cfg.settle)
            catch_up = self.replication.caught_up(cfg.takeover_timeout)
            before = {f.name: firewall.counters(f) for f in self.ha.firewalls}
            conntrack = {f.name: firewall.conntrack_count(f) for f in self.ha.firewalls}
            tcp_before = self._endpoints_tcp()
            echo_retrans(self._servers)  # forget the retransmissions of earlier phases
            wall_offset = time.time() - time.monotonic()
            t_event = time.monotonic()
            t_start, forced = self._fire(event, fw)
            t_up = self._await_master(new_master, since=t_start)
            samples = [self._counters_since(before, t_start)]
            time.sleep(max(0.0, t_up + cfg.drop_sample - time.monotonic()))
            samples.append(self._counters_since(before, t_start))
            time.sleep(max(0.0, t_up + cfg.hold - time.monotonic()))
            tcp_after = self._endpoints_tcp()
            samples.append(self._counters_since(before, t_start))
            if event.kind is EventKind.DAEMON_KILL and not forced:
                self._await_demoted(fw.name, since_wall=t_start + wall_offset)
            t_probe = time.monotonic()
            for driver in drivers:
                driver.start_probe(cfg.probe_timeout)
            idle = tuple(driver.probe_result(cfg.probe_timeout) for driver in drivers)
            echo = echo_retrans(self._servers)
            flows = []
            for driver in drivers:
                t_report, records = driver.report()
                flows += [flow_outcome(r, t_event=t_event, t_up=t_up, t_report=t_report,
                                       alive_window=cfg.alive_window,
                                       echo=echo.get(r.mappings[-1][1], ()),
                                       origin=t_start)
                          for r in records]
        finally:
            for driver in drivers:
                driver.stop()
        after = {f.name: firewall.counters(f) for f in self.ha.firewalls}
        transitions: list[Transition] = []
        for ka in self.keepalived.values():
            transitions += ka.transitions()
        wall_event = t_event + wall_offset
        wall_start = t_start + wall_offset
        return PhaseResult(
            event=event, new_master=new_master, forced=forced, takeover=t_up - t_start,
            flows=tuple(flows), idle=idle,
            transitions=tuple(sorted((t.wall_time - wall_event, t.node, t.state)
                                     for t in transitions if t.wall_time >= wall_event)),
            counters={name: {k: after[name][k] - before[name].get(k, 0) for k in after[name]}
                      for name in after},
            conntrack=conntrack, stall_margin=cfg.stall_margin, catch_up=catch_up,
            tcp_stats={name: tcpstats.delta(tcp_before[name], tcp_after[name])
                       for name in tcp_after},
            drop_samples=tuple(samples), arp=self._arp_moved(new_master, t_start),
            commits=tuple((t - wall_start, seconds, applied) for t, seconds, applied
                          in self.replication.commits(self.ha.firewall(new_master))
                          if t >= wall_start),
            probe_at=t_probe - t_start)

    def run(self, events: Sequence[Event] = DEFAULT_SCENARIO) -> list[PhaseResult]:
        """Run ``events`` in order."""
        return [self.phase(event) for event in events]


def _mac(fw: Firewall, iface: str) -> str:
    out = fw.ns.run(["cat", f"/sys/class/net/{iface}/address"]).stdout
    return out.strip()


@contextmanager
def drill_lab(replication: Replication, config: DrillConfig | None = None,
              timing: Timing | None = None, tag: str = "dr") -> Iterator[Drill]:
    """A started :class:`Drill`; everything is stopped and removed on exit."""
    with ha_lab(tag) as ha:
        drill = Drill(ha, replication, config or DrillConfig(), timing or Timing())
        try:
            drill.start()
            yield drill
        finally:
            drill.close()
            replication.stop()

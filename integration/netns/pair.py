"""A running replicator daemon pair (active + standby) in lab namespaces, and the exact
comparison of the standby's copy with the active's table.

Two layouts, one :class:`Pair`:

* :func:`make_pair` (:class:`BridgedPair`, attack and fault tests, the soak): three
  namespaces on one bridge (in a fourth, ``sw``), all in :data:`SUBNET`: ``act``
  (:data:`ACTIVE_IP`, the active), ``sby`` (:data:`STANDBY_IP`, the standby) and ``x``
  (:data:`ATTACKER_IP`, the attacker or the test's helpers). The sync link runs between
  ``act`` and ``sby`` on ``eth0``; the daemons ignore the whole subnet, so the sync
  connection and any attack connection never count.
* :func:`firewall_pair` (:class:`FirewallPair`, the replication test with real traffic):
  the firewall lab of :mod:`integration.netns.firewall` (client -- fw -- server, real
  masquerade/DNAT/mark/label/zone, and a standby firewall with the same ruleset whose
  LAN/WAN links stay down) plus a veth ``sync0`` between ``fw`` (the active,
  :data:`SYNC_A`) and ``standby`` (:data:`SYNC_B`). The daemons ignore the two sync
  addresses and loopback (a test scraping a daemon's metrics is not firewall state).

Entries are written into a table by a separate batched injector socket
(:class:`Writer`: :class:`~replicator.kernel_linux.LinuxKernel` of the test process,
entered into the namespace): it stands in for traffic, and the daemon there sees
ordinary kernel events. :func:`synthetic` numbers a fixed family of distinct entries.

Comparisons (:meth:`Pair.differences`, :func:`converge`) are of what ``conntrack -L -o
extended,labels`` shows: kernel tables are listed with conntrack-tools (the reference,
independent of replicator's decoder), the standby's external cache with ``replicator
dump --external``, both parsed back with :func:`replicator.ctformat.parse_conntrack_line`
(so no id, counters or other volatile fields). Entries the daemons' filter ignores are
left out of both sides. The timeout is compared separately, within the bounds the
protocol allows (:func:`timeout_ok`).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from integration.netns import firewall
from integration.netns.firewall import Topology
from integration.netns.lab import Lab, Netns
from integration.netns.nodes import DaemonNode, NodeSpec, wait_for
from replicator.ctformat import format_entry, parse_conntrack_line, parse_conntrack_output
from replicator.kernel_linux import LinuxKernel
from replicator.model import (
    AF_INET,
    IPPROTO_TCP,
    CtTuple,
    Entry,
    EntryKey,
    Status,
    TcpInfo,
    TcpState,
)

PORT = 3790
#: Seconds a standby's remaining timeout may exceed the active's (the time between the
#: two reads).
TIMEOUT_SLACK = 3.0
#: The daemons' ``kernel.refresh_interval`` unless a test sets another.
REFRESH = 30.0

# The bridged layout.
SUBNET = "10.77.0.0/24"
ACTIVE_IP, STANDBY_IP, ATTACKER_IP = "10.77.0.1", "10.77.0.2", "10.77.0.3"

# The firewall layout.
SYNC_IF = "sync0"
SYNC_A, SYNC_B = "10.0.9.1", "10.0.9.2"
LOSS_TABLE = "replicator_sync_loss"

Table = dict[EntryKey, Entry]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- the pair ---------------------------------------------------------------------------


@dataclass
class Pair:
    """Two daemons (``active`` told MASTER, ``standby`` BACKUP, as keepalived would) and
    what the comparisons need to know about their configuration."""

    lab: Lab
    active: DaemonNode
    standby: DaemonNode
    #: The daemons' ``filters.ignore_addresses``: entries they do not replicate.
    ignored: tuple[Network, ...]
    #: The daemons' ``kernel.refresh_interval`` (bounds a copy's timeout).
    refresh: float
    #: The interface of the sync link in both daemons' namespaces.
    sync_if: str
    #: First entry number (:func:`synthetic`) no test has used yet on this pair.
    next_entry: int = field(default=0, init=False)

    @property
    def nodes(self) -> tuple[DaemonNode, DaemonNode]:
        """Both daemons."""
        return self.active, self.standby

    def take_entries(self, count: int) -> int:
        """Reserve ``count`` entry numbers; return the first."""
        first = self.next_entry
        self.next_entry += count
        return first

    def start(self) -> None:
        """Start both daemons, set their roles and wait for the link."""
        for node in self.nodes:
            self.start_node(node)
        wait_for(lambda: all(n.status()["peer_up"] for n in self.nodes), 30, "the sync link")

    def start_node(self, node: DaemonNode) -> None:
        """(Re)start one daemon and tell it its keepalived role."""
        node.start()
        node.notify("MASTER" if node is self.active else "BACKUP")

    def restart(self, node: DaemonNode) -> None:
        """Stop one daemon cleanly and start it again in its role."""
        node.stop()
        self.start_node(node)

    # --- the sync link

    def sync_loss(self, ns: Netns, percent: int) -> None:
        """Drop ``percent`` % of the packets ``ns`` receives on the sync link."""
        ns.nft(f"""
table inet {LOSS_TABLE} {{
    chain input {{
        type filter hook input priority filter - 10;
        iifname "{self.sync_if}" numgen random mod 100 < {percent} counter drop
    }}
}}
""")

    def no_sync_loss(self, ns: Netns) -> None:
        """Remove :meth:`sync_loss`'s rule."""
        ns.run(["nft", "delete", "table", "inet", LOSS_TABLE])

    def sync_link(self, up: bool) -> None:
        """Take the active's end of the sync link down or bring it back up."""
        self.active.ns.run(["ip", "link", "set", self.sync_if, "up" if up else "down"])

    # --- tables

    def replicated(self, entries: Iterable[Entry]) -> Table:
        """Entries by key, those the daemons ignore left out: the filter's rule, an
        ignored original or reply *source* (:mod:`replicator.filters`)."""
        nets = [(int(n.network_address), int(n.netmask), 4 if n.version == 4 else 16)
                for n in self.ignored]

        def ignored(raw: bytes) -> bool:
            value = int.from_bytes(raw, "big")
            return any(len(raw) == size and value & mask == net for net, mask, size in nets)

        return {e.key: e for e in entries
                if not (ignored(e.orig.src) or ignored(e.reply.src))}

    def kernel(self, node: DaemonNode) -> Table:
        """``node``'s kernel table as conntrack-tools lists it (labels as bit numbers)."""
        return self.replicated(parse_conntrack_output(
            firewall.conntrack(node.ns, ["-L", "-o", "extended,labels"])))

    def external(self, node: DaemonNode) -> Table:
        """The peer entries ``node`` holds (``replicator dump --external``)."""
        lines: list[str] = node.cli("dump", "--external")["entries"]
        return self.replicated(parse_conntrack_line(line) for line in lines)

    def differences(self, expected: Table, actual: Table, limit: int = 5) -> list[str]:
        """How ``actual`` differs from ``expected`` (empty: equal): counts and up to
        ``limit`` examples of each kind."""
        return differences(expected, actual, refresh=self.refresh, limit=limit)


@dataclass
class BridgedPair(Pair):
    """The bridged layout: the pair plus the attacker's namespace on the sync network."""

    attacker: Netns = field(kw_only=True)
    #: Last octet of the next unused attacker address (:meth:`new_addresses`).
    next_host: int = field(default=10, init=False)

    def new_addresses(self, count: int) -> list[str]:
        """``count`` fresh addresses on the attacker's interface (one per attack, so
        each attack's log lines can be told apart)."""
        prefix = SUBNET.rsplit(".", 1)[0]
        addresses = [f"{prefix}.{self.next_host + i}" for i in range(count)]
        self.next_host += count
        for addr in addresses:
            self.attacker.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
        return addresses


@dataclass
class FirewallPair(Pair):
    """The firewall layout: the pair runs on ``topo.fw`` (active) and ``topo.standby``."""

    topo: Topology = field(kw_only=True)


def _with_refresh(refresh: float, extra: dict[str, list[str]] | None) -> dict[str, list[str]]:
    more = {"kernel": [f"refresh_interval = {refresh:g}"]}
    for table, lines in (extra or {}).items():
        more[table] = more.get(table, []) + lines
    return more


def make_pair(the_lab: Lab, workdir: Path, *, mode: str = "hot", refresh: float = REFRESH,
              active_extra: dict[str, list[str]] | None = None,
              standby_extra: dict[str, list[str]] | None = None,
              active_rcvbuf: int = 64 << 20, start: bool = True) -> BridgedPair:
    """The bridged layout: create the namespaces, write both configs and (with
    ``start``) start the daemons."""
    sw = the_lab.netns("sw")
    act, sby, x = the_lab.netns("act"), the_lab.netns("sby"), the_lab.netns("x")
    ports = []
    for ns, addr in ((act, ACTIVE_IP), (sby, STANDBY_IP), (x, ATTACKER_IP)):
        port = f"p{ns.name[-3:]}"
        the_lab.veth(sw, port, ns, "eth0")
        ns.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
        ports.append(port)
    the_lab.bridge(sw, "br0", ports)
    for ns in (act, sby):
        ns.sysctl("net.netfilter.nf_conntrack_events", 1)
    active = DaemonNode(the_lab, act, NodeSpec(
        name="act", peer_name="sby", listen_address=ACTIVE_IP, peer_address=STANDBY_IP,
        mode=mode, port=PORT, extra=_with_refresh(refresh, active_extra),
        rcvbuf_bytes=active_rcvbuf, ignore_addresses=(SUBNET,), vrrp_name="VI_1"), workdir)
    standby = DaemonNode(the_lab, sby, NodeSpec(
        name="sby", peer_name="act", listen_address=STANDBY_IP, peer_address=ACTIVE_IP,
        mode=mode, port=PORT, extra=_with_refresh(refresh, standby_extra),
        ignore_addresses=(SUBNET,), vrrp_name="VI_1"), workdir)
    pair = BridgedPair(the_lab, active, standby, (ipaddress.ip_network(SUBNET),), refresh,
                       "eth0", attacker=x)
    if start:
        pair.start()
    return pair


#: What the firewall layout's daemons ignore: the sync link's own connection, and a
#: node's connections to itself.
_FIREWALL_IGNORED = (SYNC_A, SYNC_B, "127.0.0.0/8", "::1")


def firewall_pair(the_lab: Lab, workdir: Path, *, mode: str, refresh: float = 5.0,
                  extra: dict[str, list[str]] | None = None,
                  metrics_port: int | None = None) -> FirewallPair:
    """The firewall layout: build it, start both daemons and wait until they are
    connected. ``metrics_port``: both serve Prometheus metrics on ``127.0.0.1:PORT``
    inside their namespace (see :func:`metric`)."""
    topo = firewall.build(the_lab, standby=True)
    assert topo.standby is not None
    the_lab.veth(topo.fw, SYNC_IF, topo.standby, SYNC_IF)
    topo.fw.run(["ip", "addr", "add", f"{SYNC_A}/30", "dev", SYNC_IF])
    topo.standby.run(["ip", "addr", "add", f"{SYNC_B}/30", "dev", SYNC_IF])
    nodes = []
    for name, peer, here, there, ns in (("a", "b", SYNC_A, SYNC_B, topo.fw),
                                        ("b", "a", SYNC_B, SYNC_A, topo.standby)):
        spec = NodeSpec(name, peer, here, there, mode=mode, port=PORT,
                        extra=_with_refresh(refresh, extra),
                        ignore_addresses=_FIREWALL_IGNORED, metrics_port=metrics_port)
        nodes.append(DaemonNode(the_lab, ns, spec, workdir))
    ignored = tuple(ipaddress.ip_network(a) for a in _FIREWALL_IGNORED)
    pair = FirewallPair(the_lab, nodes[0], nodes[1], ignored, refresh, SYNC_IF, topo=topo)
    pair.start()
    return pair


# --- entries ----------------------------------------------------------------------------

#: The server of every synthetic entry (TEST-NET-3).
SYNTH_SERVER = ipaddress.IPv4Address("203.0.113.1").packed
_SYNTH_CLIENTS = int(ipaddress.IPv4Address("100.64.0.0"))  # 100.64.0.0/10
_SYNTH_NAT = int(ipaddress.IPv4Address("198.18.0.0"))  # 198.18.0.0/15
#: How many distinct synthetic entries there are (one client address each).
SYNTH_LIMIT = 1 << 22
_NAT_PORTS = 60000


def synthetic(start: int, count: int, *, timeout: int = 3600) -> list[Entry]:
    """Entries number ``start`` .. ``start + count - 1`` (below :data:`SYNTH_LIMIT`) of a
    fixed family of established, masqueraded IPv4 TCP entries: client
    ``100.64.0.0 + i`` to :data:`SYNTH_SERVER`, translated to a NAT address and port of
    its own in 198.18.0.0/15. Original and reply tuples are unique per number (a reused
    translated tuple would clash, EEXIST); every third entry carries a mark. None of the
    addresses is in a lab's ranges.
    """
    if start < 0 or start + count > SYNTH_LIMIT:
        raise ValueError(f"synthetic entries {start}..{start + count - 1} "
                         f"beyond 0..{SYNTH_LIMIT - 1}")
    status = int(Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED)
    tcp = TcpInfo(TcpState.ESTABLISHED)
    out = []
    for i in range(start, start + count):
        client = (_SYNTH_CLIENTS + i).to_bytes(4, "big")
        nat = (_SYNTH_NAT + i // _NAT_PORTS).to_bytes(4, "big")
        out.append(Entry(AF_INET, CtTuple(client, SYNTH_SERVER, IPPROTO_TCP, 40000, 443),
                         CtTuple(SYNTH_SERVER, nat, IPPROTO_TCP, 443, 1024 + i % _NAT_PORTS),
                         status=status, timeout=timeout, mark=i % 3, tcp=tcp))
    return out


class Writer:
    """Writes entries into one namespace's table (stands in for traffic there)."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns

    def upsert(self, entries: Sequence[Entry]) -> None:
        """Create or update ``entries``; every one must be applied."""
        self._run("upsert", entries)

    def delete(self, entries: Sequence[Entry]) -> None:
        """Delete ``entries``; every one must exist."""
        self._run("delete", entries)

    def _run(self, op: str, entries: Sequence[Entry]) -> None:
        async def go() -> None:
            async with LinuxKernel(self.ns.name) as kernel:
                result = await getattr(kernel, op)(entries)
            if result.errors:
                raise AssertionError(f"{op}: {len(result.errors)} failed: {result.errors[:3]}")

        trio.run(go)


class BackgroundWrites:
    """Creates entries in a thread, a batch every ``interval`` s, while a block runs.

    ``with BackgroundWrites(writer, start) as bg: ...`` then ``bg.next`` is the first
    entry number not used (the entries written are ``start .. bg.next - 1``).
    """

    def __init__(self, writer: Writer, start: int, batch: int = 50,
                 interval: float = 0.2) -> None:
        self.writer, self.start, self.next = writer, start, start
        self._batch, self._interval = batch, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.writer.upsert(synthetic(self.next, self._batch))
                self.next += self._batch
                self._stop.wait(self._interval)
        except BaseException as exc:  # reported by __exit__
            self._error = exc

    def __enter__(self) -> BackgroundWrites:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self.next == self.start:
            raise AssertionError("no entry was written in the background")


# --- comparison -------------------------------------------------------------------------


def timeout_ok(active: int | None, standby: int | None, *, refresh: float,
               slack: float = TIMEOUT_SLACK) -> bool:
    """Whether the standby's remaining timeout is one the protocol allows.

    Never more than the active's (plus ``slack`` for the time between the two reads);
    never less than half of it minus the re-dump interval: the sender refreshes a
    peer's copy only once it has less than half of the entry's remaining lifetime
    (``replicator.sync``, "Timeouts and expiry"), and learns of a refresh by packets
    only at the next re-dump.
    """
    if active is None or standby is None:
        return active == standby
    return active / 2 - refresh - slack <= standby <= active + slack


def _same(a: Entry, b: Entry) -> bool:
    # The timeout is compared apart; a mark the text form leaves out reads as 0.
    return a._replace(timeout=None, mark=a.mark or 0) == b._replace(timeout=None,
                                                                     mark=b.mark or 0)


def differences(expected: Table, actual: Table, *, refresh: float,
                limit: int = 5) -> list[str]:
    """How ``actual`` differs from ``expected`` (empty: equal): one line per kind of
    difference with its count and up to ``limit`` examples."""
    found: dict[str, list[str]] = {
        "missing": [format_entry(expected[k]) for k in expected.keys() - actual.keys()],
        "extra": [format_entry(actual[k]) for k in actual.keys() - expected.keys()],
        "differ": [],
        "with a timeout out of bounds": [],
    }
    for key in expected.keys() & actual.keys():
        a, b = expected[key], actual[key]
        if not _same(a, b):
            found["differ"].append(f"{format_entry(a)} != {format_entry(b)}")
        elif not timeout_ok(a.timeout, b.timeout, refresh=refresh):
            found["with a timeout out of bounds"].append(
                f"{a.timeout} != {b.timeout}: {format_entry(a)}")
    out = []
    for kind, lines in found.items():
        if lines:
            shown = "\n    ".join(sorted(lines)[:limit])
            out.append(f"{len(lines)} of {len(expected)} {kind}, e.g.:\n    {shown}")
    return out


def count_mismatch(pair: Pair, *, kernel: bool) -> str:
    """Empty if the link is up, the standby's external cache holds as many entries as
    the active's internal cache and (with ``kernel``) the standby's kernel at least as
    many: cheap necessary conditions of equality (a kernel's count includes entries the
    filter ignores, such as the sync connection). Otherwise what differs."""
    act, sby = pair.active.status(), pair.standby.status()
    want, have = act["entries"]["internal"], sby["entries"]
    if not (act["peer_up"] and sby["peer_up"]):
        return "the link is down"
    if have["external"] == want and (not kernel or have["kernel"] >= want):
        return ""
    return (f"the active holds {want} entries, the standby {have['external']} "
            f"(external cache) and {have['kernel']} (kernel)")


def converge(pair: Pair, timeout: float, what: str, *, kernel: bool | None = None,
             since: float | None = None) -> float:
    """Wait until the standby's external cache (and, with ``kernel``, its kernel table;
    by default in ``hot`` mode) equals the active's kernel table exactly; print and
    return the seconds since ``since`` (a ``time.monotonic()`` reading; default: now).

    Raises AssertionError with the remaining differences if it never does.
    """
    if kernel is None:
        kernel = pair.standby.spec.mode == "hot"
    start = time.monotonic()
    problems: list[str] = []
    while time.monotonic() - start < timeout:
        # Cheap first (large tables take seconds to list and compare): the counts.
        mismatch = count_mismatch(pair, kernel=kernel)
        if mismatch:
            problems = [mismatch]
            time.sleep(0.3)
            continue
        truth = pair.kernel(pair.active)
        problems = [f"external cache: {p}"
                    for p in pair.differences(truth, pair.external(pair.standby))]
        if kernel:
            problems += [f"standby kernel: {p}"
                         for p in pair.differences(truth, pair.kernel(pair.standby))]
        if not problems:
            seconds = time.monotonic() - (start if since is None else since)
            print(f"converged after {what}: {seconds:.2f} s", flush=True)
            return seconds
        time.sleep(0.3)
    shown = "\n".join(problems)
    raise AssertionError(f"no convergence {timeout} s after {what}:\n{shown}\n"
                         f"active log:\n{pair.active.log_tail(15)}\n"
                         f"standby log:\n{pair.standby.log_tail(15)}")


# --- one node ---------------------------------------------------------------------------


def stats(node: DaemonNode) -> dict[str, Any]:
    """``replicator stats --json``."""
    result: dict[str, Any] = node.cli("stats")
    return result


def metric(node: DaemonNode, name: str) -> float:
    """Sum of the samples of metric ``name`` (all labels) that ``node`` serves over HTTP
    (``NodeSpec.metrics_port``), read from inside its namespace."""
    port = node.spec.metrics_port
    if port is None:
        raise ValueError(f"{node.spec.name} serves no metrics")
    text = node.ns.run(["curl", "-sf", f"http://127.0.0.1:{port}/metrics"]).stdout
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name or sample.startswith(name + "{"):
            total += float(value)
    return total


def log_lines(node: DaemonNode, needle: str) -> list[str]:
    """Lines of the node's log containing ``needle``."""
    return [line for line in node.log.read_text(errors="replace").splitlines()
            if needle in line]


def set_config(node: DaemonNode, key: str, value: str) -> None:
    """Replace the line ``key = ...`` of the node's config file (first occurrence)
    with ``key = value`` (``value`` is TOML, e.g. ``'"10.0.0.1"'``)."""
    lines = node.config.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("=", 1)[0].strip() == key:
            lines[i] = f"{key} = {value}"
            node.config.write_text("\n".join(lines) + "\n")
            return
    raise KeyError(f"{key} not in {node.config}")


def toml_paths(paths: Iterable[Path]) -> str:
    """A TOML array of paths."""
    return "[" + ", ".join(f'"{p}"' for p in paths) + "]"


def reload(node: DaemonNode) -> None:
    """SIGHUP the daemon and wait until it logged that it reloaded."""
    assert node.proc is not None
    done = len(log_lines(node, "reloaded"))
    os.kill(node.proc.pid, signal.SIGHUP)
    wait_for(lambda: len(log_lines(node, "reloaded")) > done, 20, f"{node.spec.name} reload")

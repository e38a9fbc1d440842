"""Two firewalls running replicator over a dedicated sync link, and ways to compare them.

Layout: the firewall lab of :mod:`integration.netns.firewall` (client -- fw -- server,
real masquerade/DNAT/mark/label/zone, and a standby firewall with the same ruleset whose
LAN/WAN links stay down) plus a veth ``sync0`` between ``fw`` (the active, node ``a``,
:data:`SYNC_A`) and ``standby`` (node ``b``, :data:`SYNC_B`). A replicator daemon runs
in each firewall; the sync link's own TCP connection is excluded from replication with
``filters.ignore_addresses``, and from every comparison here (so are loopback
connections, e.g. a test scraping a daemon's metrics: not firewall state).

Comparisons are of *normalised* entries (:func:`normalise`): what ``conntrack -L -o
extended,labels`` shows (:func:`replicator.ctformat.text_projection`) without the
timeout, which is compared separately (:func:`differences`). Tables are read from the
active's kernel with conntrack-tools (the reference), from the standby's external cache
with ``replicator dump --external`` and from the standby's kernel with conntrack-tools.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from integration.netns import firewall
from integration.netns.firewall import Topology
from integration.netns.lab import Lab, Netns
from integration.netns.nodes import DaemonNode, NodeSpec
from replicator.ctformat import parse_conntrack_line, parse_conntrack_output, text_projection
from replicator.kernel import InjectResult
from replicator.kernel_linux import LinuxKernel
from replicator.model import AF_INET, IPPROTO_TCP, CtTuple, Entry, EntryKey, Status, TcpInfo

SYNC_IF = "sync0"
SYNC_A = "10.0.9.1"
SYNC_B = "10.0.9.2"
SYNC_PORT = 3790
LOSS_TABLE = "replicator_sync_loss"

Table = dict[EntryKey, Entry]


_SYNC = {ipaddress.ip_address(SYNC_A).packed, ipaddress.ip_address(SYNC_B).packed}
_LOOPBACK = {ipaddress.ip_address("127.0.0.1").packed, ipaddress.ip_address("::1").packed}


def _excluded(entry: Entry) -> bool:
    # The sync link's own connection (filtered out of replication by both daemons) and
    # a node's connections to itself (the tests' metrics scrapes): not firewall state.
    return not {entry.orig.src, entry.orig.dst}.isdisjoint(_SYNC | _LOOPBACK)


def normalise(entry: Entry) -> Entry:
    """What must survive replication, timeout excluded (``mark`` absent reads as 0)."""
    return text_projection(entry)._replace(timeout=None, mark=entry.mark or 0)


def table_of(entries: Sequence[Entry]) -> Table:
    """Entries by key, the sync link's own connection left out."""
    return {e.key: e for e in entries if not _excluded(e)}


def kernel_table(ns: Netns) -> Table:
    """``ns``'s conntrack table as conntrack-tools lists it (labels as bit numbers)."""
    return table_of(parse_conntrack_output(
        firewall.conntrack(ns, ["-L", "-o", "extended,labels"])))


def external_table(node: DaemonNode) -> Table:
    """The peer entries ``node`` holds (``replicator dump --external``)."""
    lines: list[str] = node.cli("dump", "--external")["entries"]
    return table_of([parse_conntrack_line(line) for line in lines])


def timeout_ok(active: int | None, standby: int | None, *, slack: float,
               refresh: float) -> bool:
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


def differences(active: Table, standby: Table, *, slack: float = 3.0,
                refresh: float = 30.0) -> list[str]:
    """Readable differences between two tables (empty: equal)."""
    out: list[str] = []
    for key in active.keys() - standby.keys():
        out.append(f"missing on standby: {normalise(active[key])}")
    for key in standby.keys() - active.keys():
        out.append(f"extra on standby: {normalise(standby[key])}")
    for key in active.keys() & standby.keys():
        a, s = active[key], standby[key]
        if normalise(a) != normalise(s):
            out.append(f"differs: active {normalise(a)} standby {normalise(s)}")
        elif not timeout_ok(a.timeout, s.timeout, slack=slack, refresh=refresh):
            out.append(f"timeout: active {a.timeout} standby {s.timeout} for {key}")
    return sorted(out)


def converge(read_active: Callable[[], Table], read_standby: Callable[[], Table],
             timeout: float, what: str, *, refresh: float = 30.0) -> float:
    """Poll both tables until they are equal; return the seconds it took.

    Raises ``AssertionError`` with the last differences when ``timeout`` passes.
    """
    start = time.monotonic()
    while True:
        diff = differences(read_active(), read_standby(), refresh=refresh)
        if not diff:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            shown = "\n  ".join(diff[:20])
            raise AssertionError(f"{what}: not equal after {timeout} s "
                                 f"({len(diff)} differences):\n  {shown}")
        time.sleep(0.3)


# --- synthetic entries ------------------------------------------------------------------

SYNTH_SERVER = bytes([10, 80, 0, 1])


def synthetic(count: int, start: int = 0, *, timeout: int = 600) -> list[Entry]:
    """``count`` established, masqueraded IPv4 TCP entries numbered from ``start``
    (below 2**21).

    Original and reply tuples are unique per number (a reused translated tuple would
    clash, EEXIST); every third entry carries a mark.
    """
    status = int(Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED)
    tcp = TcpInfo(3)
    out = []
    for i in range(start, start + count):
        client = bytes([10, 70 + (i >> 16), (i >> 8) & 255, i & 255])
        nat = bytes([10, 100, (i // 60000) & 255, 1])
        out.append(Entry(AF_INET, CtTuple(client, SYNTH_SERVER, IPPROTO_TCP, 40000, 443),
                         CtTuple(SYNTH_SERVER, nat, IPPROTO_TCP, 443, 1024 + i % 60000),
                         status=status, timeout=timeout, mark=i % 3, tcp=tcp))
    return out


async def _write(ns: Netns, entries: Sequence[Entry], delete: bool) -> InjectResult:
    async with LinuxKernel(ns.name) as kernel:
        if delete:
            return await kernel.delete(entries)
        return await kernel.upsert(entries)


def inject(ns: Netns, entries: Sequence[Entry]) -> None:
    """Create ``entries`` in ``ns``'s table with the batched injector (as from packets:
    the daemon there sees ordinary kernel events from a socket not its own)."""
    result = trio.run(_write, ns, entries, False)
    if result.errors:
        raise RuntimeError(f"inject: {len(result.errors)} refused, e.g. {result.errors[0]}")


def remove(ns: Netns, entries: Sequence[Entry]) -> None:
    """Delete ``entries`` from ``ns``'s table."""
    result = trio.run(_write, ns, entries, True)
    if result.errors:
        raise RuntimeError(f"remove: {len(result.errors)} refused, e.g. {result.errors[0]}")


# --- the pair ---------------------------------------------------------------------------


@dataclass
class SyncPair:
    """The firewall lab with a replicator daemon on each firewall."""

    topo: Topology
    a: DaemonNode
    b: DaemonNode
    workdir: Path
    refresh: float

    @property
    def active(self) -> Netns:
        """The active firewall's namespace (node ``a``)."""
        return self.topo.fw

    @property
    def standby(self) -> Netns:
        """The standby firewall's namespace (node ``b``)."""
        assert self.topo.standby is not None
        return self.topo.standby

    def active_table(self) -> Table:
        """The active's kernel table (the reference)."""
        return kernel_table(self.active)

    def standby_external(self) -> Table:
        """The standby daemon's external cache."""
        return external_table(self.b)

    def standby_kernel(self) -> Table:
        """The standby's kernel table."""
        return kernel_table(self.standby)

    def converge_external(self, timeout: float, what: str) -> float:
        """Seconds until the standby's external cache equals the active's kernel."""
        return converge(self.active_table, self.standby_external, timeout, what,
                        refresh=self.refresh)

    def converge_kernel(self, timeout: float, what: str) -> float:
        """Seconds until the standby's kernel equals the active's kernel."""
        return converge(self.active_table, self.standby_kernel, timeout, what,
                        refresh=self.refresh)

    def start(self, node: DaemonNode, role: str) -> None:
        """(Re)start ``node`` and tell it its keepalived role."""
        node.start()
        node.notify(role)

    def sync_loss(self, ns: Netns, percent: int) -> None:
        """Drop ``percent`` % of the packets ``ns`` receives on the sync link."""
        ns.nft(f"""
table inet {LOSS_TABLE} {{
    chain input {{
        type filter hook input priority filter - 10;
        iifname "{SYNC_IF}" numgen random mod 100 < {percent} counter drop
    }}
}}
""")

    def no_sync_loss(self, ns: Netns) -> None:
        """Remove :meth:`sync_loss`'s rule."""
        ns.run(["nft", "delete", "table", "inet", LOSS_TABLE])

    def sync_link(self, up: bool) -> None:
        """Take the sync link down (both ends lose carrier) or bring it back up."""
        self.active.run(["ip", "link", "set", SYNC_IF, "up" if up else "down"])


def build_pair(lab: Lab, workdir: Path, *, mode: str, refresh: float = 5.0,
               extra: dict[str, list[str]] | None = None,
               metrics_port: int | None = None) -> SyncPair:
    """Build the lab, start both daemons (``a`` MASTER, ``b`` BACKUP) and wait until
    they are connected. ``metrics_port``: both serve Prometheus metrics on
    ``127.0.0.1:PORT`` inside their namespace (see :func:`metric`)."""
    topo = firewall.build(lab, standby=True)
    assert topo.standby is not None
    lab.veth(topo.fw, SYNC_IF, topo.standby, SYNC_IF)
    topo.fw.run(["ip", "addr", "add", f"{SYNC_A}/30", "dev", SYNC_IF])
    topo.standby.run(["ip", "addr", "add", f"{SYNC_B}/30", "dev", SYNC_IF])
    more = {"kernel": [f"refresh_interval = {refresh:g}"]}
    for table, lines in (extra or {}).items():
        more[table] = more.get(table, []) + lines
    nodes = []
    for name, peer, here, there, ns in (("a", "b", SYNC_A, SYNC_B, topo.fw),
                                        ("b", "a", SYNC_B, SYNC_A, topo.standby)):
        spec = NodeSpec(name, peer, here, there, mode=mode, port=SYNC_PORT, extra=more,
                        ignore_addresses=(SYNC_A, SYNC_B), metrics_port=metrics_port)
        nodes.append(DaemonNode(lab, ns, spec, workdir))
    pair = SyncPair(topo, nodes[0], nodes[1], workdir, refresh)
    pair.start(pair.a, "MASTER")
    pair.start(pair.b, "BACKUP")
    wait_connected(pair.b, 30)
    return pair


def wait_connected(node: DaemonNode, timeout: float) -> float:
    """Seconds until ``node`` reports its peer up."""
    start = time.monotonic()
    while not node.status()["peer_up"]:
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{node.spec.name}: peer not up after {timeout} s\n"
                               + node.log_tail())
        time.sleep(0.1)
    return time.monotonic() - start


def report(what: str, seconds: float) -> None:
    """Print one convergence time (shown with ``pytest -s``; kept in the captured log)."""
    print(f"converged: {what}: {seconds:.2f} s", flush=True)


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

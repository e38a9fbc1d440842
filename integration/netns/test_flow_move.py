"""The real proof: live NAT'd TCP flows survive a move to a second firewall by injection.

Topology (``firewall.build(..., standby=True)``): client -- fw -- server, plus a standby
firewall with the same ruleset, the same addresses and MACs (the outside address is the
shared masquerade address, like a VIP) and its links down. Both firewalls are made
strict on top of the lab ruleset (:data:`STRICT`): forward policy drop, ``ct state
invalid`` dropped (and counted), a new TCP connection only with a lone SYN, and
``nf_conntrack_tcp_loose=0`` so the kernel never picks up a connection mid-stream.

While real TCP connections exchange sequence-numbered messages through ``fw``, its
table is dumped (:func:`replicator.kernel_linux.dump`), injected into the standby with
:func:`replicator.inject.upsert`, and the links are switched over. The connections must
keep working on the same server-side sockets, i.e. with the NAT mapping (source address
*and* port the server sees) unchanged. The negative control does the same without the
injection: the standby must drop the flows as invalid.

Flows: TCP with masquerade and with the DNAT port forward (plus masquerade), and UDP
with masquerade, in the lab ruleset's ct zone and with its ct label; IPv4 and IPv6.
The standby accepts a new UDP flow (and counts it), so for UDP the proof is that the
counter stays at zero: every datagram matched an injected entry. The negative control
is TCP only (UDP without an entry simply starts over as a new flow). The sockets are
made by this process inside the client and server namespaces
(:func:`replicator.netns.entered`), so the test sees both ends of every flow.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import trio

from integration.netns import firewall
from integration.netns.firewall import (
    ECHO_PORT,
    FORWARD_PORT,
    FW_LAN,
    FW_WAN,
    LABEL_BIT,
    LABEL_PORT,
    SERVER,
    UDP_PORT,
    ZONE,
    ZONE_PORT,
    Topology,
)
from integration.netns.lab import Lab, Netns
from replicator import inject
from replicator.kernel_linux import dump
from replicator.model import Entry
from replicator.netns import entered

STRICT = """
table inet strict {
    counter invalid { }
    counter new_udp { }
    chain forward {
        type filter hook forward priority filter + 10; policy drop;
        ct state invalid counter name "invalid" drop
        ct state established,related accept
        ct state new tcp flags & (fin | syn | rst | ack) == syn accept
        ct state new meta l4proto udp counter name "new_udp" accept
    }
}
"""

#: (name, family, destination the client connects to)
FLOWS = [
    ("masquerade-v4", socket.AF_INET, (SERVER.v4, ECHO_PORT)),
    ("dnat-v4", socket.AF_INET, (FW_LAN.v4, FORWARD_PORT)),
    ("masquerade-v6", socket.AF_INET6, (SERVER.v6, ECHO_PORT)),
    ("dnat-v6", socket.AF_INET6, (FW_LAN.v6, FORWARD_PORT)),
]
#: UDP flows: plain masquerade, the ct zone port and the ct label port.
UDP_FLOWS = [
    (f"{kind}-v{v}", family, (SERVER.of(v), port))
    for v, family in ((4, socket.AF_INET), (6, socket.AF_INET6))
    for kind, port in (("udp", UDP_PORT), ("zone", ZONE_PORT), ("label", LABEL_PORT))
]
TIMEOUT = 3.0


@dataclass
class Connection:
    """Both ends of one live TCP connection, and the counter of its messages."""

    name: str
    client: socket.socket
    server: socket.socket
    #: The source (address, port) the server sees: the masquerade mapping.
    seen_from: tuple[str, int]
    sent: int = 0

    def exchange(self) -> None:
        """One sequence-numbered message each way; fails on loss, reorder or timeout."""
        self.sent += 1
        request = f"req {self.sent:06d}\n".encode()
        self.client.sendall(request)
        assert _read(self.server, len(request)) == request, self.name
        answer = f"ack {self.sent:06d}\n".encode()
        self.server.sendall(answer)
        assert _read(self.client, len(answer)) == answer, self.name


@dataclass
class Datagrams:
    """A connected UDP client and the server socket of its port."""

    name: str
    client: socket.socket
    server: socket.socket
    seen_from: tuple[str, int] | None = None
    sent: int = 0

    def exchange(self) -> None:
        """One sequence-numbered datagram each way; the server must see the same source
        every time (the masquerade mapping)."""
        self.sent += 1
        request = f"{self.name} {self.sent:06d}".encode()
        self.client.send(request)
        data, peer = self.server.recvfrom(256)
        source = (_normalise(peer[0]), peer[1])
        assert data == request, self.name
        if self.seen_from is None:
            assert source[0] in (FW_WAN.v4, FW_WAN.v6), (self.name, source)
            self.seen_from = source
        assert source == self.seen_from, self.name
        self.server.sendto(b"ack " + request, peer)
        assert self.client.recv(256) == b"ack " + request, self.name


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def _strict_firewall(ns: Netns) -> None:
    ns.nft(STRICT)
    ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)


def _counted(ns: Netns, counter: str) -> int:
    out = json.loads(ns.run(["nft", "-j", "list", "counter", "inet", "strict", counter]).stdout)
    return int(next(item["counter"]["packets"] for item in out["nftables"] if "counter" in item))


def _normalise(host: str) -> str:
    # Dual-stack listener: IPv4 peers appear as ::ffff:a.b.c.d.
    return host.removeprefix("::ffff:")


@pytest.fixture
def topology(netlab: Lab) -> Topology:
    topo = firewall.build(netlab, standby=True)
    assert topo.standby is not None
    for ns in (topo.fw, topo.standby):
        _strict_firewall(ns)
    return topo


@pytest.fixture
def connections(topology: Topology) -> Iterator[list[Connection]]:
    """The :data:`FLOWS`, connected through the active firewall, one message exchanged."""
    with ExitStack() as stack:
        with entered(topology.server.name):
            listener = stack.enter_context(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", ECHO_PORT))
        listener.listen(8)
        listener.settimeout(TIMEOUT)
        made = []
        for name, family, destination in FLOWS:
            with entered(topology.client.name):
                client = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
            client.settimeout(TIMEOUT)
            client.connect(destination)
            server, peer = listener.accept()
            stack.enter_context(server)
            server.settimeout(TIMEOUT)
            made.append(Connection(name, client, server, (_normalise(peer[0]), peer[1])))
        for conn in made:
            # Masquerade: the server sees the firewall's outside (shared) address.
            assert conn.seen_from[0] in (FW_WAN.v4, FW_WAN.v6), conn
            conn.exchange()
        yield made


@pytest.fixture
def datagrams(topology: Topology) -> Iterator[list[Datagrams]]:
    """The :data:`UDP_FLOWS` through the active firewall, one datagram exchanged."""
    with ExitStack() as stack:
        servers = {}
        for port in (UDP_PORT, ZONE_PORT, LABEL_PORT):
            with entered(topology.server.name):
                server = stack.enter_context(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            server.bind(("::", port))
            server.settimeout(TIMEOUT)
            servers[port] = server
        made = []
        for name, family, destination in UDP_FLOWS:
            with entered(topology.client.name):
                client = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
            client.settimeout(TIMEOUT)
            client.connect(destination)
            made.append(Datagrams(name, client, servers[destination[1]]))
        for flow in made:
            flow.exchange()
        yield made


def _dump(ns: Netns) -> list[Entry]:
    return trio.run(dump, ns.name)


def test_injected_flows_keep_working_through_the_standby(
        topology: Topology, connections: list[Connection], datagrams: list[Datagrams]) -> None:
    assert topology.standby is not None
    flows: list[Connection | Datagrams] = [*connections, *datagrams]
    for flow in flows:
        flow.exchange()
    entries = _dump(topology.fw)
    assert len(entries) >= len(flows)

    with entered(topology.standby.name):
        sock = inject.open_socket()
    with sock:
        result = trio.run(inject.upsert, sock, entries)
    assert result == (len(entries), [])

    topology.failover()
    for _ in range(3):
        for flow in flows:
            flow.exchange()

    # The standby carried the flows with the very NAT mapping the server sees ...
    carried = {_reply_destination(e): e for e in _dump(topology.standby)}
    for conn in connections:
        assert conn.seen_from in carried, conn
    for flow in datagrams:
        assert flow.seen_from is not None
        entry = carried[flow.seen_from]
        assert entry.zone == (ZONE if flow.name.startswith("zone") else 0), flow.name
        if flow.name.startswith("label"):
            assert entry.labels is not None
            assert int.from_bytes(entry.labels, "little") == 1 << LABEL_BIT, flow.name
    # ... and never had to drop a TCP packet nor to start a UDP flow of its own: a UDP
    # entry missed (e.g. in the wrong zone) would have been a new one.
    assert _counted(topology.standby, "invalid") == 0
    assert _counted(topology.standby, "new_udp") == 0


def _reply_destination(entry: Entry) -> tuple[str, int]:
    family = socket.AF_INET if len(entry.reply.dst) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, entry.reply.dst), entry.reply.dport


def test_without_injection_the_standby_drops_the_flows(
        topology: Topology, connections: list[Connection]) -> None:
    assert topology.standby is not None
    topology.failover()
    for conn in connections:
        request = b"req after failover\n"
        conn.client.sendall(request)
        conn.server.settimeout(1.0)
        with pytest.raises(TimeoutError):
            _read(conn.server, len(request))
    # Dropped by the strict ruleset as invalid (mid-stream TCP without an entry).
    assert _counted(topology.standby, "invalid") >= len(connections)

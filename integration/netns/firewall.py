"""A reusable firewall lab: client -- firewall -- server, IPv4 and IPv6, real NAT.

Layout (every box is a namespace of one :class:`~integration.netns.lab.Lab`)::

    client eth0 ── [lan switch br0] ── lan0 fw wan0 ── [wan switch br0] ── eth0 server
                                  └─── lan0 standby wan0 ───┘   (optional, links down)

The switches are bridges that never learn (``ageing_time 0``: they flood like hubs), and
both firewalls use the same addresses *and* MAC addresses, so :meth:`Topology.failover`
(active links down, standby links up) moves the path without the client or the server
noticing anything but the conntrack state the standby has or lacks. That is the
flow-move test's setting; the fidelity tests simply use the active firewall.

The firewall ruleset (:data:`RULESET`, loaded identically on both firewalls) exercises
every conntrack feature the replicator must carry:

* masquerade (IPv4 and IPv6) of everything leaving ``wan0``: SNAT on every flow;
* a DNAT port forward: ``FW_LAN:FORWARD_PORT`` -> ``SERVER:ECHO_PORT`` (TCP, v4 and v6);
* ``ct mark`` :data:`MARK` on TCP to :data:`MARK_PORT`;
* ``ct label`` bit :data:`LABEL_BIT` on UDP to :data:`LABEL_PORT` (labels only stick in a
  namespace whose ruleset uses ``ct label``: the standby needs the same ruleset);
* ``ct zone`` :data:`ZONE` for UDP :data:`ZONE_PORT` in both directions.

Traffic comes from ``flowagent.py`` run inside the namespaces: :meth:`Topology.start_server`
starts the echo servers, :meth:`Topology.open_flows` a client holding real TCP/UDP flows,
:meth:`Topology.ping` makes ICMP entries. :func:`conntrack` runs conntrack-tools with a
label map, so that the reference listing shows labels too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from integration.netns.lab import Lab, Netns, run


@dataclass(frozen=True)
class Addr:
    """An interface's IPv4 and IPv6 address."""

    v4: str
    v6: str

    def of(self, family: int) -> str:
        """The address for ``family`` (4 or 6)."""
        return self.v4 if family == 4 else self.v6


CLIENT = Addr("10.0.1.2", "fd00:1::2")
FW_LAN = Addr("10.0.1.1", "fd00:1::1")
FW_WAN = Addr("10.0.2.1", "fd00:2::1")
SERVER = Addr("10.0.2.2", "fd00:2::2")
#: Same MACs on both firewalls, so a failover needs no neighbour update.
FW_LAN_MAC = "02:52:50:00:01:01"
FW_WAN_MAC = "02:52:50:00:02:01"

ECHO_PORT = 80  # TCP echo on the server; plain masqueraded flow
FORWARD_PORT = 8080  # TCP on the firewall's LAN address, DNATed to SERVER:ECHO_PORT
MARK_PORT = 5001  # TCP; entries get ct mark MARK
MARK = 0x2A
LABEL_PORT = 5002  # UDP; entries get ct label bit LABEL_BIT
LABEL_BIT = 7
ZONE_PORT = 5003  # UDP; entries live in ct zone ZONE
ZONE = 3
UDP_PORT = 5004  # UDP echo; plain masqueraded flow

TCP_PORTS = (ECHO_PORT, MARK_PORT)
UDP_PORTS = (LABEL_PORT, ZONE_PORT, UDP_PORT)

RULESET = f"""
table inet replicator_lab {{
    chain zones {{
        type filter hook prerouting priority raw;
        # Both directions: a reply must be looked up in the zone of its entry.
        udp dport {ZONE_PORT} ct zone set {ZONE}
        udp sport {ZONE_PORT} ct zone set {ZONE}
    }}
    chain port_forward {{
        type nat hook prerouting priority dstnat;
        ip daddr {FW_LAN.v4} tcp dport {FORWARD_PORT} dnat ip to {SERVER.v4}:{ECHO_PORT}
        ip6 daddr {FW_LAN.v6} tcp dport {FORWARD_PORT} dnat ip6 to [{SERVER.v6}]:{ECHO_PORT}
    }}
    chain forward_filter {{
        type filter hook forward priority filter;
        tcp dport {MARK_PORT} ct mark set {MARK:#x}
        udp dport {LABEL_PORT} ct label set {LABEL_BIT}
    }}
    chain masq {{
        type nat hook postrouting priority srcnat;
        oifname "wan0" masquerade
    }}
}}
"""

AGENT = Path(__file__).with_name("flowagent.py")


def load_ruleset(ns: Netns) -> None:
    """Load :data:`RULESET` into ``ns`` (the active and the standby firewall get the same)."""
    ns.nft(RULESET)


#: Names every label bit by its number, so :func:`conntrack` prints ``labels=7,9``: the
#: form :mod:`replicator.ctformat` formats and parses.
LABEL_MAP = "".join(f"{bit} {bit}\n" for bit in range(128))


def conntrack(ns: Netns, args: Sequence[str]) -> str:
    """Run conntrack-tools' ``conntrack`` with ``args`` in ``ns``; its stdout.

    ``conntrack`` prints labels only by name, from ``/etc/xtables/connlabel.conf``. So
    that ``-o extended,labels`` shows every label without touching the host's ``/etc``,
    the command runs in a private mount namespace where a read-only overlay adds
    :data:`LABEL_MAP` to ``/etc``.
    """
    with tempfile.TemporaryDirectory(prefix="rp-labels-") as tmp:
        (Path(tmp) / "xtables").mkdir()
        (Path(tmp) / "xtables" / "connlabel.conf").write_text(LABEL_MAP)
        script = ('mount -t overlay overlay -o "lowerdir=$1:/etc" /etc; shift; '
                  'exec ip netns exec "$@"')
        return run(["unshare", "--mount", "sh", "-ec", script, "sh", tmp, ns.name,
                    "conntrack", *args]).stdout


def _switch(lab: Lab, role: str) -> Netns:
    ns = lab.netns(role)
    ns.run(["ip", "link", "add", "br0", "type", "bridge", "ageing_time", "0"])
    ns.run(["ip", "link", "set", "br0", "up"])
    return ns


def _plug(lab: Lab, ns: Netns, ifname: str, switch: Netns, port: str) -> None:
    lab.veth(ns, ifname, switch, port)
    switch.run(["ip", "link", "set", port, "master", "br0"])


def _address(ns: Netns, ifname: str, addr: Addr, prefix6: int = 64) -> None:
    # nodad: the address is usable at once (and the standby's duplicate is intended).
    ns.run(["ip", "addr", "add", f"{addr.v4}/24", "dev", ifname])
    ns.run(["ip", "-6", "addr", "add", f"{addr.v6}/{prefix6}", "dev", ifname, "nodad"])


def _host(lab: Lab, role: str, switch: Netns, addr: Addr, gateway: Addr) -> Netns:
    ns = lab.netns(role)
    _plug(lab, ns, "eth0", switch, f"{role}0")
    _address(ns, "eth0", addr)
    ns.run(["ip", "route", "add", "default", "via", gateway.v4])
    ns.run(["ip", "-6", "route", "add", "default", "via", gateway.v6])
    return ns


def _firewall(lab: Lab, role: str, lan: Netns, wan: Netns, *, up: bool) -> Netns:
    ns = lab.netns(role)
    ns.sysctl("net.ipv4.ip_forward", 1)
    ns.sysctl("net.ipv6.conf.all.forwarding", 1)
    # Keep the static IPv6 addresses while the standby's links are down.
    ns.sysctl("net.ipv6.conf.default.keep_addr_on_down", 1)
    for ifname, switch, addr, mac in (("lan0", lan, FW_LAN, FW_LAN_MAC),
                                      ("wan0", wan, FW_WAN, FW_WAN_MAC)):
        _plug(lab, ns, ifname, switch, f"{role}-{ifname[:3]}")
        ns.sysctl(f"net.ipv6.conf.{ifname}.keep_addr_on_down", 1)
        ns.run(["ip", "link", "set", ifname, "address", mac])
        _address(ns, ifname, addr)
        if not up:
            ns.run(["ip", "link", "set", ifname, "down"])
    load_ruleset(ns)
    return ns


class Flows:
    """A client process holding real flows open (see ``flowagent.py``)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        ready = self._reply()
        #: One ``[proto, dst, dport, local_port]`` per flow, in the order opened.
        self.flows: list[list[Any]] = ready["ready"]

    def _reply(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"flow agent died (exit {self._proc.wait()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _command(self, command: str) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def check(self) -> list[bool]:
        """Send one byte on every flow; whether each came back (2 s timeout each)."""
        result: list[bool] = self._command("check")["check"]
        return result

    def close(self) -> None:
        """Close every flow (TCP sends FIN) and end the agent."""
        self._command("close")
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=10)


@dataclass
class Topology:
    """The namespaces of one firewall lab (build it with :func:`build`)."""

    lab: Lab
    client: Netns
    fw: Netns
    server: Netns
    lan: Netns
    wan: Netns
    standby: Netns | None = None

    def _spawn(self, ns: Netns, args: list[str]) -> subprocess.Popen[str]:
        # Text pipes; the lab kills the agent on teardown.
        proc = self.lab.spawn(ns, [sys.executable, str(AGENT), *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return cast("subprocess.Popen[str]", proc)

    def start_server(self) -> None:
        """Start the echo servers on :data:`TCP_PORTS` and :data:`UDP_PORTS`."""
        proc = self._spawn(
            self.server,
            ["serve", "--tcp", ",".join(map(str, TCP_PORTS)),
             "--udp", ",".join(map(str, UDP_PORTS))],
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("echo server did not start")

    def open_flows(self, specs: Sequence[tuple[str, str, int]]) -> Flows:
        """Open ``(proto, dst, dport)`` flows from the client and hold them open."""
        args = ["client", *(f"{proto},{dst},{port}" for proto, dst, port in specs)]
        return Flows(self._spawn(self.client, args))

    def ping(self, family: int, dst: str | None = None, count: int = 1) -> None:
        """Ping ``dst`` (default: the server) from the client; an ICMP/ICMPv6 entry."""
        target = dst or SERVER.of(family)
        self.client.run(["ping", f"-{family}", "-c", str(count), "-W", "2", "-i", "0.2",
                         target])

    def failover(self) -> None:
        """Take the active firewall's links down and bring the standby's up."""
        if self.standby is None:
            raise RuntimeError("topology built without a standby")
        for ifname in ("lan0", "wan0"):
            self.fw.run(["ip", "link", "set", ifname, "down"])
        for ifname in ("lan0", "wan0"):
            self.standby.run(["ip", "link", "set", ifname, "up"])


def standard_flows() -> list[tuple[str, str, int]]:
    """One flow of every kind the ruleset treats specially, for IPv4 and IPv6."""
    specs: list[tuple[str, str, int]] = []
    for family in (4, 6):
        server = SERVER.of(family)
        specs += [
            ("tcp", server, ECHO_PORT),  # masquerade
            ("tcp", FW_LAN.of(family), FORWARD_PORT),  # DNAT + masquerade
            ("tcp", server, MARK_PORT),  # ct mark
            ("udp", server, LABEL_PORT),  # ct label
            ("udp", server, ZONE_PORT),  # ct zone
            ("udp", server, UDP_PORT),  # plain UDP
        ]
    return specs


def build(lab: Lab, *, standby: bool = False) -> Topology:
    """Create the topology in ``lab``; with ``standby``, a second firewall, links down."""
    lan = _switch(lab, "lan")
    wan = _switch(lab, "wan")
    client = _host(lab, "client", lan, CLIENT, FW_LAN)
    server = _host(lab, "server", wan, SERVER, FW_WAN)
    fw = _firewall(lab, "fw", lan, wan, up=True)
    spare = _firewall(lab, "standby", lan, wan, up=False) if standby else None
    return Topology(lab, client, fw, server, lan, wan, spare)

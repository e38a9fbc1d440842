"""Namespaces, links and addresses of the failover lab.

::

    client ──┐                         ┌── server
             │ lan bridge (ns "lan")   │ wan bridge (ns "wan")
      ┌──────┴──────┐           ┌──────┴──────┐
     lan0          lan0        wan0          wan0
    [fw a] ─sync0──────sync0─ [fw b]   (a: lan0/wan0, b: lan0/wan0)

Every firewall has an inside leg ``lan0`` on the LAN bridge, an outside leg ``wan0``
on the WAN bridge and a dedicated sync link ``sync0`` (a plain veth) to its peer.
The VIPs are not configured here: keepalived adds and moves them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from integration.netns.lab import Lab, Netns, lab

LAN_IF = "lan0"
WAN_IF = "wan0"
SYNC_IF = "sync0"
HOST_IF = "eth0"


@dataclass(frozen=True)
class AddressPlan:
    """Every address and port of the lab (lab-namespace addresses only)."""

    lan_prefix: int = 24
    inside_vip: str = "10.99.1.1"
    lan_a: str = "10.99.1.2"
    lan_b: str = "10.99.1.3"
    client: str = "10.99.1.10"
    wan_prefix: int = 24
    outside_vip: str = "10.99.2.1"
    wan_a: str = "10.99.2.2"
    wan_b: str = "10.99.2.3"
    server: str = "10.99.2.100"
    sync_prefix: int = 30
    sync_a: str = "10.99.3.1"
    sync_b: str = "10.99.3.2"
    #: The server's TCP and UDP echo ports (reached from the LAN through SNAT).
    server_tcp_port: int = 7000
    server_udp_port: int = 7001
    #: The outside VIP's forwarded port and the client port it is forwarded to.
    forward_port: int = 8080
    client_tcp_port: int = 8080


@dataclass(frozen=True)
class Firewall:
    """One member of the HA pair."""

    name: str
    ns: Netns
    priority: int
    lan_addr: str
    wan_addr: str
    sync_addr: str
    peer_sync_addr: str
    #: Private directory for this node's configs, pid files and logs.
    workdir: Path


@dataclass(frozen=True)
class HaLab:
    """The built topology (no daemons running yet)."""

    lab: Lab
    plan: AddressPlan
    fw_a: Firewall
    fw_b: Firewall
    client: Netns
    server: Netns
    workdir: Path

    @property
    def firewalls(self) -> tuple[Firewall, Firewall]:
        """Both firewalls, preferred master first."""
        return (self.fw_a, self.fw_b)

    def firewall(self, name: str) -> Firewall:
        """The firewall called ``name`` (``"a"`` or ``"b"``)."""
        for fw in self.firewalls:
            if fw.name == name:
                return fw
        raise KeyError(name)

    def peer(self, fw: Firewall) -> Firewall:
        """The other member of the pair."""
        return self.fw_b if fw is self.fw_a else self.fw_a


def _quiet(ns: Netns) -> None:
    # IPv6 autoconfiguration and DAD only add noise (and multicast) to the measurements.
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", 1)
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", 1)


def _host(the_lab: Lab, switch: Netns, role: str, *, addr: str, prefix: int,
          gateway: str | None) -> Netns:
    ns = the_lab.netns(role)
    _quiet(ns)
    the_lab.veth(ns, HOST_IF, switch, role)
    ns.run(["ip", "addr", "add", f"{addr}/{prefix}", "dev", HOST_IF])
    # A VIP moves to another MAC: let a gratuitous ARP override the cached entry at once
    # (the default locktime ignores overrides for a second after an update).
    ns.sysctl(f"net.ipv4.neigh.{HOST_IF}.locktime", 0)
    if gateway is not None:
        ns.run(["ip", "route", "add", "default", "via", gateway])
    return ns


def build(the_lab: Lab, workdir: Path, plan: AddressPlan | None = None) -> HaLab:
    """Create the namespaces, bridges and links of the lab inside ``the_lab``."""
    plan = plan or AddressPlan()
    lan = the_lab.netns("lan")
    wan = the_lab.netns("wan")
    _quiet(lan)
    _quiet(wan)
    fws: list[Firewall] = []
    for name, prio, lan_addr, wan_addr, sync_addr, peer_sync in (
        ("a", 150, plan.lan_a, plan.wan_a, plan.sync_a, plan.sync_b),
        ("b", 100, plan.lan_b, plan.wan_b, plan.sync_b, plan.sync_a),
    ):
        ns = the_lab.netns(f"fw{name}")
        _quiet(ns)
        the_lab.veth(ns, LAN_IF, lan, f"fw{name}")
        the_lab.veth(ns, WAN_IF, wan, f"fw{name}")
        ns.run(["ip", "addr", "add", f"{lan_addr}/{plan.lan_prefix}", "dev", LAN_IF])
        ns.run(["ip", "addr", "add", f"{wan_addr}/{plan.wan_prefix}", "dev", WAN_IF])
        node_dir = workdir / f"fw{name}"
        node_dir.mkdir()
        fws.append(Firewall(name, ns, prio, lan_addr, wan_addr, sync_addr, peer_sync, node_dir))
    fw_a, fw_b = fws
    the_lab.veth(fw_a.ns, SYNC_IF, fw_b.ns, SYNC_IF)
    for fw in fws:
        fw.ns.run(["ip", "addr", "add", f"{fw.sync_addr}/{plan.sync_prefix}", "dev", SYNC_IF])
    client = _host(the_lab, lan, "client", addr=plan.client, prefix=plan.lan_prefix,
                   gateway=plan.inside_vip)
    # The server needs no route: it answers the outside VIP, which is on its link.
    server = _host(the_lab, wan, "server", addr=plan.server, prefix=plan.wan_prefix,
                   gateway=None)
    the_lab.bridge(lan, "br0", ["fwa", "fwb", "client"])
    the_lab.bridge(wan, "br0", ["fwa", "fwb", "server"])
    return HaLab(the_lab, plan, fw_a, fw_b, client, server, workdir)


@contextmanager
def ha_lab(tag: str = "ha", plan: AddressPlan | None = None) -> Iterator[HaLab]:
    """Build the lab; on exit every process, namespace and file of it is gone."""
    with lab(tag) as the_lab, tempfile.TemporaryDirectory(prefix=f"{the_lab.prefix}-") as tmp:
        yield build(the_lab, Path(tmp), plan)

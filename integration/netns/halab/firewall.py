"""The strictly stateful ruleset both firewalls run, and their sysctls.

Strict on purpose: forwarded traffic is accepted only as part of a known connection or
as a fresh TCP SYN (from the LAN, or from the WAN through the one DNAT port forward),
``nf_conntrack_tcp_loose=0`` stops conntrack from picking up mid-stream TCP, and invalid
packets are dropped and counted. A firewall that lacks a connection's conntrack entry
therefore drops that connection's packets: only replication can keep it alive.
"""

from __future__ import annotations

import json

from integration.netns.halab.topology import LAN_IF, SYNC_IF, WAN_IF, AddressPlan, Firewall

TABLE = "halab"
#: Named counters the drill reads: packets dropped as invalid (forward and input hooks)
#: and forwarded packets refused by policy (not established, not an allowed new flow).
COUNTERS = ("invalid_forward", "invalid_input", "refused_forward")


def ruleset(plan: AddressPlan) -> str:
    """The nftables ruleset (identical on both firewalls)."""
    syn_only = "tcp flags & (fin|syn|rst|ack) == syn"
    return f"""\
table inet {TABLE} {{
    counter invalid_forward {{ }}
    counter invalid_input {{ }}
    counter refused_forward {{ }}

    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        ct state invalid counter name "invalid_input" drop
        ct state established,related accept
        ip protocol 112 accept comment "VRRP"
        iifname "{SYNC_IF}" accept comment "state replication"
        icmp type echo-request accept
    }}

    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state invalid counter name "invalid_forward" drop
        ct state established,related accept
        iifname "{LAN_IF}" oifname "{WAN_IF}" {syn_only} ct state new accept
        iifname "{LAN_IF}" oifname "{WAN_IF}" meta l4proto {{ udp, icmp }} ct state new accept
        iifname "{WAN_IF}" oifname "{LAN_IF}" ct status dnat {syn_only} ct state new accept
        counter name "refused_forward"
    }}

    chain prerouting {{
        type nat hook prerouting priority dstnat;
        iifname "{WAN_IF}" ip daddr {plan.outside_vip} tcp dport {plan.forward_port} \
dnat ip to {plan.client}:{plan.client_tcp_port}
    }}

    # Forwarded LAN traffic only: the firewall's own packets (VRRP adverts, replication)
    # keep their source address.
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        iifname "{LAN_IF}" oifname "{WAN_IF}" snat ip to {plan.outside_vip}
    }}
}}
"""


def configure(fw: Firewall, plan: AddressPlan) -> None:
    """Load the ruleset and set the forwarding and conntrack sysctls on ``fw``."""
    fw.ns.sysctl("net.ipv4.ip_forward", 1)
    # The ruleset uses conntrack, so loading it first makes the nf_conntrack sysctls exist.
    fw.ns.nft(ruleset(plan))
    fw.ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", 0)
    # Report every entry to listeners, including ones created before they subscribed.
    fw.ns.sysctl("net.netfilter.nf_conntrack_events", 1)


def counters(fw: Firewall) -> dict[str, int]:
    """Packet counts of the ruleset's named counters on ``fw``."""
    out = fw.ns.run(["nft", "-j", "list", "counters", "table", "inet", TABLE]).stdout
    found: dict[str, int] = {}
    for item in json.loads(out)["nftables"]:
        counter = item.get("counter")
        if counter is not None and counter["name"] in COUNTERS:
            found[counter["name"]] = int(counter["packets"])
    return found


def conntrack_count(fw: Firewall) -> int:
    """How many conntrack entries ``fw``'s namespace holds."""
    return int(fw.ns.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"]).stdout)

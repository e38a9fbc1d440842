"""Two real daemons over a real sync link: the standby's copy equals the active's table.

The lab (:func:`integration.netns.pair.firewall_pair`): client -- fw -- server with real
NAT'd TCP/UDP flows through ``fw`` (masquerade, DNAT, ct mark, ct label, ct zone; IPv4
and IPv6), a standby firewall with the same ruleset, and a dedicated veth ``sync0``
between the two firewalls. On top
of the real flows, synthetic entries are written into ``fw``'s table with the batched
injector for volume (the daemon sees them as ordinary kernel events).

After each disturbance, the standby's external cache (and, in ``hot`` mode, its kernel
table) must equal the active's kernel table as conntrack-tools lists it, entry by entry
(every field ``conntrack -L -o extended,labels`` shows; the timeout within the bounds
the protocol allows, see :func:`~integration.netns.pair.timeout_ok`). The time each case
took to converge is printed (``pytest -s``):

(a) steady traffic; (b) 5 % loss on the sync link, both directions; (c) the sync link
down for 10 s while flows start and end and synthetic entries come and go, then up;
(d) the standby daemon SIGKILLed, the table changed, the daemon restarted; (e) the same
for the active daemon. Finally a third node with an unpinned key dials the standby's
sync port: it is refused, counted, and nothing it holds reaches the standby.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from integration.netns import firewall
from integration.netns import pair as P
from integration.netns.firewall import Flows
from integration.netns.lab import Lab
from integration.netns.nodes import DaemonNode, NodeSpec, wait_for
from replicator.model import Status, dnat_target, snat_target

OUTAGE = 10.0
AUTH_FAILURES = "replicator_auth_failures_total"
#: Generous: the host is shared by many jobs. The printed times are the measurement.
CONVERGE = 60.0


def assert_realistic(table: P.Table) -> None:
    """The compared table holds what makes the comparison meaningful: NAT both ways,
    a mark, a label and a zone from real packets, and the synthetic entries."""
    entries = list(table.values())
    assert any(snat_target(e) for e in entries), "no masqueraded entry"
    assert any(dnat_target(e) for e in entries), "no DNAT entry"
    assert any(e.mark == firewall.MARK for e in entries), "no marked entry"
    assert any(e.labels for e in entries), "no labelled entry"
    assert any(e.zone == firewall.ZONE for e in entries), "no zoned entry"
    assert any(e.orig.dst == P.SYNTH_SERVER for e in entries), "no synthetic entry"
    assert any(e.status & Status.ASSURED for e in entries), "no assured entry"


def settle(pair: P.FirewallPair, case: str, since: float) -> None:
    """Wait until the standby's external cache, then (``hot`` mode) also its kernel,
    equals the active's table; print each time from ``since`` (a ``time.monotonic()``
    reading: the start of the case's recovery)."""
    mode = pair.standby.spec.mode
    P.converge(pair, CONVERGE, f"{mode} {case} (external cache)", kernel=False, since=since)
    if mode == "hot":
        P.converge(pair, CONVERGE, f"{mode} {case} (kernel)", kernel=True, since=since)


def start_traffic(pair: P.FirewallPair) -> Flows:
    pair.topo.start_server()
    return pair.topo.open_flows(firewall.standard_flows())


@pytest.mark.parametrize("mode", ["cache", "hot"])
def test_standby_copy_equals_the_active_table(netlab: Lab, tmp_path: Path, mode: str) -> None:
    pair = P.firewall_pair(netlab, tmp_path, mode=mode)
    writer = P.Writer(pair.active.ns)

    # (a) steady: real flows and 1000 synthetic entries.
    t = time.monotonic()
    flows = start_traffic(pair)
    writer.upsert(P.synthetic(0, 1000))
    assert all(flows.check())
    assert_realistic(pair.kernel(pair.active))
    settle(pair, "a steady traffic", t)

    # (b) 5 % loss on the sync link (both directions) while the table changes.
    for node in pair.nodes:
        pair.sync_loss(node.ns, 5)
    t = time.monotonic()
    writer.upsert(P.synthetic(1000, 2000))
    writer.delete(P.synthetic(0, 500))
    more = pair.topo.open_flows(firewall.standard_flows()[:6])
    settle(pair, "b 5% loss", t)
    for node in pair.nodes:
        pair.no_sync_loss(node.ns)

    # (c) the sync link down for 10 s while flows start and end.
    down = time.monotonic()
    pair.sync_link(up=False)
    flows.close()
    flows = pair.topo.open_flows(firewall.standard_flows())
    writer.upsert(P.synthetic(3000, 1000))
    writer.delete(P.synthetic(500, 500))
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))
    t = time.monotonic()
    pair.sync_link(up=True)
    settle(pair, "c link down 10 s, then up", t)

    # (d) the standby daemon killed and restarted; the active's table changed meanwhile.
    t = time.monotonic()
    pair.standby.kill()
    more.close()
    writer.upsert(P.synthetic(4000, 500))
    writer.delete(P.synthetic(1000, 500))
    pair.start_node(pair.standby)
    settle(pair, "d standby daemon SIGKILL + restart", t)

    # (e) the active daemon killed and restarted; its table changed meanwhile.
    t = time.monotonic()
    pair.active.kill()
    flows.close()
    flows = pair.topo.open_flows(firewall.standard_flows()[6:])
    writer.upsert(P.synthetic(4500, 500))
    writer.delete(P.synthetic(1500, 500))
    pair.start_node(pair.active)
    settle(pair, "e active daemon SIGKILL + restart", t)
    assert all(flows.check())
    flows.close()


def test_a_peer_with_an_unpinned_key_is_refused(netlab: Lab, tmp_path: Path) -> None:
    pair = P.firewall_pair(netlab, tmp_path, mode="hot", metrics_port=9790)
    sby = pair.standby
    P.Writer(pair.active.ns).upsert(P.synthetic(0, 200))
    settle(pair, "steady before the intruder", time.monotonic())
    external, kernel = pair.external(sby), pair.kernel(sby)
    before = refusals(sby)
    metric_before = P.metric(sby, AUTH_FAILURES)

    # The intruder claims to be node "a" with a key of its own, pins the standby's real
    # certificate, holds a table of its own, and dials the standby's sync address.
    mallory_ns = netlab.netns("mallory")
    netlab.veth(mallory_ns, "evil0", sby.ns, "evil0")
    mallory_ns.run(["ip", "addr", "add", "10.0.8.1/30", "dev", "evil0"])
    sby.ns.run(["ip", "addr", "add", "10.0.8.2/30", "dev", "evil0"])
    mallory_ns.run(["ip", "route", "add", f"{P.SYNC_B}/32", "via", "10.0.8.2"])
    evil = tmp_path / "mallory"
    evil.mkdir()
    shutil.copy(tmp_path / "b.crt", evil / "b.crt")
    spec = NodeSpec("a", "b", "10.0.8.1", P.SYNC_B, mode="hot", port=P.PORT)
    mallory = DaemonNode(netlab, mallory_ns, spec, evil)
    P.Writer(mallory_ns).upsert(P.synthetic(9000, 100))
    mallory.start()
    mallory.notify("MASTER")

    wait_for(lambda: refusals(sby) >= before + 2, 30, "the standby to refuse twice")
    assert not mallory.status()["peer_up"]
    assert sby.status()["peer_up"], "the real peer's link must stay up"
    assert pair.differences(external, pair.external(sby)) == []
    assert pair.differences(kernel, pair.kernel(sby)) == []
    # The exported counters follow the link's on the daemon's periodic gauge update.
    wait_for(lambda: P.metric(sby, AUTH_FAILURES) >= metric_before + 2, 30,
             f"{AUTH_FAILURES} to count the refusals")
    stats = sby.cli("stats")
    print("standby refusals:", {k: v for k, v in stats.items() if "refused" in k})


def refusals(node: DaemonNode) -> float:
    """Incoming connections ``node`` refused (``replicator stats``: link_refused_*)."""
    stats: dict[str, float] = node.cli("stats")
    return sum(v for k, v in stats.items() if k.startswith("link_refused_"))

"""Two real daemons over a real sync link: the standby's copy equals the active's table.

The lab (``syncpair.py``): client -- fw -- server with real NAT'd TCP/UDP flows through
``fw`` (masquerade, DNAT, ct mark, ct label, ct zone; IPv4 and IPv6), a standby firewall
with the same ruleset, and a dedicated veth ``sync0`` between the two firewalls. On top
of the real flows, synthetic entries are written into ``fw``'s table with the batched
injector for volume (the daemon sees them as ordinary kernel events).

After each disturbance, the standby's external cache (and, in ``hot`` mode, its kernel
table) must equal the active's kernel table as conntrack-tools lists it, entry by entry
(every field ``conntrack -L -o extended,labels`` shows; the timeout within the bounds
the protocol allows, see :func:`syncpair.timeout_ok`). The time each case took to
converge is printed (``pytest -s``):

(a) steady traffic; (b) 5 % loss on the sync link, both directions; (c) the sync link
down for 10 s while flows start and end and synthetic entries come and go, then up;
(d) the standby daemon SIGKILLed, the table changed, the daemon restarted; (e) the same
for the active daemon. Finally a third node with an unpinned key dials the standby's
sync port: it is refused, counted, and nothing it holds reaches the standby.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.netns import firewall, syncpair
from integration.netns.firewall import Flows
from integration.netns.lab import Lab
from integration.netns.nodes import DaemonNode, NodeSpec, wait_for
from integration.netns.syncpair import SyncPair, Table, report, synthetic
from replicator.model import Status, dnat_target, snat_target

OUTAGE = 10.0
AUTH_FAILURES = "replicator_auth_failures_total"
#: Generous: the host is shared by many jobs. The printed times are the measurement.
CONVERGE = 60.0


def assert_realistic(table: Table) -> None:
    """The compared table holds what makes the comparison meaningful: NAT both ways,
    a mark, a label and a zone from real packets, and the synthetic entries."""
    entries = list(table.values())
    assert any(snat_target(e) for e in entries), "no masqueraded entry"
    assert any(dnat_target(e) for e in entries), "no DNAT entry"
    assert any(e.mark == firewall.MARK for e in entries), "no marked entry"
    assert any(e.labels for e in entries), "no labelled entry"
    assert any(e.zone == firewall.ZONE for e in entries), "no zoned entry"
    assert any(e.orig.dst == syncpair.SYNTH_SERVER for e in entries), "no synthetic entry"
    assert any(e.status & Status.ASSURED for e in entries), "no assured entry"


class Run:
    """One mode's scenario: what to compare, and the report of each case."""

    def __init__(self, pair: SyncPair, mode: str) -> None:
        self.pair, self.mode = pair, mode
        self.compare: list[tuple[str, Callable[[float, str], float]]] = [
            ("external cache", pair.converge_external)]
        if mode == "hot":
            self.compare.append(("kernel", pair.converge_kernel))

    def settle(self, case: str, since: float) -> None:
        """Wait for every compared table to equal the active's; report the time from
        ``since`` (a ``time.monotonic()`` reading: the start of the case's recovery)."""
        for name, converge in self.compare:
            converge(CONVERGE, f"{self.mode}: {case} ({name})")
            report(f"{self.mode} {case} ({name})", time.monotonic() - since)


def start_traffic(pair: SyncPair) -> Flows:
    pair.topo.start_server()
    return pair.topo.open_flows(firewall.standard_flows())


@pytest.mark.parametrize("mode", ["cache", "hot"])
def test_standby_copy_equals_the_active_table(netlab: Lab, tmp_path: Path, mode: str) -> None:
    pair = syncpair.build_pair(netlab, tmp_path, mode=mode)
    run = Run(pair, mode)
    active = pair.active

    # (a) steady: real flows and 1000 synthetic entries.
    t = time.monotonic()
    flows = start_traffic(pair)
    syncpair.inject(active, synthetic(1000))
    assert all(flows.check())
    assert_realistic(pair.active_table())
    run.settle("a steady traffic", t)

    # (b) 5 % loss on the sync link (both directions) while the table changes.
    for ns in (pair.active, pair.standby):
        pair.sync_loss(ns, 5)
    t = time.monotonic()
    syncpair.inject(active, synthetic(2000, 1000))
    syncpair.remove(active, synthetic(500, 0))
    more = pair.topo.open_flows(firewall.standard_flows()[:6])
    run.settle("b 5% loss", t)
    for ns in (pair.active, pair.standby):
        pair.no_sync_loss(ns)

    # (c) the sync link down for 10 s while flows start and end.
    down = time.monotonic()
    pair.sync_link(up=False)
    flows.close()
    flows = pair.topo.open_flows(firewall.standard_flows())
    syncpair.inject(active, synthetic(1000, 3000))
    syncpair.remove(active, synthetic(500, 500))
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))
    t = time.monotonic()
    pair.sync_link(up=True)
    run.settle("c link down 10 s, then up", t)

    # (d) the standby daemon killed and restarted; the active's table changed meanwhile.
    t = time.monotonic()
    pair.b.kill()
    more.close()
    syncpair.inject(active, synthetic(500, 4000))
    syncpair.remove(active, synthetic(500, 1000))
    pair.start(pair.b, "BACKUP")
    run.settle("d standby daemon SIGKILL + restart", t)

    # (e) the active daemon killed and restarted; its table changed meanwhile.
    t = time.monotonic()
    pair.a.kill()
    flows.close()
    flows = pair.topo.open_flows(firewall.standard_flows()[6:])
    syncpair.inject(active, synthetic(500, 4500))
    syncpair.remove(active, synthetic(500, 1500))
    pair.start(pair.a, "MASTER")
    run.settle("e active daemon SIGKILL + restart", t)
    assert all(flows.check())
    flows.close()


def test_a_peer_with_an_unpinned_key_is_refused(netlab: Lab, tmp_path: Path) -> None:
    pair = syncpair.build_pair(netlab, tmp_path, mode="hot", metrics_port=9790)
    run = Run(pair, "hot")
    syncpair.inject(pair.active, synthetic(200))
    run.settle("steady before the intruder", time.monotonic())
    external, kernel = pair.standby_external(), pair.standby_kernel()
    before = refusals(pair.b)
    metric_before = syncpair.metric(pair.b, AUTH_FAILURES)

    # The intruder claims to be node "a" with a key of its own, pins the standby's real
    # certificate, holds a table of its own, and dials the standby's sync address.
    mallory_ns = netlab.netns("mallory")
    netlab.veth(mallory_ns, "evil0", pair.standby, "evil0")
    mallory_ns.run(["ip", "addr", "add", "10.0.8.1/30", "dev", "evil0"])
    pair.standby.run(["ip", "addr", "add", "10.0.8.2/30", "dev", "evil0"])
    mallory_ns.run(["ip", "route", "add", f"{syncpair.SYNC_B}/32", "via", "10.0.8.2"])
    evil = tmp_path / "mallory"
    evil.mkdir()
    shutil.copy(tmp_path / "b.crt", evil / "b.crt")
    spec = NodeSpec("a", "b", "10.0.8.1", syncpair.SYNC_B, mode="hot", port=syncpair.SYNC_PORT)
    mallory = DaemonNode(netlab, mallory_ns, spec, evil)
    syncpair.inject(mallory_ns, synthetic(100, 9000))
    mallory.start()
    mallory.notify("MASTER")

    wait_for(lambda: refusals(pair.b) >= before + 2, 30, "the standby to refuse twice")
    assert not mallory.status()["peer_up"]
    assert pair.b.status()["peer_up"], "the real peer's link must stay up"
    assert syncpair.differences(external, pair.standby_external(), refresh=pair.refresh) == []
    assert syncpair.differences(kernel, pair.standby_kernel(), refresh=pair.refresh) == []
    # The exported counters follow the link's on the daemon's periodic gauge update.
    wait_for(lambda: syncpair.metric(pair.b, AUTH_FAILURES) >= metric_before + 2, 30,
             f"{AUTH_FAILURES} to count the refusals")
    stats = pair.b.cli("stats")
    print("standby refusals:", {k: v for k, v in stats.items() if "refused" in k})


def refusals(node: DaemonNode) -> float:
    """Incoming connections ``node`` refused (``replicator stats``: link_refused_*)."""
    stats: dict[str, float] = node.cli("stats")
    return sum(v for k, v in stats.items() if k.startswith("link_refused_"))

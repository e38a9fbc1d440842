"""A restarted daemon takes its role from the virtual addresses its namespace holds.

keepalived reports transitions, not states: a daemon restarted while keepalived runs
hears nothing until the next transition. With ``keepalived.virtual_addresses`` set it
reads the kernel's addresses at start instead (:mod:`replicator.viprole`): here no one
tells the daemons their roles, and a restarted hot standby still keeps its kernel equal
to the active's (in ``INIT`` it would not write the peer's changes).
"""

from __future__ import annotations

from pathlib import Path

from integration.netns import pair as P
from integration.netns.lab import Lab
from integration.netns.nodes import DaemonNode, wait_for

#: keepalived's virtual address of the pair's subnet (:data:`~integration.netns.pair.SUBNET`).
VIP = "10.77.0.254"


def roles(pair: P.BridgedPair) -> tuple[str, str]:
    return pair.active.status()["role"], pair.standby.status()["role"]


def start_untold(pair: P.BridgedPair, *nodes: DaemonNode) -> None:
    """(Re)start daemons without telling them their roles, as after a restart."""
    for node in nodes:
        node.stop()
        node.start()
    wait_for(lambda: all(n.status()["peer_up"] for n in pair.nodes), 30, "the sync link")


def test_restarted_daemons_take_their_roles_from_the_virtual_addresses(
        netlab: Lab, tmp_path: Path) -> None:
    extra = {"keepalived": [f'virtual_addresses = ["{VIP}/24"]']}
    pair = P.make_pair(netlab, tmp_path, mode="hot", active_extra=extra,
                       standby_extra=extra, start=False)
    pair.active.ns.run(["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])
    start_untold(pair, *pair.nodes)
    wait_for(lambda: roles(pair) == ("MASTER", "BACKUP"), 10, "roles from the addresses")
    writer = P.Writer(pair.active.ns)
    writer.upsert(P.synthetic(pair.take_entries(300), 300))
    P.converge(pair, 60, "entries made on the active")
    # The standby's daemon restarts: no one tells it it is the backup.
    start_untold(pair, pair.standby)
    wait_for(lambda: roles(pair) == ("MASTER", "BACKUP"), 10, "the restarted standby's role")
    first = pair.take_entries(300)
    writer.upsert(P.synthetic(first, 300))
    writer.delete(P.synthetic(first, 100))
    P.converge(pair, 60, "changes after the standby's restart")
    assert "role taken from the virtual addresses" in pair.standby.log.read_text()
    # The address moves (keepalived's failover) and both daemons restart.
    pair.active.ns.run(["ip", "addr", "del", f"{VIP}/24", "dev", "eth0"])
    pair.standby.ns.run(["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])
    start_untold(pair, *pair.nodes)
    wait_for(lambda: roles(pair) == ("BACKUP", "MASTER"), 10, "roles after the move")

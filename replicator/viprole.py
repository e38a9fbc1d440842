"""The role a (re)started daemon reads from the virtual addresses its node holds.

keepalived reports transitions, not states: a daemon restarted while keepalived runs
hears nothing until keepalived's next transition and stays in ``INIT`` meanwhile (a
restarted hot standby does not write the peer's changes into its kernel then, a
restarted master does not count as one). The operator's cure is to look at which node
holds the virtual addresses and say so (runbook, section 10). With
``keepalived.virtual_addresses`` set, the daemon does that look itself, once, when it
starts: every virtual address held means ``MASTER`` (keepalived adds them on becoming
master and removes them on leaving that state), none means ``BACKUP``, some but not all
means a transition under way (its notify line follows) or a configuration that does not
match keepalived's, and the role stays ``INIT``. What is found goes through the role
machine as a notify line (the same plans); any line keepalived sends afterwards takes
over from it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection

from .errors import KernelError
from .netns import entered
from .role import VrrpState

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def role_from_addresses(virtual: Collection[IPAddress], held: Collection[IPAddress]
                        ) -> VrrpState | None:
    """``MASTER`` if every address of ``virtual`` is in ``held``, ``BACKUP`` if none is,
    else None (undecided). ``virtual`` must not be empty."""
    if not virtual:
        raise ValueError("no virtual addresses to look for")
    present = sum(1 for address in virtual if address in held)
    if present == len(virtual):
        return VrrpState.MASTER
    if present == 0:
        return VrrpState.BACKUP
    return None


def held_addresses(netns: str | None) -> set[IPAddress]:
    """Every address configured on an interface of ``netns`` (None: this namespace).

    Blocking (an rtnetlink dump through pyroute2): call it from a worker thread.
    Raises :class:`~replicator.errors.KernelError` if the kernel refuses, OSError if no
    socket can be made, :class:`~replicator.errors.ReplicatorError` if the namespace
    cannot be entered.
    """
    # Imported here: pyroute2 costs a daemon ≈ 9 MB of RSS and 0.15-0.25 s of start-up,
    # for one read at start, and only with ``keepalived.virtual_addresses`` set.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with entered(netns):
        ipr = IPRoute()
    held: set[IPAddress] = set()
    with ipr:
        try:
            messages = list(ipr.get_addr())
        except NetlinkError as exc:
            raise KernelError(f"reading the addresses: {exc}", exc.code) from exc
        for message in messages:
            # IPv4: IFA_LOCAL is the interface's own address (IFA_ADDRESS the peer's on
            # a point-to-point link); IPv6 has IFA_ADDRESS only.
            value = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
            if value:
                held.add(ipaddress.ip_address(value))
    return held

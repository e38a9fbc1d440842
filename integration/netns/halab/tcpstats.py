"""An endpoint namespace's TCP counters (what ``nstat`` shows), for the drill's window.

Read from ``/proc/net/snmp`` and ``/proc/net/netstat`` inside the namespace (both are
per network namespace), so no ``nstat`` history file is involved.
"""

from __future__ import annotations

from integration.netns.lab import Netns

#: The counters the drill reports, as ``nstat`` names them: segments retransmitted,
#: retransmission timeouts (RTO expiries), tail loss probes, fast retransmits, and
#: RTOs later found spurious (the original segment had arrived).
COUNTERS = ("TcpRetransSegs", "TcpExtTCPTimeouts", "TcpExtTCPLossProbes",
            "TcpExtTCPFastRetrans", "TcpExtTCPSpuriousRTOs")


def parse(text: str) -> dict[str, int]:
    """Every counter of a ``/proc/net/snmp``/``netstat`` text, named as ``nstat`` does
    (``Tcp`` + ``RetransSegs``): each group is a header line and a value line."""
    found: dict[str, int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        group, _, names = header.partition(":")
        vgroup, _, numbers = values.partition(":")
        if group != vgroup:
            raise ValueError(f"unpaired counter lines {header!r} / {values!r}")
        for name, number in zip(names.split(), numbers.split(), strict=True):
            found[group + name] = int(number)
    return found


def read(ns: Netns) -> dict[str, int]:
    """The :data:`COUNTERS` of ``ns`` now."""
    out = ns.run(["cat", "/proc/net/snmp", "/proc/net/netstat"]).stdout
    every = parse(out)
    return {name: every.get(name, 0) for name in COUNTERS}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """How much each counter grew."""
    return {name: after[name] - before.get(name, 0) for name in after}

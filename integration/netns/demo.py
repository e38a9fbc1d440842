"""``make demo``: a keepalived firewall pair fails over and back with replicator.

Builds the failover lab (``halab``: client, LAN, two firewalls with a strict stateful
ruleset and SNAT/DNAT, WAN, server), starts one replicator daemon per firewall wired
to keepalived as docs/operations.md says, opens long-lived TCP and UDP flows through
the NAT plus many idle connections, then runs every failover event (planned keepalived
stop, daemon SIGKILL, links cut) each followed by the fail-back. Prints what happened
to every flow, tears everything down, and exits 0 only if every flow survived with its
NAT mapping unchanged and every idle connection still answered.

Run as root: ``python -m integration.netns.demo [--mode hot|cache] [--verbose]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from integration.netns.halab.drill import DEFAULT_SCENARIO, PhaseResult, drill_lab
from integration.netns.halab.replicator import DRILL_CONFIG, ReplicatorReplication
from integration.netns.halab.report import format_report, stall_summary


def all_survived(results: Sequence[PhaseResult]) -> bool:
    """Every flow survived with an unchanged mapping and every idle connection answered."""
    return all(
        all(f.survived and f.mapping_after == f.mapping_before for f in r.flows)
        and r.idle_ok == r.idle_total
        for r in results)


def summary(results: Sequence[PhaseResult]) -> str:
    """Totals over the whole drill."""
    flows = [f for r in results for f in r.flows]
    kept = sum(f.survived and f.mapping_after == f.mapping_before for f in flows)
    idle_ok = sum(r.idle_ok for r in results)
    idle_total = sum(r.idle_total for r in results)
    return (f"streaming flows kept with their NAT mapping: {kept}/{len(flows)}; "
            f"idle connections answering after the failover: {idle_ok}/{idle_total}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; the exit status says whether every flow survived."""
    parser = argparse.ArgumentParser(prog="python -m integration.netns.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("hot", "cache"), default="hot",
                        help="replicator's standby mode (default: hot)")
    parser.add_argument("--verbose", action="store_true", help="one line per flow")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo builds network namespaces: run it as root", file=sys.stderr)
        return 2
    replication = ReplicatorReplication(args.mode)
    config = DRILL_CONFIG
    print(f"building the lab and starting {replication.name} on both firewalls...",
          flush=True)
    started = time.monotonic()
    with drill_lab(replication, config, tag="dm") as drill:
        print("running: " + ", ".join(str(e) for e in DEFAULT_SCENARIO), flush=True)
        results = drill.run(DEFAULT_SCENARIO)
    print()
    print(format_report(replication.name, results, verbose=args.verbose))
    print()
    print("the failover's own gap (longest time without a reply of a flow overlapping the\n"
          "failover window: from the event to 0.5 s after the path came back, never past\n"
          "the idle probe) against the VRRP takeover (target: takeover + 200 ms); the\n"
          "phase's longest stall of any flow and what it overlapped; for the worst TCP flow\n"
          "in the window: when the path came back (VIPs up, and the commit if any), how\n"
          "long after that it resumed, and which retransmission got through, sent how long\n"
          "after the path came back:")
    print(stall_summary(results))
    print()
    print(summary(results))
    ok = all_survived(results)
    print("PASS: every flow survived" if ok else
          "FAIL: some flows broke or changed their NAT mapping (see above)")
    print(f"(lab torn down; {time.monotonic() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

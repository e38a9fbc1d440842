"""Memory and CPU of replicator beside conntrackd, replicating the same table (issue 6).

One run, two namespaces (``act``, ``sby``) joined by a veth named ``sync0``. In each
namespace run both a replicator daemon (cache mode: the standby holds the peer's table
in its external cache, like conntrackd's default) and conntrackd (FTFW over UDP, the
configuration of :mod:`integration.netns.halab.conntrackd`, with its ``HashLimit``
raised so that it may hold the whole table). Both observe the same kernel events.

1. Start all four daemons and let them idle: the *idle baseline* of each (RSS, CPU).
2. Create ``--entries`` entries in ``act``'s table with a batched injector at
   ``--rate`` entries/s (steady, so that neither daemon's event socket overflows).
3. Wait until both standbys hold every entry in their external caches.
4. Print, as ``name=value`` lines, each daemon's RSS above its baseline per entry and
   its CPU time per 1000 events (a create is one NEW event on the active and one
   received entry on the standby).

Run as root: ``.venv/bin/python bench/resources.py [--entries 250000]``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from integration.netns.halab import conntrackd as ctd
from integration.netns.halab.topology import SYNC_IF, Firewall
from integration.netns.lab import Lab, Netns, lab
from integration.netns.nodes import DaemonNode, NodeSpec
from integration.netns.pair import synthetic
from replicator.kernel_linux import LinuxKernel

ACT_IP, SBY_IP = "10.78.0.1", "10.78.0.2"
#: What the task set as the target: RSS above the idle baseline per replicated entry.
TARGET_RSS_PER_ENTRY = 300
#: conntrackd's cache limit for this run (the drill's config keeps its own default).
HASH_LIMIT = 1 << 20
_TICK = os.sysconf("SC_CLK_TCK")
_EXTERNAL = re.compile(r"cache external:\s*current active connections:\s*(\d+)")


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class Conntrackd:
    """One conntrackd in a namespace (config from the drill's generator)."""

    def __init__(self, the_lab: Lab, ns: Netns, name: str, *, addr: str, peer: str,
                 workdir: Path) -> None:
        workdir.mkdir()
        fw = Firewall(name=name, ns=ns, priority=0, lan_addr=addr, wan_addr=addr,
                      sync_addr=addr, peer_sync_addr=peer, workdir=workdir)
        text = ctd.config(fw, ["127.0.0.1", ACT_IP, SBY_IP], external_cache=True)
        text, subs = re.subn(r"HashLimit \d+", f"HashLimit {HASH_LIMIT}", text)
        if subs != 1:
            raise RuntimeError("conntrackd config: HashLimit not found")
        self.conf = workdir / "conntrackd.conf"
        self.conf.write_text(text)
        self.ns = ns
        self.proc = the_lab.spawn(ns, [ctd.BINARY, "-C", str(self.conf)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.ctl("-s", check=False) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"conntrackd in {ns.name} did not start")
            time.sleep(0.1)

    def ctl(self, *args: str, check: bool = True) -> str | None:
        """``conntrackd -C CONF ARGS``: its output, or None if it failed and not ``check``."""
        proc = self.ns.run([ctd.BINARY, "-C", str(self.conf), *args], check=check)
        return proc.stdout if proc.returncode == 0 else None

    def external_count(self) -> int:
        """Entries in the external cache (``conntrackd -s``)."""
        match = _EXTERNAL.search(self.ctl("-s") or "")
        return int(match[1]) if match else 0


def progress(text: str) -> None:
    """A progress note on stderr (stdout holds only the results)."""
    print(f"[resources] {text}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` every second; return the seconds it took."""
    progress(f"waiting for {what}")
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(1)
    return time.monotonic() - start


async def inject(ns: Netns, count: int, rate: int) -> None:
    """Create ``count`` entries in ``ns`` at about ``rate`` per second."""
    batch = max(1, rate // 10)
    start = time.monotonic()
    async with LinuxKernel(ns.name) as kernel:
        for first in range(0, count, batch):
            result = await kernel.upsert(synthetic(first, min(batch, count - first)))
            if result.errors:
                raise RuntimeError(f"injection failed: {result.errors[:3]}")
            await trio.sleep(max(0.0, start + (first + batch) / rate - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=250_000)
    parser.add_argument("--rate", type=int, default=20_000, help="entries created per second")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle baseline")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from timeout) must still tear the lab down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    n = args.entries
    with lab("rs") as the_lab, TemporaryDirectory(prefix="replicator-res-") as tmp:
        workdir = Path(tmp)
        act, sby = the_lab.netns("act"), the_lab.netns("sby")
        the_lab.veth(act, SYNC_IF, sby, SYNC_IF)
        for ns, addr in ((act, ACT_IP), (sby, SBY_IP)):
            ns.run(["ip", "addr", "add", f"{addr}/24", "dev", SYNC_IF])
            ns.sysctl("net.netfilter.nf_conntrack_events", 1)
        lab_net = str(ipaddress.ip_network(f"{ACT_IP}/24", strict=False))
        nodes = {
            "replicator_active": DaemonNode(the_lab, act, NodeSpec(
                name="act", peer_name="sby", listen_address=ACT_IP, peer_address=SBY_IP,
                ignore_addresses=(lab_net,)), workdir),
            "replicator_standby": DaemonNode(the_lab, sby, NodeSpec(
                name="sby", peer_name="act", listen_address=SBY_IP, peer_address=ACT_IP,
                ignore_addresses=(lab_net,)), workdir),
        }
        for node in nodes.values():
            node.start()
        ctds = {
            "conntrackd_active": Conntrackd(the_lab, act, "a", addr=ACT_IP, peer=SBY_IP,
                                            workdir=workdir / "ca"),
            "conntrackd_standby": Conntrackd(the_lab, sby, "b", addr=SBY_IP, peer=ACT_IP,
                                             workdir=workdir / "cb"),
        }
        pids = {name: node.proc.pid for name, node in nodes.items() if node.proc}
        pids.update({name: c.proc.pid for name, c in ctds.items()})
        progress("all daemons up; idle baseline")
        time.sleep(args.idle)
        rss0 = {name: rss_bytes(pid) for name, pid in pids.items()}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.monotonic()
        progress(f"creating {n} entries at {args.rate}/s")
        trio.run(inject, act, n, args.rate)
        injected = time.monotonic() - start
        standby = nodes["replicator_standby"]
        t_rep = wait_until(lambda: standby.status()["entries"]["external"] >= n, 600,
                           "replicator's standby")
        t_ctd = wait_until(lambda: ctds["conntrackd_standby"].external_count() >= n, 600,
                           "conntrackd's standby")
        time.sleep(2)  # let the last acknowledgements and timers settle
        rss1 = {name: rss_bytes(pid) for name, pid in pids.items()}
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        lines = {"entries": str(n), "rate_per_second": str(args.rate),
                 "inject_seconds": f"{injected:.1f}",
                 "replicator_standby_complete_after_inject_seconds": f"{t_rep:.1f}",
                 "conntrackd_standby_complete_after_inject_seconds": f"{t_ctd:.1f}"}
        for name in pids:
            lines[f"{name}_idle_rss_bytes"] = str(rss0[name])
            lines[f"{name}_rss_bytes"] = str(rss1[name])
            lines[f"{name}_rss_bytes_per_entry"] = f"{(rss1[name] - rss0[name]) / n:.0f}"
            lines[f"{name}_cpu_ms_per_1000_events"] = f"{(cpu1[name] - cpu0[name]) * 1e6 / n:.1f}"
        for name in nodes:
            per_entry = (rss1[name] - rss0[name]) / n
            lines[f"{name}_rss_target_{TARGET_RSS_PER_ENTRY}_met"] = (
                "yes" if per_entry <= TARGET_RSS_PER_ENTRY else "no")
        for name, value in lines.items():
            print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

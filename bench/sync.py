"""Replication benchmark: replicator next to conntrackd (FTFW over UDP), same namespaces,
same run.

``.venv/bin/python bench/sync.py [--sizes 10000,100000] [--rates 20000,10000]
[--seconds 5] [--patience 40] [--modes cache,hot]`` (root; ``make bench-sync``) builds
two namespaces joined by a veth ``sync0`` and, for each system in turn (fresh daemons,
both tables flushed in between), prints ``name=value`` lines prefixed ``replicator_`` or
``conntrackd_``. Both systems run in two modes, with the daemon's default protocol
timers (replicator) and the HA lab's generator (conntrackd, FTFW over UDP):

* ``cache``: the standby keeps the peer's table in user space (replicator ``cache``
  mode, conntrackd's external cache, its default);
* ``hot``: the standby writes each received entry straight into its kernel (replicator
  ``hot`` mode, conntrackd ``DisableExternalCache on``). Its figures carry ``_hot``
  after the size or rate (``replicator_n100000_hot_sync_s``), and "the standby's copy"
  below is then its kernel table: the namespace's ``nf_conntrack_count`` (read from
  inside it, no process spawned) minus ``_baseline``, its value right after the daemons
  started on the flushed tables (0 here: without a ruleset nothing in these namespaces
  is tracked, so the sync connection is not in the table). The counter includes entries
  being created or freed, so after the sync ``_listed`` (the lines of ``conntrack -L``)
  checks it; there is no commit.

Figures (each run starts once both daemons are idle, ``_start_idle_wait_s`` after they
were started):

* ``n<N>_sync_s``: *N* NAT'd TCP entries are created in the active's kernel with the
  batched injector (from a socket of its own, so both daemons see ordinary kernel
  events); seconds from the start of the injection until the standby's copy holds all
  of them (``cache``: its external cache, replicator ``status`` ``entries.external``,
  conntrackd the external cache's ``current active connections`` of ``conntrackd -s``
  (asked on its control socket, as the client does, without starting the client);
  ``hot``: its kernel table, as above), polled every 10 ms. ``n<N>_missing`` is how
  many were still absent when the count stopped moving for ``--patience`` seconds
  (replicator: asserted 0). ``entries_sent`` / ``retransmits`` (replicator, the
  active's counters) and ``lost_msgs`` (conntrackd, the standby's) explain losses and
  resends.
* ``n<N>_commit_s`` (``cache`` only): seconds to write the external cache into the
  standby's kernel (``replicator commit`` vs ``conntrackd -c``, both blocking until
  done, each asked on its daemon's control socket without starting a client process),
  ``n<N>_commit_cpu_s_standby`` the standby daemon's CPU seconds meanwhile, and
  ``n<N>_committed`` the standby kernel's entry count afterwards. As at a failover,
  the active daemon is killed first and the commit starts once the standby is idle
  (less than 20 ms of CPU in 0.5 s); ``n<N>_commit_idle_wait_s`` is how long that
  took. Killing the active also matters for a reason of this lab's own: both nodes
  share one kernel, and whether the kernel builds an event for a created entry
  depends on whether *any* socket of the host listens to that group (netlink keeps
  one listener mask per protocol, not per namespace), so the active's event socket
  made the standby's kernel build a NEW event for every entry committed (seen with
  ``perf``: ``ctnetlink_conntrack_event`` filling messages inside the commit's
  ``sendto``), which a standby on its own host does not pay. conntrackd's commit
  pays it anyway (its own event socket stays subscribed), so this changes nothing
  for it.
* ``kernel_n<N>_create_s`` (with ``cache``): the kernel's own time for the creates of a
  commit, in the same run, on the same standby namespace: the same *N* entries, their
  requests built beforehand (not timed), sent from one socket in 256 KiB datagrams,
  errors only plus one ACK per datagram (what replicator's commit sends), with no
  daemon running and one socket listening to the DESTROY group only (the state a
  replicator commit leaves its event socket in: see
  ``EventSubscription.mute_changes``). ``kernel_n<N>_create_all_groups_s``: the same
  with that socket in every conntrack group, as conntrackd's event socket is during
  its commit (the kernel then builds a NEW event per create). Neither can be beaten by
  a commit on this host at that moment: they bound the commit figures from below.
  ``_created`` is the kernel's count afterwards.
* ``n<N>_wire_bytes_per_entry``: bytes through the sync interface in both directions
  (``ip -s link`` counters of the active's ``sync0``: frames including Ethernet, IP,
  TCP/UDP and, for replicator, TLS headers) per entry, from daemon start to the end of
  the sync (connection setup included).
* ``n<N>_cpu_s_active`` / ``_standby``: CPU seconds (``utime + stime`` of
  ``/proc/PID/stat``, waited-for children included) each daemon used in the same span;
  ``n<N>_rss_bytes_per_entry_*``: growth of each daemon's ``VmRSS`` over that span per
  entry.
* ``lag<R>_*``: new entries are created on the active at *R* per second for
  ``--seconds`` (a batch every 10 ms, ``--interval``); a poller samples the standby's
  count (external cache or, ``hot``, kernel) every 10 ms. Entries are created and
  replicated in order, so at a sample (time *t*, count *c*) the *c*-th entry has
  arrived and its lag is at most *t* minus the start of the write of its batch: each
  sample gives one upper bound, and ``p50_s`` / ``p99_s`` / ``max_s`` are taken over
  the samples (resolution: the 10 ms sampling and batching interval plus one
  control-socket round trip, under a ms, or in ``hot`` mode one
  read of the kernel counter).
  ``achieved_rate`` is the creation rate actually reached, and ``missing`` how many
  never arrived. ``query_p50_s``: how long one read of the count took (a sample is
  dated when its answer is back, so this much of each figure may be the reading).
  Since a sample at a given point of a batch counts the batch as arrived as soon as
  its first entries have, these bounds mostly say when the first entries of each
  batch arrive.
* ``lag<R>_entry_bound_p50_s`` / ``_p99_s``: from the same samples, one upper bound
  per entry instead of per sample: the first sample that counts the entry minus the
  start of its batch's write. Every entry counts, so the rest of each batch is seen
  too; each bound exceeds the true lag by the wait for the next sample (up to 10 ms,
  about 5 on average), the same for both systems, so compare the two, not the values
  with the exact figures below.
* ``lag<R>_hot_entry_*`` (``hot`` only): the exact lag of every entry, from its
  creation in the active's kernel to its creation in the standby's, both read from
  the kernels' own creation stamps after the run (:mod:`bench.ctstamps`:
  ``nf_conntrack_timestamp`` is on in both namespaces for the lag runs only):
  ``p50_s``, ``p99_s``, ``max_s`` over ``stamped`` entries (all of them when none is
  missing). The bench collects no garbage of its own while it generates (a
  collection held the generator up to 20 ms, and it then wrote several batches at
  once).

``--floor`` adds a third system to the ``hot`` lag runs, ``floor``
(:mod:`bench.lag_floor`): the project's kernel port, wire framing and TLS joined by
nothing else (no sync session, no caches, no daemon). Its figures, next to the two
daemons', say what the daemon's layers cost and how close the stack can come.

``--realtime``: the bench runs at ``SCHED_RR`` 99, and with it the traffic generator
and every daemon it starts (children inherit the policy; conntrackd asks for it
anyway, it is its default). By default the generator is an ordinary task, which
conntrackd's real-time daemons hold off whenever they run: they slow the very
traffic they replicate. A firewall's traffic is tracked in softirq, which no daemon
holds off; with ``--realtime`` nobody is favoured and the generator is not slowed by
the daemons it feeds. Printed as ``realtime=1``.

The machine is small and shared: wall times move with the neighbours' load, CPU
seconds less so. Run it more than once and compare ranges.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from bench import ctstamps
from integration.netns.halab import conntrackd as ctd
from integration.netns.halab.topology import SYNC_IF, Firewall
from integration.netns.lab import Lab, Netns, lab
from integration.netns.nodes import DaemonNode, NodeSpec
from integration.netns.pair import synthetic
from replicator import ctnetlink
from replicator import inject as injection
from replicator.control import ControlClient
from replicator.kernel_linux import (
    NETLINK_ADD_MEMBERSHIP,
    NFNLGRP_CONNTRACK_DESTROY,
    NFNLGRP_CONNTRACK_NEW,
    NFNLGRP_CONNTRACK_UPDATE,
    SOL_NETLINK,
    LinuxKernel,
)
from replicator.model import Entry
from replicator.netlink import NETLINK_NETFILTER
from replicator.netns import entered

SYNC_A, SYNC_B = "10.99.3.1", "10.99.3.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The kernel's count of conntrack entries; read inside a namespace, that namespace's.
CT_COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"
#: The [sync.timers] lines the test harness writes (bench/sync.py runs the defaults).
TEST_TIMERS = ("ack_timeout =", "keepalive_interval =", "dead_interval =")
POLL = 0.01
#: The requests the ``conntrackd`` client sends on the daemon's control socket for
#: ``-s`` and ``-c`` (a native int each, read with ``strace`` from conntrack-tools 1.4.7).
CTD_STATS, CTD_COMMIT = 21, 46
BATCH_INTERVAL = 0.01


def emit(name: str, value: float) -> None:
    """One ``name=value`` line."""
    print(f"{name}={value:.6g}", flush=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of its waited-for children (cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wire_bytes(ns: Netns) -> int:
    """Bytes sent plus received on ``ns``'s sync interface."""
    link = json.loads(ns.run(["ip", "-s", "-j", "link", "show", SYNC_IF]).stdout)[0]
    stats = link["stats64"]
    return int(stats["rx"]["bytes"]) + int(stats["tx"]["bytes"])


def kernel_count(ns: Netns) -> int:
    """Entries in ``ns``'s conntrack table."""
    return int(ns.run(["conntrack", "-C"]).stdout.strip())


def listed(ns: Netns) -> int:
    """Entries ``conntrack -L`` lists in ``ns`` (a count that, unlike :func:`ct_count`,
    leaves out entries not in the table: unconfirmed ones, ones being freed)."""
    return len(ns.run(["conntrack", "-L"]).stdout.splitlines())


def ct_count(ns: Netns) -> int:
    """``ns``'s :data:`CT_COUNT`, read by this thread from inside ``ns`` (no process
    spawned: cheap enough to poll every 10 ms)."""
    with entered(ns.name):
        return int(Path(CT_COUNT).read_text())


def flush(ns: Netns) -> None:
    """Empty ``ns``'s conntrack table."""
    ns.run(["conntrack", "-F"], check=False)


async def _write(ns: Netns, batches: Sequence[Sequence[Entry]], interval: float,
                 starts: list[float]) -> None:
    async with LinuxKernel(ns.name) as kernel:
        t0 = trio.current_time()
        for i, batch in enumerate(batches):
            await trio.sleep_until(t0 + i * interval)
            starts.append(time.monotonic())
            result = await kernel.upsert(batch)
            if result.errors:
                raise RuntimeError(f"inject: {len(result.errors)} refused: {result.errors[0]}")


def inject(ns: Netns, entries: Sequence[Entry]) -> None:
    """Create ``entries`` in ``ns`` as fast as the batched injector goes."""
    trio.run(_write, ns, [entries], 0.0, [])


def paced(ns: Netns, entries: Sequence[Entry], per_batch: int, interval: float) -> list[float]:
    """Create ``entries`` ``per_batch`` at a time every ``interval`` s; each batch's
    start time (``time.monotonic``)."""
    batches = [entries[i:i + per_batch] for i in range(0, len(entries), per_batch)]
    starts: list[float] = []
    trio.run(_write, ns, batches, interval, starts)
    return starts


# --- the two systems ------------------------------------------------------------------


class System(ABC):
    """A replication system on the pair: start, count the standby's copy, commit, stop.

    ``hot``: the standby writes received entries straight into its kernel (replicator
    ``hot`` mode, conntrackd ``DisableExternalCache on``), so its copy is counted in its
    kernel table, from the baseline :meth:`zero` took, instead of its external cache.
    """

    name: str

    def __init__(self, standby: Netns, *, hot: bool) -> None:
        self.standby, self.hot = standby, hot
        self.baseline = 0

    @property
    def suffix(self) -> str:
        """Inserted into the figures' names after the size or rate."""
        return "_hot" if self.hot else ""

    def zero(self) -> int:
        """Take the standby kernel's current count as the baseline (hot mode); return it."""
        self.baseline = ct_count(self.standby)
        return self.baseline

    def standby_count(self) -> int:
        """Entries in the standby's copy: its external cache, or (hot) its kernel."""
        if self.hot:
            return ct_count(self.standby) - self.baseline
        return self.external_count()

    @abstractmethod
    def start(self) -> None:
        """Start both daemons (active and standby) and wait until they are ready."""

    @abstractmethod
    def pids(self) -> tuple[int, int]:
        """(active, standby) daemon pids."""

    @abstractmethod
    def external_count(self) -> int:
        """Entries in the standby's external cache."""

    @abstractmethod
    def commit(self) -> None:
        """Write the standby's external cache into its kernel (blocking)."""

    @abstractmethod
    def kill_active(self) -> None:
        """Kill the active node's daemon (SIGKILL: a failover, the active is gone)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop both daemons (either may be gone already)."""

    @abstractmethod
    def diagnostics(self) -> dict[str, float]:
        """Counters that explain a run (resends, losses), by name."""


class Replicator(System):
    """replicator in ``cache`` mode (the standby holds the peer's table in user space) or
    ``hot`` mode (the standby writes it into its kernel as it arrives)."""

    name = "replicator"

    def __init__(self, the_lab: Lab, a: Netns, b: Netns, workdir: Path, *,
                 hot: bool) -> None:
        super().__init__(b, hot=hot)
        mode = "hot" if hot else "cache"
        workdir = workdir / f"replicator-{mode}"
        workdir.mkdir()
        self.nodes = [
            DaemonNode(the_lab, ns, NodeSpec(name, peer, here, there, mode=mode,
                                             ignore_addresses=(SYNC_A, SYNC_B)), workdir)
            for name, peer, here, there, ns in (("a", "b", SYNC_A, SYNC_B, a),
                                                ("b", "a", SYNC_B, SYNC_A, b))]
        for node in self.nodes:
            # The test harness shortens the protocol timers; measure the daemon's defaults.
            lines = node.config.read_text().splitlines(keepends=True)
            node.config.write_text("".join(
                line for line in lines if not line.startswith(TEST_TIMERS)))
        self.control = [ControlClient(workdir / f"{n.spec.name}.sock") for n in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.nodes[0].notify("MASTER")
        self.nodes[1].notify("BACKUP")
        deadline = time.monotonic() + 30
        while not all(c.status()["peer_up"] for c in self.control):
            if time.monotonic() > deadline:
                raise RuntimeError("replicator peers did not connect")
            time.sleep(0.05)

    def pids(self) -> tuple[int, int]:
        a, b = (n.proc for n in self.nodes)
        assert a is not None and b is not None
        return a.pid, b.pid

    def external_count(self) -> int:
        return self.control[1].status()["entries"]["external"]

    def commit(self) -> None:
        report = self.control[1].commit()
        if report["failed"]:
            raise RuntimeError(f"replicator commit: {report['failed']} failed")

    def kill_active(self) -> None:
        self.nodes[0].kill()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def diagnostics(self) -> dict[str, float]:
        stats = self.control[0].stats()
        return {"entries_sent": stats["sync_entries_sent"],
                "retransmits": stats["sync_retransmits"]}


class Conntrackd(System):
    """conntrackd FTFW over UDP on ``sync0``, configured by the HA lab's generator
    (:func:`integration.netns.halab.conntrackd.config`): external cache on (its default)
    or, ``hot``, off (``DisableExternalCache on``: direct injection into the kernel)."""

    name = "conntrackd"

    def __init__(self, the_lab: Lab, a: Netns, b: Netns, workdir: Path, *,
                 hot: bool) -> None:
        super().__init__(b, hot=hot)
        self.lab = the_lab
        self.fws = []
        for name, ns, here, there in (("a", a, SYNC_A, SYNC_B), ("b", b, SYNC_B, SYNC_A)):
            wd = workdir / f"conntrackd-{'direct' if hot else 'cache'}-{name}"
            wd.mkdir()
            fw = Firewall(name, ns, 100, "", "", here, there, wd)
            (wd / "conntrackd.conf").write_text(
                ctd.config(fw, ["127.0.0.1", SYNC_A, SYNC_B], external_cache=not hot))
            self.fws.append(fw)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for fw in self.fws:
            (fw.workdir / "conntrackd.lock").unlink(missing_ok=True)
            self.procs.append(self.lab.spawn(
                fw.ns, [ctd.BINARY, "-C", str(fw.workdir / "conntrackd.conf")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        for fw in self.fws:
            deadline = time.monotonic() + 10
            while fw.ns.run([ctd.BINARY, "-C", str(fw.workdir / "conntrackd.conf"), "-s"],
                            check=False).returncode != 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"conntrackd {fw.name} did not start")
                time.sleep(0.05)

    def pids(self) -> tuple[int, int]:
        return self.procs[0].pid, self.procs[1].pid

    def external_count(self) -> int:
        return external_active(self._request(self.fws[1], CTD_STATS))

    def _request(self, fw: Firewall, request: int) -> str:
        """Ask the daemon on its control socket what the ``conntrackd`` client would
        (``-s``: :data:`CTD_STATS`, ``-c``: :data:`CTD_COMMIT`) and return its answer,
        read until it closes the connection, as the client does.

        Not through the client: starting it (through ``ip netns exec``) took 6.5 ms
        (median), where replicator's control query took 0.9, so conntrackd's counts
        were dated several ms late and its commits carried a process start that
        replicator's, asked on its control socket, do not. The socket is a path,
        reachable from any network namespace."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(fw.workdir / "conntrackd.ctl"))
            sock.sendall(struct.pack("=i", request))
            parts = []
            while chunk := sock.recv(65536):
                parts.append(chunk)
        return b"".join(parts).decode()

    def commit(self) -> None:
        self._request(self.fws[1], CTD_COMMIT)

    def kill_active(self) -> None:
        self.procs[0].kill()
        self.procs[0].wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)
        self.procs.clear()

    def diagnostics(self) -> dict[str, float]:
        stats = self._request(self.fws[1], CTD_STATS)
        for line in stats.splitlines():
            if "Lost msgs" in line:
                return {"lost_msgs": float(line.split()[-3])}
        raise RuntimeError(f"no message tracking in:\n{stats}")


def external_active(stats: str) -> int:
    """``current active connections`` of the external cache in ``conntrackd -s`` output."""
    section = None
    for line in stats.splitlines():
        if line.startswith("cache "):
            section = line.split()[1]
        elif section == "external:" and line.startswith("current active connections:"):
            return int(line.split(":")[1])
    raise RuntimeError(f"no external cache count in:\n{stats}")


# --- measurements ---------------------------------------------------------------------


@dataclass
class Sample:
    """Readings of both daemons and the wire at one moment."""

    cpu: tuple[float, float]
    rss: tuple[int, int]
    wire: int

    @classmethod
    def take(cls, system: System, active: Netns) -> Sample:
        a, b = system.pids()
        return cls((cpu_seconds(a), cpu_seconds(b)), (rss_bytes(a), rss_bytes(b)),
                   wire_bytes(active))


def wait_count(count: Callable[[], int], target: int, patience: float,
               on_sample: Callable[[float, int], None] | None = None) -> int:
    """Poll ``count()`` every :data:`POLL` s until it reaches ``target`` or has not
    moved for ``patience`` s; the last count."""
    last, moved = -1, time.monotonic()
    while True:
        now_count = count()
        now = time.monotonic()
        if on_sample is not None:
            on_sample(now, now_count)
        if now_count != last:
            last, moved = now_count, now
        if now_count >= target or now - moved > patience:
            return now_count
        time.sleep(POLL)


def start(system: System, prefix: str) -> None:
    """Start ``system`` and wait until both daemons are idle (:func:`wait_idle`; the
    seconds waited are printed as ``_start_idle_wait_s``), so that a measurement does
    not overlap the pair's start-up (a replicator standby's join resync, asked for when
    it learns it is the backup, resent every entry of a 10 k burst started right after
    the peers connected: 20,000 sent for 10,000); in hot mode, take (and print) the
    standby kernel's baseline."""
    system.start()
    emit(f"{prefix}_start_idle_wait_s", wait_idle(system.pids()))
    if system.hot:
        emit(f"{prefix}_baseline", system.zero())


def bench_size(system: System, a: Netns, b: Netns, n: int, patience: float) -> None:
    """Sync ``n`` entries, then (external cache) commit them (see the module doc)."""
    p = f"{system.name}_n{n}{system.suffix}"
    entries = synthetic(0, n, timeout=600)
    start(system, p)
    before = Sample.take(system, a)
    t0 = time.monotonic()
    inject(a, entries)
    got = wait_count(system.standby_count, n, patience)
    synced = time.monotonic() - t0
    after = Sample.take(system, a)
    emit(f"{p}_sync_s", synced)
    emit(f"{p}_missing", n - got)
    for name, value in system.diagnostics().items():
        emit(f"{p}_{name}", value)
    emit(f"{p}_wire_bytes_per_entry", (after.wire - before.wire) / n)
    for i, side in enumerate(("active", "standby")):
        emit(f"{p}_cpu_s_{side}", after.cpu[i] - before.cpu[i])
        emit(f"{p}_rss_bytes_per_entry_{side}", (after.rss[i] - before.rss[i]) / n)
    if system.hot:
        emit(f"{p}_listed", listed(b))
    else:
        commit(system, b, p)
    system.stop()
    if system.name == "replicator" and got != n:
        raise AssertionError(f"replicator: {n - got} of {n} entries missing on the standby")


def commit(system: System, b: Netns, prefix: str) -> None:
    """Kill the active, commit the standby's external cache; its time, the standby's
    CPU, the result.

    First wait until both daemons are idle (:func:`wait_idle`): right after the count
    is complete they may still be working through the last messages (a replicator
    standby reading a burst's trailing bucket resyncs, measured 2026-11-26: the commit
    then took 0.7-1.7 s instead of 0.4-0.6). Then the active is killed, as at a
    failover (see the module doc for why it matters here), and the commit starts once
    the standby has dealt with that too.
    """
    waited = wait_idle(system.pids())
    system.kill_active()
    standby = system.pids()[1]
    emit(f"{prefix}_commit_idle_wait_s", waited + wait_idle([standby]))
    cpu = cpu_seconds(standby)
    t0 = time.monotonic()
    system.commit()
    emit(f"{prefix}_commit_s", time.monotonic() - t0)
    emit(f"{prefix}_commit_cpu_s_standby", cpu_seconds(standby) - cpu)
    emit(f"{prefix}_committed", kernel_count(b))


#: A daemon counts as idle once it used less than IDLE_CPU_S of CPU in IDLE_WINDOW_S.
IDLE_WINDOW_S = 0.5
IDLE_CPU_S = 0.02


def wait_idle(pids: Sequence[int], limit: float = 30.0) -> float:
    """Wait until every process of ``pids`` is idle (see :data:`IDLE_CPU_S`), at most
    ``limit`` seconds; the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        before = [cpu_seconds(pid) for pid in pids]
        time.sleep(IDLE_WINDOW_S)
        if all(cpu_seconds(pid) - b < IDLE_CPU_S for pid, b in zip(pids, before, strict=True)):
            break
    return time.monotonic() - t0


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def entry_bounds(samples: Sequence[tuple[float, int]], starts: Sequence[float],
                 per_batch: int) -> list[float]:
    """For every entry the ``(time, count)`` samples saw arrive, in order, an upper bound
    on its lag: the time of the first sample that counts it minus the start of its
    batch's write. Unlike one bound per sample, every entry counts once, the last of a
    batch as much as the first."""
    bounds: list[float] = []
    seen, limit = 0, len(starts) * per_batch
    for t, count in samples:
        for i in range(seen, min(count, limit)):
            bounds.append(t - starts[i // per_batch])
        seen = max(seen, count)
    return bounds


def bench_lag(system: System, a: Netns, rate: int, seconds: float, patience: float, *,
              interval: float = BATCH_INTERVAL) -> None:
    """Replication lag under a steady creation rate, a batch every ``interval`` s (see
    the module doc)."""
    p = f"{system.name}_lag{rate}{system.suffix}"
    per_batch = max(1, round(rate * interval))
    n = per_batch * round(seconds / interval)
    entries = synthetic(0, n, timeout=600)
    start(system, p)
    before = Sample.take(system, a)
    starts: list[float] = []
    samples: list[tuple[float, int]] = []
    final = [0]

    queries: list[float] = []

    def count() -> int:
        t0 = time.monotonic()
        got = system.standby_count()
        queries.append(time.monotonic() - t0)
        return got

    def poll() -> None:
        final[0] = wait_count(count, n, patience, lambda t, c: samples.append((t, c)))

    # Hot mode: the exact lag of every entry, from the kernels' own creation stamps
    # (bench/ctstamps.py), on for this run only.
    stamped = (a, system.standby) if system.hot else ()
    # No garbage collection in this process while it generates: a collection of the
    # bench's own objects (the entries of every run) held the generator up to 20 ms
    # and it then wrote several batches at once (seen: a thousand entries in one
    # 10 ms step), always in the same run of an invocation, as collections come
    # after a fixed number of allocations.
    gc.collect()
    gc.disable()
    try:
        for ns in stamped:
            ns.sysctl(ctstamps.SYSCTL, 1)
        poller = threading.Thread(target=poll)
        poller.start()
        starts = paced(a, entries, per_batch, interval)
        poller.join()
    finally:
        gc.enable()
        for ns in stamped:
            ns.sysctl(ctstamps.SYSCTL, 0)
    after = Sample.take(system, a)
    if system.hot:
        entry_lags = ctstamps.lags(ctstamps.creation_times(a.name),
                                   ctstamps.creation_times(system.standby.name))
        emit(f"{p}_entry_stamped", len(entry_lags))
        if entry_lags:
            emit(f"{p}_entry_p50_s", percentile(entry_lags, 0.5))
            emit(f"{p}_entry_p99_s", percentile(entry_lags, 0.99))
            emit(f"{p}_entry_max_s", max(entry_lags))
    lags = [t - starts[(c - 1) // per_batch] for t, c in samples if c > 0]
    emit(f"{p}_achieved_rate", n / (starts[-1] - starts[0] + interval))
    emit(f"{p}_p50_s", percentile(lags, 0.5))
    emit(f"{p}_p99_s", percentile(lags, 0.99))
    emit(f"{p}_max_s", max(lags))
    emit(f"{p}_samples", len(lags))
    emit(f"{p}_query_p50_s", percentile(queries, 0.5))
    bounds = entry_bounds(samples, starts, per_batch)
    if bounds:
        emit(f"{p}_entry_bound_p50_s", percentile(bounds, 0.5))
        emit(f"{p}_entry_bound_p99_s", percentile(bounds, 0.99))
    emit(f"{p}_missing", n - final[0])
    for name, value in system.diagnostics().items():
        emit(f"{p}_{name}", value)
    for i, side in enumerate(("active", "standby")):
        emit(f"{p}_cpu_s_{side}", after.cpu[i] - before.cpu[i])
    system.stop()
    if system.name == "replicator" and final[0] != n:
        raise AssertionError(f"replicator: {n - final[0]} of {n} entries missing (lag run)")


def kernel_floor(b: Netns, n: int) -> None:
    """The kernel's own time for a commit's creates (see the module doc)."""
    batches = create_batches(n)
    every = (NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_UPDATE, NFNLGRP_CONNTRACK_DESTROY)
    for name, groups in (("create", every[2:]), ("create_all_groups", every)):
        emit(f"kernel_n{n}_{name}_s", timed_creates(b, batches, groups))
        emit(f"kernel_n{n}_{name}_created", kernel_count(b))
    flush(b)


def create_batches(n: int) -> list[injection.Batch]:
    """Datagrams of creates of ``n`` synthetic entries, errors only and one ACK each
    (what replicator's commit sends), built beforehand."""
    return list(injection.plan_batches(
        injection.Op.CREATE, synthetic(0, n, timeout=600), ctnetlink.encode_create, 1))


def timed_creates(ns: Netns, batches: Sequence[injection.Batch],
                  groups: Sequence[int]) -> float:
    """Seconds the kernel takes for ``batches`` into the (flushed) table of ``ns``, sent
    from one socket while another listens to the conntrack ``groups``."""
    flush(ns)
    buf = bytearray(1 << 16)
    with entered(ns.name):
        listener = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock = injection.open_socket()
    with listener, sock:
        listener.bind((0, 0))
        for group in groups:
            listener.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        sock.setblocking(True)
        t0 = time.perf_counter()
        for batch in batches:
            sock.send(batch.datagram)
            # No error expected: the only reply is the datagram's final ACK.
            got = sock.recv_into(buf)
            if ctnetlink.parse_acks(memoryview(buf)[:got]) != [(batch.last_seq, 0)]:
                raise RuntimeError(f"kernel floor: a create failed in {ns.name}")
        return time.perf_counter() - t0


def sync_link(the_lab: Lab, a: Netns, b: Netns) -> None:
    """Join the active ``a`` and the standby ``b`` by the sync link, ``SYNC_IF`` with
    ``SYNC_A`` and ``SYNC_B``."""
    the_lab.veth(a, SYNC_IF, b, SYNC_IF)
    a.run(["ip", "addr", "add", f"{SYNC_A}/30", "dev", SYNC_IF])
    b.run(["ip", "addr", "add", f"{SYNC_B}/30", "dev", SYNC_IF])


def main(argv: Sequence[str] | None = None) -> None:
    """Run every measurement for both systems in each mode (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--rates", default="20000,10000",
                        help="creation rates (entries/s) of the lag runs")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--interval", type=float, default=BATCH_INTERVAL,
                        help="seconds between the lag runs' batches of creates (the "
                             "default makes batches of 200 at 20 k/s; 0.001: of 20)")
    parser.add_argument("--patience", type=float, default=40.0,
                        help="give up waiting once the standby's count is still this long")
    parser.add_argument("--modes", default="cache,hot",
                        help="cache: standby external caches; hot: standby kernels")
    parser.add_argument("--floor", action="store_true",
                        help="add the lag floor (bench/lag_floor.py) to the hot lag runs")
    parser.add_argument("--realtime", action="store_true",
                        help="run the bench, so its generator and every daemon it starts, "
                             "at SCHED_RR 99 (see the module doc)")
    args = parser.parse_args(argv)
    if args.realtime:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(99))
    emit("realtime", int(args.realtime))
    sizes = [int(s) for s in args.sizes.split(",") if s]
    rates = [int(r) for r in args.rates.split(",") if r]
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"cache", "hot"}:
        parser.error(f"--modes: cache and/or hot, not {args.modes!r}")
    if shutil.which(ctd.BINARY) is None:
        raise SystemExit(f"{ctd.BINARY} not found (Debian package conntrackd)")
    with lab("bs") as the_lab, tempfile.TemporaryDirectory(prefix="rp-bench-sync-") as tmp:
        a, b = the_lab.netns("a"), the_lab.netns("b")
        sync_link(the_lab, a, b)
        workdir = Path(tmp)
        systems: list[System] = [
            kind(the_lab, a, b, workdir, hot=mode == "hot")
            for mode in modes for kind in (Replicator, Conntrackd)]
        floor: list[System] = []
        if args.floor and "hot" in modes:
            from bench.lag_floor import Floor  # imports this module
            floor.append(Floor(the_lab, a, b, workdir))
        runs: list[tuple[Callable[[System], None], int | None]] = [
            *((partial(bench_size, a=a, b=b, n=n, patience=args.patience), n)
              for n in sizes),
            *((partial(bench_lag, a=a, rate=r, seconds=args.seconds,
                       patience=args.patience, interval=args.interval), None)
              for r in rates)]
        for run, size in runs:
            for system in systems + (floor if size is None else []):
                flush(a)
                flush(b)
                run(system)
            if size is not None and "cache" in modes:
                # After both systems' commits of this size, on the same namespace.
                kernel_floor(b, size)


if __name__ == "__main__":
    main()

"""Faults on a running daemon pair: every test ends in EXACT equality (issue 6, part 3).

Each test runs a real active/standby pair in hot mode (:mod:`integration.netns.pair`),
creates (and deletes) entries on the active with a separate batched injector socket
while the fault happens, then waits until the standby's external cache and kernel
table equal the active's table exactly (:func:`~integration.netns.pair.converge`:
``conntrack -L`` fields, timeouts within the protocol's bounds) and prints how long
that took.

CI durations are shortened where the real figure would dominate the suite: the
partition lasts ``REPLICATOR_PARTITION_SECONDS`` (20 s by default, 60 s under
``make soak``) and the bulk-resync table holds ``REPLICATOR_BULK_ENTRIES`` (150k, 250k
under ``make soak``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import trio

from integration.netns import pair as P
from integration.netns.lab import Lab, Netns
from integration.netns.nodes import DaemonNode, wait_for
from replicator.control import ControlClient
from replicator.kernel_linux import LinuxKernel
from replicator.model import AF_INET, IPPROTO_TCP, CtTuple, Entry, invert

PARTITION_SECONDS = float(os.environ.get("REPLICATOR_PARTITION_SECONDS", "20"))
#: Table size for the kill-during-bulk-resync test: large enough that the bulk send
#: takes about a second (50k went through while the restarted standby was still being
#: told its role).
BULK_ENTRIES = int(os.environ.get("REPLICATOR_BULK_ENTRIES", "150000"))
#: Entries the active may have in flight (sent, not acknowledged): the default
#: ``sync.window`` of the pair's configuration.
WINDOW = 16384


def test_burst_overruns_small_event_buffer(netlab: Lab, tmp_path: Path) -> None:
    # 200k new entries at injector speed into a 256 KiB event buffer (~200 events).
    pair = P.make_pair(netlab, tmp_path, active_rcvbuf=256 * 1024)
    writer = P.Writer(pair.active.ns)
    writer.upsert(P.synthetic(0, 1000))
    P.converge(pair, 30, "the first entries")
    writer.upsert(P.synthetic(1000, 200_000))
    overruns = P.stats(pair.active)["mirror_overruns"]
    print(f"mirror overruns: {overruns:.0f}")
    assert overruns > 0
    P.converge(pair, 240, "a 200k burst with overruns")


def block_sync(ns: Netns) -> None:
    """Drop every sync-link packet arriving in ``ns`` (input hook: packets are lost)."""
    ns.nft(f"""table inet partition {{
  chain input {{ type filter hook input priority -10; policy accept;
    tcp dport {P.PORT} drop; tcp sport {P.PORT} drop; }}
}}""")


def heal(ns: Netns, table: str) -> None:
    """Remove the fault table."""
    ns.run(["nft", "delete", "table", "inet", table])


def test_partition_then_heal(netlab: Lab, tmp_path: Path) -> None:
    pair = P.make_pair(netlab, tmp_path)
    writer = P.Writer(pair.active.ns)
    writer.upsert(P.synthetic(0, 3000))
    P.converge(pair, 30, "the first entries")
    for node in pair.nodes:
        block_sync(node.ns)
    # Thousands of creates and deletes spread over the partition.
    steps = 10
    start = time.monotonic()
    for step in range(steps):
        writer.upsert(P.synthetic(3000 + step * 500, 500))
        writer.delete(P.synthetic(step * 200, 100) + P.synthetic(3000 + step * 500, 150))
        time.sleep(max(0.0, start + (step + 1) * PARTITION_SECONDS / steps - time.monotonic()))
    assert not pair.standby.status()["peer_up"], "the partition did not cut the link"
    for node in pair.nodes:
        heal(node.ns, "partition")
    P.converge(pair, 120, f"a {PARTITION_SECONDS:g} s partition")


def test_lossy_link_and_stopped_receiver(netlab: Lab, tmp_path: Path) -> None:
    pair = P.make_pair(netlab, tmp_path)
    sby = pair.standby
    # 20 % of everything the standby receives on the sync network is lost (no netem).
    pair.sync_loss(sby.ns, 20)
    writer = P.Writer(pair.active.ns)
    writer.upsert(P.synthetic(0, 2000))
    assert sby.proc is not None
    with P.BackgroundWrites(writer, 2000, batch=200, interval=0.2) as bg:
        time.sleep(2)
        os.kill(sby.proc.pid, signal.SIGSTOP)  # a receiver too slow to read at all
        time.sleep(5)
        os.kill(sby.proc.pid, signal.SIGCONT)
        writer.delete(P.synthetic(0, 500))
        time.sleep(2)
    print(f"{bg.next} entries written under 20 % loss")
    P.converge(pair, 120, "20 % loss and a stopped receiver")


def received_resyncs(node: DaemonNode, event: str) -> int:
    """How many resyncs of the peer's table (digest or full) ``node`` logged as
    ``event`` (``started`` or ``completed``) so far."""
    return len([line for line in P.log_lines(node, f'msg="resync {event}"')
                if "direction=receive" in line])


def partial_copy(node: DaemonNode, below: int, timeout: float = 60) -> int:
    """Poll ``node``'s external cache size (control socket, no CLI start-up) until it
    holds some entries but fewer than ``below``; return that count."""
    client = ControlClient(node.workdir / f"{node.spec.name}.sock", timeout=10)
    deadline = time.monotonic() + timeout
    seen: list[int] = []
    while time.monotonic() < deadline:
        held = client.status()["entries"]["external"]
        if 0 < held < below:
            return held
        if held >= below:
            raise AssertionError(f"{held} entries already, the transfer went past {below} "
                                 f"between two polls: {seen[-5:]}")
        seen.append(held)
        time.sleep(0.005)
    raise AssertionError(f"no partial copy within {timeout} s: last counts {seen[-5:]}")


@pytest.mark.parametrize("victim", ["active", "standby"])
def test_killed_during_bulk_resync(netlab: Lab, tmp_path: Path, victim: str) -> None:
    """A standby rejoins with an empty table (its daemon stopped, its kernel table
    flushed, as after a reboot) and receives the whole table in a resync (the bulk
    transfer: a digest resync in which every bucket differs, then the full one its
    BACKUP role asks for). Once the standby is seen holding part of the table,
    ``victim`` is SIGKILLed; the standby's log then proves that a resync of the table
    had started and none had completed. The table changes while the victim is down;
    after its restart the standby must equal the active exactly."""
    pair = P.make_pair(netlab, tmp_path)
    sby = pair.standby
    writer = P.Writer(pair.active.ns)
    writer.upsert(P.synthetic(0, BULK_ENTRIES))
    P.converge(pair, 120, f"loading {BULK_ENTRIES} entries")
    sby.stop()
    sby.ns.run(["conntrack", "-F"])
    started, completed = (received_resyncs(sby, e) for e in ("started", "completed"))
    pair.start_node(sby)
    # Killing the active leaves the standby a partial copy only if the active had more
    # than a window left to send: what it sent before the kill still arrives.
    held = partial_copy(sby, BULK_ENTRIES - (WINDOW if victim == "active" else 0))
    node: DaemonNode = getattr(pair, victim)
    node.kill(signal.SIGKILL)
    killed = time.monotonic()
    print(f"{victim} killed with the standby holding {held} of {BULK_ENTRIES} entries")
    assert 0 < held < BULK_ENTRIES
    if victim == "active":
        # The standby lives on with the part it received: a frozen, partial copy.
        time.sleep(1)
        after = sby.status()["entries"]["external"]
        print(f"standby's copy 1 s after the kill: {after} entries")
        assert held <= after < BULK_ENTRIES
    # The standby's log since its restart: a resync of the active's table began, and
    # none completed before the kill.
    assert received_resyncs(sby, "started") > started, sby.log_tail(20)
    assert received_resyncs(sby, "completed") == completed, sby.log_tail(20)
    # The table moves on while the victim is down.
    writer.upsert(P.synthetic(BULK_ENTRIES, 2000))
    writer.delete(P.synthetic(0, 1000))
    restart = time.monotonic()
    pair.start_node(node)
    print(f"{victim} restarted {restart - killed:.1f} s after the kill")
    P.converge(pair, 180, f"the {victim} killed during a bulk resync (from its restart)",
               since=restart)


def filler(count: int) -> list[Entry]:
    """``count`` ASSURED entries inside the lab prefix: the daemons' filter ignores them
    (they are never replicated) and the kernel cannot early-drop them."""
    out = []
    dst = bytes([10, 77, 0, 250])
    for i in range(count):
        orig = CtTuple(bytes([10, 77, 0, 100 + i // 60000]), dst, IPPROTO_TCP,
                       1024 + i % 60000, 80)
        out.append(P.synthetic(0, 1)[0]._replace(family=AF_INET, orig=orig,
                                                 reply=invert(orig)))
    return out


def conntrack_sysctl(ns: Netns, name: str) -> int:
    """``net.netfilter.nf_conntrack_<name>`` as seen in ``ns``."""
    return int(ns.run(["sysctl", "-n", f"net.netfilter.nf_conntrack_{name}"]).stdout)


def test_standby_kernel_table_full(netlab: Lab, tmp_path: Path) -> None:
    """nf_conntrack_max is global and read-only in a namespace but counted per
    namespace: the standby's table is filled to ROOM entries below it with entries of
    its own (ignored by the filter), so the active's new entries overflow it."""
    room = 500
    pair = P.make_pair(netlab, tmp_path)
    act, sby = pair.nodes
    writer = P.Writer(act.ns)
    writer.upsert(P.synthetic(0, 300))
    P.converge(pair, 30, "the first entries")
    limit = conntrack_sysctl(sby.ns, "max")
    fill = filler(limit - conntrack_sysctl(sby.ns, "count") - room)
    P.Writer(sby.ns).upsert(fill)
    writer.upsert(P.synthetic(300, 2000))
    # Everything reaches the external cache: the error is only the kernel's.
    P.converge(pair, 60, "creates into a full table", kernel=False)

    def kernel_done() -> bool:
        return bool(P.stats(sby)["kernel_writes_pending"] == 0)

    wait_for(kernel_done, 60, "the standby's kernel writes")
    truth, kernel = pair.kernel(act), pair.kernel(sby)
    missing = truth.keys() - kernel.keys()
    # What the kernel holds is exactly the active's; it only lacks what it refused.
    assert not pair.differences({k: truth[k] for k in kernel.keys() & truth.keys()}, kernel)
    stats = P.stats(sby)
    print(f"table full: {len(missing)} entries refused, stats "
          f"{ {k: v for k, v in stats.items() if k.startswith('kernel_errors_')} }")
    assert 0 < len(missing) <= 2000
    # Every refused write is counted (an entry the peer sends again, e.g. with a
    # refreshed timeout, is refused and counted again), and nothing else failed.
    errors = {k: v for k, v in stats.items() if k.startswith("kernel_errors_")}
    assert set(errors) == {"kernel_errors_ENOMEM"}, errors
    assert errors["kernel_errors_ENOMEM"] >= len(missing)
    # Once there is room again, a commit installs exactly what was missing.
    P.Writer(sby.ns).delete(fill)

    def mirror_settled() -> bool:
        # 260 k deletions overrun the event socket, and a dump taken while they run
        # can miss entries: until the repair dump, a hot commit would rewrite copies
        # the mirror does not see (harmless, but "applied" would count them).
        return bool(sby.status()["entries"]["kernel"] == conntrack_sysctl(sby.ns, "count"))

    wait_for(mirror_settled, 60, "the standby's mirror after the deletions")
    report = sby.cli("commit")
    assert report["applied"] == len(missing) and report["failed"] == 0, report
    P.converge(pair, 60, "room made and a commit")


def rss_bytes(node: DaemonNode) -> int:
    """The daemon's resident set size."""
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_update_burst_coalesced(netlab: Lab, tmp_path: Path) -> None:
    """1000 entries updated 200 times each: the sender coalesces by key, so its queue
    never holds more than the entry count and its memory stays flat."""
    entries, rounds = 1000, 200
    pair = P.make_pair(netlab, tmp_path)
    act = pair.active
    base = P.synthetic(0, entries)
    P.Writer(act.ns).upsert(base)
    P.converge(pair, 30, "the first entries")
    pending: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pending.append(P.stats(act)["sync_pending"])

    async def burst(first: int, last: int) -> None:
        async with LinuxKernel(act.ns.name) as kernel:
            for r in range(first, last):
                result = await kernel.upsert([e._replace(mark=r) for e in base])
                assert not result.errors, result.errors[:3]

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # Warm-up: buffers and the allocator reach their working size once.
        trio.run(burst, 1, 21)
        before = rss_bytes(act)
        trio.run(burst, 21, 111)
        middle = rss_bytes(act)
        trio.run(burst, 111, rounds + 1)
        after = rss_bytes(act)
    finally:
        stop.set()
        sampler.join()
    P.converge(pair, 60, f"{rounds} updates to each of {entries} entries")
    mib = 2**20
    print(f"active RSS {before / mib:.1f} -> {middle / mib:.1f} -> {after / mib:.1f} MiB; "
          f"pending sampled {len(pending)} times, peak {max(pending):.0f}")
    assert max(pending) <= entries
    # Memory bounded by the entry count, generously: the allocator and receive
    # batches move RSS in steps of a few MiB (measured: 1M updates to these 1000
    # entries kept it between 54 and 63 MiB; this test's growth ranged from -1 to
    # +16.5 MB on the shared host), while 180k queued updates, uncoalesced, would hold
    # 180k entry objects of >= 300 B each (>= 50 MB).
    assert after - before <= entries * 24576
    marks = {e.mark for e in pair.kernel(pair.standby).values()}
    assert marks == {rounds}, marks

"""Kernel-path benchmark: our figures next to the reference's, measured in the same run.

``.venv/bin/python bench/kernel.py [--entries 100000] [--cli-sample 1000]`` (root; it
creates its own network namespaces and removes them) prints one ``name=value`` line per
figure:

* decode: messages/s of our ctnetlink decoder vs pyroute2's on the captured kernel
  messages (``tests/data/ctnetlink.bin``, via :func:`bench.decode.measure_decode`);
* encode: ``encode_create`` alone, entries/s;
* inject: entries/s for ``--entries`` NAT'd TCP entries written into a fresh namespace,
  *including* building the messages: batched (:func:`replicator.inject.upsert`), the
  same entries again (all ``EEXIST``, then updated), one message per round trip with an
  ACK (what conntrackd does), and a ``conntrack -I`` loop on a sample (``--cli-sample``);
  then the first two with the messages built beforehand (``inject_preencoded_*``): the
  kernel's and the syscalls' share, so the rest is the cost of building messages;
* dump: seconds to read the whole table back, :func:`replicator.kernel_linux.dump` vs
  ``conntrack -L`` (its output discarded), and the share of ``ctnetlink.decode_dump``
  in ours (the same datagrams decoded again, the collector paused as ``dump`` does).

Everything runs on one core in this process (the kernel work happens in our syscalls,
except for the ``conntrack`` subprocesses). The host is shared: repeat runs and compare
ratios rather than absolute figures.
"""

from __future__ import annotations

import argparse
import gc
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from bench.decode import measure_decode, split_messages
from integration.netns.capture import EVENT, load
from integration.netns.lab import Netns, lab
from replicator import ctnetlink, inject
from replicator.kernel_linux import RECV_BYTES, dump
from replicator.model import AF_INET, IPPROTO_TCP, CtTuple, Entry, Status, TcpFlag, TcpInfo
from replicator.netlink import NETLINK_NETFILTER
from replicator.netns import entered

CAPTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "ctnetlink.bin"
SERVER = bytes([192, 0, 2, 10])
PORTS_PER_VIP = 60000


def nat_entries(n: int) -> list[Entry]:
    """``n`` established, masqueraded TCP entries with distinct original *and* reply
    tuples (reused translated tuples would clash: EEXIST)."""
    status = int(Status.SEEN_REPLY | Status.ASSURED | Status.CONFIRMED)
    flags = int(TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM)
    tcp = TcpInfo(3, 7, 7, flags, flags)
    out = []
    for i in range(n):
        client = bytes([10, (i >> 16) & 255, (i >> 8) & 255, i & 255])
        vip = bytes([198, 51, 100, 1 + i // PORTS_PER_VIP])
        port = 1024 + i % PORTS_PER_VIP
        out.append(Entry(AF_INET, CtTuple(client, SERVER, IPPROTO_TCP, 40000, 443),
                         CtTuple(SERVER, vip, IPPROTO_TCP, 443, port),
                         status=status, timeout=3600, mark=0, tcp=tcp))
    return out


def emit(name: str, value: float) -> None:
    """One ``name=value`` line."""
    print(f"{name}={value:.6g}", flush=True)


class Timing(NamedTuple):
    """Wall-clock seconds, and CPU seconds of this process and its finished children
    (the kernel's netlink work runs in our syscalls, so it counts as our system time)."""

    wall: float
    cpu: float


def _cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object]) -> Timing:
    """Run ``fn`` once and time it."""
    wall, cpu = time.perf_counter(), _cpu()
    fn()
    return Timing(time.perf_counter() - wall, _cpu() - cpu)


def emit_rate(name: str, count: int, timing: Timing) -> None:
    """``<name>_per_s`` (wall clock) and ``<name>_per_cpu_s`` (the figure that a busy,
    shared host disturbs least)."""
    emit(f"{name}_per_s", count / timing.wall)
    emit(f"{name}_per_cpu_s", count / timing.cpu)


def bench_decode() -> None:
    messages = split_messages([d for kind, d in load(CAPTURE) if kind == EVENT])
    result = measure_decode(messages)
    emit("decode_messages", len(messages))
    # measure_decode counts CPU time, like the *_per_cpu_s figures below.
    emit("decode_own_msgs_per_cpu_s", result["own_msgs_per_s"])
    emit("decode_pyroute2_msgs_per_cpu_s", result["pyroute2_msgs_per_s"])
    emit("decode_speedup", result["speedup"])


def bench_encode(entries: Sequence[Entry]) -> None:
    encode = ctnetlink.encode_create
    emit_rate("encode_create_entries", len(entries),
              timed(lambda: [encode(e, i) for i, e in enumerate(entries)]))


def injector(ns: Netns) -> socket.socket:
    with entered(ns.name):
        return inject.open_socket()


def bench_batched(ns: Netns, entries: Sequence[Entry]) -> None:
    def write() -> None:
        result = trio.run(inject.upsert, sock, entries)
        if result != (len(entries), []):
            raise RuntimeError(f"batched upsert failed: {result}")

    with injector(ns) as sock:
        emit_rate("inject_batched_entries", len(entries), timed(write))
        # The same entries again: every create answers EEXIST and becomes an update.
        emit_rate("inject_batched_existing_entries", len(entries), timed(write))


def bench_one_at_a_time(ns: Netns, entries: Sequence[Entry]) -> None:
    """conntrackd's way: build one message, send it, wait for its ACK, next."""
    encode, parse = ctnetlink.encode_create, ctnetlink.parse_acks

    def write_all() -> None:
        buf = bytearray(4096)
        for seq, entry in enumerate(entries, 1):
            sock.send(encode(entry, seq, ack=True))
            n = sock.recv_into(buf)
            if parse(memoryview(buf)[:n]) != [(seq, 0)]:
                raise RuntimeError(f"one-at-a-time create {seq} failed")

    with injector(ns) as sock:
        sock.setblocking(True)
        emit_rate("inject_one_at_a_time_entries", len(entries), timed(write_all))


def bench_kernel_share(batched_ns: Netns, single_ns: Netns, entries: Sequence[Entry]) -> None:
    """The same two ways with every message built beforehand: the kernel's (and the
    syscalls') share of the figures above."""
    parse = ctnetlink.parse_acks
    batches = list(inject.plan_batches(inject.Op.CREATE, entries, ctnetlink.encode_create, 1))
    messages = [ctnetlink.encode_create(e, seq, ack=True) for seq, e in enumerate(entries, 1)]
    buf = bytearray(65536)

    def send_batches() -> None:
        for batch in batches:
            sock.send(batch.datagram)
            n = sock.recv_into(buf)  # no errors, so the only reply is the final ACK
            if parse(memoryview(buf)[:n]) != [(batch.last_seq, 0)]:
                raise RuntimeError("pre-encoded batched create failed")

    def send_one_by_one() -> None:
        for seq, message in enumerate(messages, 1):
            sock.send(message)
            n = sock.recv_into(buf)
            if parse(memoryview(buf)[:n]) != [(seq, 0)]:
                raise RuntimeError(f"pre-encoded create {seq} failed")

    for ns, name, write in ((batched_ns, "batched", send_batches),
                            (single_ns, "one_at_a_time", send_one_by_one)):
        with injector(ns) as sock:
            sock.setblocking(True)
            emit_rate(f"inject_preencoded_{name}_entries", len(entries), timed(write))


def _addr(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, raw)


def bench_cli(ns: Netns, entries: Sequence[Entry]) -> None:
    """A shell loop of ``conntrack -I`` inside the namespace (one process per entry)."""
    lines = [
        f"conntrack -I -p tcp -s {_addr(e.orig.src)} -d {_addr(e.orig.dst)} "
        f"--sport {e.orig.sport} --dport {e.orig.dport} --state ESTABLISHED -t 3600 "
        f"-u SEEN_REPLY,ASSURED --src-nat {_addr(e.reply.dst)}:{e.reply.dport} 2>/dev/null"
        for e in entries
    ]
    script = "\n".join(lines) + "\n"
    timing = timed(lambda: ns.run(["sh", "-e"], input=script, timeout=600))
    emit("inject_conntrack_cli_sample", len(entries))
    emit_rate("inject_conntrack_cli_entries", len(entries), timing)


def dump_datagrams(ns: Netns) -> list[bytes]:
    """The raw datagrams of one dump of ``ns``'s table."""
    with entered(ns.name):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    datagrams = []
    with sock:
        sock.bind((0, 0))
        sock.send(ctnetlink.encode_dump_request(1))
        done = False
        while not done:
            datagrams.append(sock.recv(RECV_BYTES))
            done = ctnetlink.decode_dump(datagrams[-1])[1]
    return datagrams


def decode_all(datagrams: Sequence[bytes]) -> int:
    """Decode dump datagrams with the collector paused (as ``dump`` does): entry count."""
    decode = ctnetlink.decode_dump
    enabled = gc.isenabled()
    gc.disable()
    try:
        return sum(len(decode(d)[0]) for d in datagrams)
    finally:
        if enabled:
            gc.enable()


def bench_dump(ns: Netns, expected: int) -> None:
    entries: list[Entry] = []
    own = timed(lambda: entries.extend(trio.run(dump, ns.name)))
    if len(entries) != expected:
        raise RuntimeError(f"dump returned {len(entries)} entries, expected {expected}")
    datagrams = dump_datagrams(ns)
    decoded: list[int] = []
    decoding = timed(lambda: decoded.append(decode_all(datagrams)))
    if decoded != [expected]:
        raise RuntimeError(f"decoding the dump gave {decoded} entries, expected {expected}")
    cli = timed(lambda: subprocess.run(ns.argv(["conntrack", "-L"]), check=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    emit("dump_entries", expected)
    emit("dump_own_seconds", own.wall)
    emit("dump_own_cpu_seconds", own.cpu)
    emit("dump_datagrams", len(datagrams))
    emit("dump_decode_cpu_seconds", decoding.cpu)
    emit("dump_decode_us_per_entry", decoding.cpu / expected * 1e6)
    emit("dump_conntrack_L_seconds", cli.wall)
    emit("dump_conntrack_L_cpu_seconds", cli.cpu)
    emit("dump_own_vs_conntrack_L", own.wall / cli.wall)
    emit("dump_own_vs_conntrack_L_cpu", own.cpu / cli.cpu)


def main(argv: Sequence[str] | None = None) -> None:
    """Run every benchmark (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--cli-sample", type=int, default=1000)
    args = parser.parse_args(argv)
    entries = nat_entries(args.entries)
    bench_decode()
    bench_encode(entries)
    with lab("bk") as the_lab:
        batched = the_lab.netns("batched")
        emit("inject_entries", len(entries))
        bench_batched(batched, entries)
        bench_one_at_a_time(the_lab.netns("single"), entries)
        bench_kernel_share(the_lab.netns("prebatched"), the_lab.netns("presingle"), entries)
        bench_cli(the_lab.netns("cli"), entries[: args.cli_sample])
        bench_dump(batched, len(entries))


if __name__ == "__main__":
    main()

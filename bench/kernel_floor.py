"""The kernel's own time for a commit's creates, with and without another namespace's
entries in the host's table.

``.venv/bin/python bench/kernel_floor.py [--entries 100000] [--runs 3]`` (root; it
creates two namespaces of its own and removes them) prints ``name=value`` lines: the
seconds the kernel takes for ``--entries`` creates sent from one socket in 256 KiB
datagrams (what ``kernel_n<N>_create_s`` of ``bench/sync.py`` measures), into a fresh
namespace

* ``empty_none_s`` / ``empty_destroy_s``: with no other entry on the host, and no
  event listener / one socket in the DESTROY group (a replicator commit's state);
* ``loaded_none_s`` / ``loaded_destroy_s``: the same while another namespace holds
  ``--entries`` entries, as the active's namespace does when ``bench/sync.py``
  measures its floor and both systems' commits (the conntrack hash table is one for
  all namespaces).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sync import emit, flush, inject, kernel_count
from integration.netns.lab import Netns, lab
from integration.netns.pair import synthetic
from replicator import ctnetlink
from replicator import inject as injection
from replicator.kernel_linux import NETLINK_ADD_MEMBERSHIP, NFNLGRP_CONNTRACK_DESTROY, SOL_NETLINK
from replicator.netlink import NETLINK_NETFILTER
from replicator.netns import entered


def creates(ns: Netns, batches: list[injection.Batch], groups: tuple[int, ...]) -> float:
    """Seconds for ``batches`` of creates into the (flushed) table of ``ns``, with a
    socket listening to ``groups``; every entry must be created."""
    flush(ns)
    with entered(ns.name):
        listener = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock = injection.open_socket()
    buf = bytearray(1 << 16)
    with listener, sock:
        listener.bind((0, 0))
        for group in groups:
            listener.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        sock.setblocking(True)
        t0 = time.perf_counter()
        for batch in batches:
            sock.send(batch.datagram)
            got = sock.recv_into(buf)  # errors only, and the datagram's final ACK
            if ctnetlink.parse_acks(memoryview(buf)[:got]) != [(batch.last_seq, 0)]:
                raise RuntimeError("a create failed")
        seconds = time.perf_counter() - t0
    if kernel_count(ns) != sum(len(b.entries) for b in batches):
        raise RuntimeError("not every entry was created")
    return seconds


def main() -> None:
    """Measure (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    entries = synthetic(0, args.entries, timeout=600)
    batches = list(injection.plan_batches(
        injection.Op.CREATE, entries, ctnetlink.encode_create, 1))
    listeners = {"none": (), "destroy": (NFNLGRP_CONNTRACK_DESTROY,)}
    with lab("kf") as the_lab:
        other, target = the_lab.netns("a"), the_lab.netns("b")
        for _ in range(args.runs):
            for host in ("empty", "loaded"):
                flush(other)
                if host == "loaded":
                    inject(other, entries)
                for name, groups in listeners.items():
                    emit(f"{host}_{name}_s", creates(target, batches, groups))
            flush(other)
        flush(target)


if __name__ == "__main__":
    main()

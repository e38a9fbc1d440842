"""A burst's path through both nodes in one process, step by step, on real kernel events.

``.venv/bin/python bench/burst.py [--entries 100000] [--batch 500] [--runs 3]`` (root:
it creates a namespace of its own and removes it) writes ``--entries`` NAT'd TCP
entries into a fresh namespace with the batched injector while a socket listens to
every conntrack group, keeps the NEW events the kernel sent (a real burst's
datagrams), and then, ``--runs`` times, takes them through what the two daemons do with
them, ``--batch`` datagrams at a time (a read of the event socket), with no socket and
no TLS: the active's decoding (``ctnetlink.decode_new_records``), internal cache
(``InternalCache.apply_batch``), table (``SyncSession.local_changes``, with the bench's
filter: the sync link's addresses and loopback ignored) and sending
(``frames_to_send``: the CHANGES messages), then the standby's ``receive`` of them and
the acknowledgements back. It prints ``name=value`` lines: microseconds per event of
each step (``decode_us``, ``cache_us``, ``table_us``, ``send_us``: the active;
``receive_us``: the standby, acknowledgements included) and ``active_us``, their sum on
the active's side. One core, no waiting: the Python work per event, not the daemons'
wall time (``bench/sync.py``).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sync_core import pump
from integration.netns.lab import lab
from integration.netns.pair import synthetic
from replicator import ctnetlink
from replicator import inject as injection
from replicator.cache import InternalCache
from replicator.daemon import GC_THRESHOLD
from replicator.filters import build_filter
from replicator.kernel import AnyEvent
from replicator.netlink import NETLINK_NETFILTER
from replicator.netns import entered
from replicator.sync import SyncParams, SyncSession

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
#: The ctnetlink groups NEW, UPDATE and DESTROY.
GROUPS = (1, 2, 3)
#: What the bench's daemons ignore (bench/sync.py: the sync link and loopback).
IGNORED = ("10.200.0.1/32", "10.200.0.2/32", "127.0.0.0/8")
#: The time passed to both sessions (nothing here waits).
NOW = 1.0


def capture(entries: int) -> list[bytes]:
    """The NEW event datagrams of ``entries`` entries written into a fresh namespace."""
    with lab("bb") as the_lab:
        ns = the_lab.netns("a")
        with entered(ns.name):
            listener = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            writer = injection.open_socket()
        with listener, writer:
            listener.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 30)
            listener.bind((0, 0))
            for group in GROUPS:
                listener.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
            listener.setblocking(False)
            writer.setblocking(True)
            buf = bytearray(1 << 16)
            written = synthetic(0, entries, timeout=600)
            for batch in injection.plan_batches(injection.Op.CREATE, written,
                                                ctnetlink.encode_create, 1):
                writer.send(batch.datagram)
                writer.recv_into(buf)
            out: list[bytes] = []
            try:
                while True:
                    out.append(listener.recv(1 << 16))
            except BlockingIOError:
                pass
    if len(out) != entries:
        raise RuntimeError(f"captured {len(out)} events of {entries}")
    return out


def decode(datagrams: Sequence[bytes]) -> list[AnyEvent]:
    """The events of one read, as the daemon's event reader decodes them
    (``EventSubscription._decode_records``): by column where
    ``ctnetlink.decode_new_records`` can (a read of at least 32 of one size), the rest
    one datagram at a time."""
    out: list[AnyEvent] = []
    for data, made in zip(datagrams, ctnetlink.decode_new_records(datagrams, NOW),
                          strict=True):
        if made is None:
            out += ctnetlink.decode_events_records(data, NOW)
        else:
            out.append(made)
    return out


def run(datagrams: Sequence[bytes], batch: int) -> dict[str, float]:
    """Seconds of each step for all of ``datagrams`` (see the module doc)."""
    accept = build_filter(ignore_prefixes=[ipaddress.ip_network(n) for n in IGNORED])
    cache = InternalCache()
    params = SyncParams(anti_entropy_interval=None)
    active = SyncSession("a", 1, params=params, accept=accept, restamped=cache.restamp)
    standby = SyncSession("b", 2, params=params)
    active.connection_made(NOW)
    standby.connection_made(NOW)
    pump(active, standby, NOW)
    spent = dict.fromkeys(("decode", "cache", "table", "send", "receive"), 0.0)
    clock = time.perf_counter
    for start in range(0, len(datagrams), batch):
        t0 = clock()
        events = decode(datagrams[start:start + batch])
        t1 = clock()
        changes, _echoes = cache.apply_batch(events, NOW)
        t2 = clock()
        active.local_changes(changes, NOW)
        t3 = clock()
        frames = active.frames_to_send(NOW)
        t4 = clock()
        spent["decode"] += t1 - t0
        spent["cache"] += t2 - t1
        spent["table"] += t3 - t2
        spent["send"] += t4 - t3
        while frames:
            t0 = clock()
            for payload in frames:
                standby.receive(payload, NOW)
            list(standby.events())
            acks = standby.frames_to_send(NOW)
            t1 = clock()
            for payload in acks:
                active.receive(payload, NOW)
            list(active.events())
            frames = active.frames_to_send(NOW)
            spent["receive"] += t1 - t0
            spent["send"] += clock() - t1
    pump(active, standby, NOW)
    if len(standby.external) != len(datagrams):
        raise RuntimeError(f"the standby holds {len(standby.external)} of {len(datagrams)}")
    return spent


def main() -> None:
    """Capture, then time each step (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    datagrams = capture(args.entries)
    gc.set_threshold(GC_THRESHOLD, 20, 20)  # as the daemon does
    n = len(datagrams)
    for _ in range(args.runs):
        spent = run(datagrams, args.batch)
        us = {name: seconds * 1e6 / n for name, seconds in spent.items()}
        for name, value in us.items():
            print(f"{name}_us={value:.2f}")
        print(f"active_us={us['decode'] + us['cache'] + us['table'] + us['send']:.2f}",
              flush=True)


if __name__ == "__main__":
    main()

"""Soak: a steady event load on a running pair for a long time (``make soak``).

A hot-mode pair (:mod:`integration.netns.pair`) is loaded with ``--table`` entries,
then the active's table churns at a steady rate: every second ``--rate`` entries are
created, as many of the oldest are deleted (the table stays at ``--table`` entries)
and ``--rate`` existing entries are updated (a new mark). Every ``--check-every``
seconds the load pauses, the standby must converge to the active exactly (external
cache and kernel, see :func:`~integration.netns.pair.converge`), and both daemons'
RSS is sampled.

Prints ``name=value`` lines per checkpoint and a summary; exits 1 if the copies ever
diverged (no convergence within ``--converge-timeout``) or if a daemon's RSS grew by
more than ``--rss-slack`` over the second half of the run (``--warmup-fraction``):
memory must stay flat under a steady load once the allocator has warmed up (under
churn the active's RSS rose by about 37 MB over the first 3 minutes, then held).

Run as root: ``.venv/bin/python bench/soak.py --duration 1800``.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from bench.resources import rss_bytes
from integration.netns import pair as P
from integration.netns.lab import Netns, lab
from replicator.kernel_linux import LinuxKernel


async def churn(ns: Netns, nxt: int, *, table: int, rate: int, seconds: float) -> int:
    """``seconds`` of steady churn at ``rate`` per second on a table holding entries
    ``nxt - table .. nxt - 1``: create the next ``rate``, delete the oldest ``rate``,
    update (new mark) the ``rate`` created just before. Returns the new ``nxt``."""
    start = time.monotonic()
    tick = 0
    async with LinuxKernel(ns.name) as kernel:
        while time.monotonic() - start < seconds:
            updated = [e._replace(mark=tick % 1000 + 1) for e in P.synthetic(nxt - rate, rate)]
            results = [
                await kernel.upsert(P.synthetic(nxt, rate)),
                await kernel.delete(P.synthetic(nxt - table, rate)),
                await kernel.upsert(updated),
            ]
            for result in results:
                if result.errors:
                    raise RuntimeError(f"load failed: {result.errors[:3]}")
            nxt += rate
            tick += 1
            await trio.sleep(max(0.0, start + tick - time.monotonic()))
    return nxt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--rate", type=int, default=1000,
                        help="creates (and deletes, and updates) per second")
    parser.add_argument("--table", type=int, default=50_000, help="steady table size")
    parser.add_argument("--check-every", type=float, default=60.0)
    parser.add_argument("--converge-timeout", type=float, default=120.0)
    parser.add_argument("--rss-slack", type=int, default=16 << 20,
                        help="allowed RSS growth (bytes) over the measured part of the run")
    parser.add_argument("--warmup-fraction", type=float, default=0.5,
                        help="RSS growth is measured from the first checkpoint after this "
                             "fraction of the duration (the allocator's warm-up under churn "
                             "took about 3 minutes) to the end")
    args = parser.parse_args(argv)
    if args.table < 2 * args.rate:
        parser.error("--table must be at least twice --rate")
    # Each churn period of s seconds takes at most ceil(s) ticks of --rate new entries.
    ticks = args.duration + math.ceil(args.duration / args.check_every)
    if args.table + args.rate * ticks > P.SYNTH_LIMIT:
        parser.error(f"--duration too long: the run would need more than {P.SYNTH_LIMIT} "
                     "distinct entries")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = True
    with lab("sk") as the_lab, TemporaryDirectory(prefix="replicator-soak-") as tmp:
        pair = P.make_pair(the_lab, Path(tmp))
        # The steady table first, so that memory is compared at a constant size.
        P.Writer(pair.active.ns).upsert(P.synthetic(0, args.table))
        P.converge(pair, args.converge_timeout, "filling the table")
        first_rss: dict[str, int] = {}
        last_rss: dict[str, int] = {}
        nxt = args.table
        start = time.monotonic()
        checkpoint = 0
        while time.monotonic() - start < args.duration:
            seconds = min(args.check_every, args.duration - (time.monotonic() - start))
            nxt = trio.run(partial(churn, pair.active.ns, nxt, table=args.table,
                                   rate=args.rate, seconds=seconds))
            checkpoint += 1
            try:
                converged = P.converge(pair, args.converge_timeout, f"checkpoint {checkpoint}")
            except AssertionError as exc:
                print(f"checkpoint_{checkpoint}_diverged={exc}".splitlines()[0])
                ok = False
                break
            last_rss = {n.spec.name: rss_bytes(n.proc.pid) for n in pair.nodes if n.proc}
            if not first_rss and time.monotonic() - start >= args.warmup_fraction * args.duration:
                first_rss = dict(last_rss)
            print(f"checkpoint_{checkpoint}_elapsed_seconds={time.monotonic() - start:.0f} "
                  f"converge_seconds={converged:.2f} entries_created={nxt} "
                  + " ".join(f"{name}_rss_bytes={rss}" for name, rss in last_rss.items()),
                  flush=True)
        print(f"checkpoints={checkpoint}")
        print(f"events_per_second={3 * args.rate}")
        print(f"divergence={'none' if ok else 'yes'}")
        for name, rss in last_rss.items():
            growth = rss - first_rss.get(name, rss)
            print(f"{name}_rss_growth_bytes={growth}")
            if growth > args.rss_slack:
                ok = False
        print(f"result={'ok' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

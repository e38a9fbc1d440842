"""Lag floor: how close behind the active a hot standby's kernel is kept by the
project's own parts alone, without the daemon around them.

``.venv/bin/python bench/sync.py --sizes '' --modes hot --floor`` adds this pipeline,
as a third system named ``floor``, to the hot lag runs of ``bench/sync.py``: the same
namespaces, generator, kernel stamps and figures as replicator's and conntrackd's, in
the same invocation (``floor_lag<R>_hot_entry_p50_s`` and so on). It is a pipeline of
the parts a hot standby's entries go through and nothing else:

* active: the kernel port's event subscription (:meth:`LinuxKernel.subscribe`, records
  mode: the daemon's reads and decoder), each batch sent at once as one frame
  (:mod:`replicator.framing`) of a msgpack list of the entries' bodies and remaining
  timeouts (:mod:`replicator.record`; what the daemon's wire carries), on a ``trio.SSLStream``
  with the daemon's TLS contexts (:mod:`replicator.tlsctx`, keys made by
  :mod:`replicator.keys`);
* standby: each frame's entries made records (:func:`replicator.record.from_bodies`)
  and written with :meth:`LinuxKernel.upsert_records`, as the daemon's writer does, in
  the task that received them.

Left out, on purpose: the sync session (sequence numbers, acknowledgements, the pending
set, the digest buckets, validation of what arrives), the internal and external caches,
the filters, the daemon's tasks and the hand-offs between them. It replicates new
entries only (one-shot, no reconnection, no resync): a measuring instrument, not a
daemon.

What it is for: the floor's lag next to replicator's is what the layers left out cost;
next to conntrackd's, how close this stack (Python, trio, TLS, msgpack, the project's
kernel port) can come at all.
"""

from __future__ import annotations

import argparse
import datetime
import ssl
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack
import trio

from bench.sync import SYNC_B, System
from integration.netns.lab import Lab, Netns
from replicator.daemon import DEFAULT_COMMIT_TIMEOUT
from replicator.framing import FrameDecoder, encode_frame
from replicator.kernel import Overrun
from replicator.kernel_linux import LinuxKernel
from replicator.keys import generate_identity, write_identity
from replicator.model import NewRecord
from replicator.record import body, from_bodies, timeout
from replicator.tlsctx import load_credentials

PORT = 7999
MAX_FRAME = 1 << 24


def _credentials(workdir: Path, me: str, peer: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    creds = load_credentials(workdir / f"{me}.key", workdir / f"{me}.crt",
                             [workdir / f"{peer}.crt"])
    return creds.client, creds.server


async def _active(workdir: Path, peer: str) -> None:
    client, _ = _credentials(workdir, "a", "b")
    async with LinuxKernel() as kernel:
        subscription = kernel.subscribe()
        subscription.records = True
        for _ in range(200):
            try:
                tcp = await trio.open_tcp_stream(peer, PORT)
                break
            except OSError:
                await trio.sleep(0.05)
        else:
            raise SystemExit(f"lag floor: the standby at {peer} cannot be reached")
        stream = trio.SSLStream(tcp, client)
        await stream.do_handshake()
        print("ready", flush=True)
        async for batch in subscription:
            if isinstance(batch, Overrun):
                raise SystemExit(f"lag floor: events lost ({batch})")
            # Each entry as the daemon's wire carries it: its body and the time it has
            # left (a deadline means nothing on the other node's clock).
            entries = [(body(e.record), timeout(e.record)) for e in batch
                       if isinstance(e, NewRecord)]
            if entries:
                await stream.send_all(encode_frame(msgpack.packb(entries), MAX_FRAME))


async def _standby(workdir: Path, host: str) -> None:
    _, server = _credentials(workdir, "b", "a")
    async with LinuxKernel() as kernel:
        listeners = await trio.open_tcp_listeners(PORT, host=host)
        tcp = await listeners[0].accept()
        stream = trio.SSLStream(tcp, server, server_side=True)
        await stream.do_handshake()
        decoder = FrameDecoder(MAX_FRAME)
        while data := await stream.receive_some(1 << 18):
            for payload in decoder.feed(data):
                now = trio.current_time()
                result = await kernel.upsert_records(
                    from_bodies(msgpack.unpackb(payload), now), now,
                    no_timeout=DEFAULT_COMMIT_TIMEOUT)
                if result.errors:
                    raise SystemExit(f"lag floor: {len(result.errors)} writes refused")


class Floor(System):
    """The floor pipeline (see the module doc) as a system of ``bench/sync.py``: hot
    mode only, no external cache, no commit."""

    name = "floor"

    def __init__(self, the_lab: Lab, a: Netns, b: Netns, workdir: Path) -> None:
        super().__init__(b, hot=True)
        self.lab, self.active = the_lab, a
        self.workdir = workdir / "floor"
        self.workdir.mkdir()
        now = datetime.datetime.now(datetime.UTC)
        for name in ("a", "b"):
            write_identity(generate_identity(name, now), self.workdir / f"{name}.key",
                           self.workdir / f"{name}.crt")
        #: (active, standby) while running.
        self.procs: tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]] | None = None

    def _spawn(self, ns: Netns, role: str) -> subprocess.Popen[bytes]:
        return self.lab.spawn(ns, [sys.executable, str(Path(__file__).resolve()),
                                   "--role", role, "--dir", str(self.workdir),
                                   "--peer", SYNC_B], stdout=subprocess.PIPE)

    def start(self) -> None:
        standby = self._spawn(self.standby, "standby")  # listening before the dial
        active = self._spawn(self.active, "active")
        self.procs = (active, standby)
        assert active.stdout is not None
        if active.stdout.readline().strip() != b"ready":
            raise RuntimeError("lag floor: the active side did not connect")

    def pids(self) -> tuple[int, int]:
        assert self.procs is not None
        active, standby = self.procs
        return active.pid, standby.pid

    def external_count(self) -> int:
        raise NotImplementedError("the floor has no external cache (hot mode only)")

    def commit(self) -> None:
        raise NotImplementedError("the floor has no external cache (hot mode only)")

    def kill_active(self) -> None:
        if self.procs is not None:
            self.procs[0].kill()

    def stop(self) -> None:
        for proc in self.procs or ():
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs = None

    def diagnostics(self) -> dict[str, float]:
        return {}


def main(argv: Sequence[str] | None = None) -> None:
    """One side of the floor pipeline (started by :class:`Floor`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=("active", "standby"), required=True)
    parser.add_argument("--dir", required=True, help="the two nodes' keys")
    parser.add_argument("--peer", required=True,
                        help="the standby's address: the active dials it, the standby "
                             "listens on it")
    args = parser.parse_args(argv)
    if args.role == "active":
        trio.run(_active, Path(args.dir), args.peer)
    else:
        trio.run(_standby, Path(args.dir), args.peer)


if __name__ == "__main__":
    main()

"""Valid inputs for every fuzz target, built from the real encoders and real traffic.

Mutating valid inputs reaches the deep parts of a decoder (an entry's optional
fields, a SUMMARY's bucket checks) that random bytes never get past the first length
check to. The sources: ``tests/data/ctnetlink.bin`` (datagrams captured from a real
kernel: NAT, helpers with masters, labels, zones, SCTP, IPv6), messages encoded by
:mod:`replicator.wire` and the framing layer, transcripts of a real peer session
(:class:`replicator.sync.SyncSession` talking to another one), control requests and
responses from :mod:`replicator.control`, keepalived FIFO lines, ``etc/replicator.toml``.

Every function returns a list of byte strings; :data:`SEEDS` maps target names to them.
"""

from __future__ import annotations

import functools
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path

from integration.netns.capture import DUMP, load
from replicator import control, wire
from replicator import ctnetlink as ct
from replicator.control import Command, Response
from replicator.framing import DEFAULT_MAX_FRAME_SIZE, encode_frame, encode_preamble
from replicator.model import Entry
from replicator.netlink import NLMSG_DONE, NLMSG_ERROR, NLMSG_HDR
from replicator.sync import SyncSession

from .targets import (
    FRAME_BOUNDS,
    SYNC_PARAMS,
    SYNC_PEER,
    SYNC_SEPARATOR,
    SYNC_STEP,
    new_sync_session,
    sync_step,
)

ROOT = Path(__file__).resolve().parent.parent
CAPTURE = ROOT / "tests" / "data" / "ctnetlink.bin"
EXAMPLE_CONFIG = ROOT / "etc" / "replicator.toml"


@functools.cache
def captured_datagrams() -> tuple[bytes, ...]:
    """Every datagram of the kernel capture, events and dump replies."""
    return tuple(datagram for _kind, datagram in load(CAPTURE))


@functools.cache
def captured_entries() -> tuple[Entry, ...]:
    """The full entries of the capture's dump: every flavour the kernel produced."""
    entries: list[Entry] = []
    for kind, datagram in load(CAPTURE):
        if kind == DUMP:
            entries += ct.decode_dump(datagram)[0]
    return tuple(entries)


def _timed(entries: tuple[Entry, ...]) -> list[tuple[Entry, int | None]]:
    return [(e, e.timeout) for e in entries]


# --- ctnetlink ----------------------------------------------------------------------


def _nlmsg(mtype: int, seq: int, payload: bytes) -> bytes:
    return NLMSG_HDR.pack(16 + len(payload), mtype, 0, seq, 0) + payload


def ctnetlink_seeds() -> list[bytes]:
    """Captured datagrams, this node's own requests, ACKs, errors and DONE messages."""
    seeds = list(captured_datagrams())
    for i, entry in enumerate(captured_entries()):
        if entry.timeout is not None:
            seeds.append(ct.encode_create(entry, i, ack=True))
        seeds.append(ct.encode_update(entry, i) + ct.encode_delete(entry, i))
    errno = struct.Struct("=i")
    acks = [_nlmsg(NLMSG_ERROR, seq, errno.pack(-err) + bytes(16)) for seq, err in
            ((1, 0), (2, 17), (3, 2), (4, 105))]  # fmt: skip
    seeds.append(b"".join(acks))
    seeds.append(_nlmsg(NLMSG_DONE, 9, errno.pack(0)))
    seeds.append(_nlmsg(NLMSG_DONE, 9, errno.pack(-4)))
    seeds.append(ct.encode_dump_request(5))
    return seeds


# --- wire ---------------------------------------------------------------------------


def wire_seeds() -> list[bytes]:
    """One encoded message of every type, and CHANGES/BUCKETS of real entries."""
    entries = captured_entries()
    seeds = [
        wire.encode(wire.Hello(wire.PROTOCOL_VERSION, SYNC_PEER, 7, 4096, 3)),
        wire.encode(wire.Close("resync failed: peer went away")),
        wire.encode(wire.Ack(3, 12, False, 1_764_000_000)),
        wire.encode(wire.Ack(3, 12, True)),
        wire.encode(wire.ResyncBegin(3, 0, 1, False)),
        wire.encode(wire.Summary(3, 1, 1, 0, bytes(range(8)) * 16)),
        wire.encode(wire.ResyncDone(3, 2, 1)),
        wire.encode(wire.ResyncRequest(3, 3, True)),
    ]
    for start in range(0, len(entries), 6):
        batch = entries[start : start + 6]
        seeds.append(wire.encode_changes(3, 4 + start, _timed(batch), [e.key for e in batch[:2]],
                                          sent=1_764_000_000 + start))
        seeds.append(wire.encode_buckets(
            3, 5 + start, [(start % 16, True, False, _timed(batch[:3])),
                           (start % 16 + 1, False, True, _timed(batch[3:]))],
            sent=start))  # fmt: skip
    # A burst: 40 entries of one shape, whose bodies the decoder checks by byte column
    # (record.check_bodies), and the same mixed with the captured ones.
    burst = [e._replace(orig=e.orig._replace(sport=(e.orig.sport + i) % 65536))
             for i, e in enumerate([entries[0]] * 40)]
    seeds.append(wire.encode_changes(3, 100, _timed(tuple(burst)), [], sent=0))
    seeds.append(wire.encode_changes(3, 101, _timed(tuple(burst) + entries), [], sent=0))
    return seeds


# --- framing ------------------------------------------------------------------------


def framing_seeds() -> list[bytes]:
    """Preambles, then frame streams of real messages under every bound and chunk size."""
    messages = wire_seeds()
    seeds = [encode_preamble(), encode_preamble(2) + encode_frame(messages[0])]
    for index, bound in enumerate(FRAME_BOUNDS):
        fitting = [m for m in messages if len(m) <= bound] or [b""]
        stream = b"".join(encode_frame(m, bound) for m in fitting[:6])
        for step in (0, 7, 60):
            seeds.append(bytes([index << 6 | step]) + stream)
    seeds.append(bytes([3 << 6]) + struct.pack(">I", DEFAULT_MAX_FRAME_SIZE + 1))
    return seeds


# --- sync session -------------------------------------------------------------------


def _transcript(script: Callable[[SyncSession, float], None], *, drop_every: int = 0) -> bytes:
    """What a real peer sends to a session like the fuzzed one, one frame per step.

    The fuzzed node's session (:func:`fuzz.targets.new_sync_session`, driven by
    :func:`fuzz.targets.sync_step` exactly as the target drives it) talks to a peer
    session with a table of captured entries. The link delivers at most one frame of
    the peer per :data:`SYNC_STEP` (so the target replays the transcript at the same
    times, and the session answers the same way); ``script(peer, now)`` runs at every
    step (local changes, resync requests); with ``drop_every`` the link loses every
    n-th frame of the peer (NACKs, go-back, resends).
    """
    ours = new_sync_session()
    peer = SyncSession(SYNC_PEER, 7, params=SYNC_PARAMS)
    peer.local_snapshot(captured_entries()[:40], 0.0)
    peer.connection_made(0.0)
    to_peer = sync_step(ours, b"", 0.0)
    queue: deque[bytes] = deque()
    sent: list[bytes] = []
    now = 0.0
    for _step in range(80):
        now += SYNC_STEP
        for payload in to_peer:
            peer.receive(payload, now)
        script(peer, now)
        due = peer.next_timer()
        if due is not None and due <= now:
            peer.handle_timer(now)
        queue.extend(peer.frames_to_send(now))
        while peer.next_event() is not None:
            pass
        payload = queue.popleft() if queue else b""
        if drop_every and len(sent) % drop_every == drop_every - 1:
            payload = b""
        if SYNC_SEPARATOR in payload:
            raise ValueError("a transcript frame contains the separator: change the seed")
        sent.append(payload)
        to_peer = sync_step(ours, payload, now)
    return SYNC_SEPARATOR.join(sent)


def _quiet(peer: SyncSession, now: float) -> None:
    pass


def _churn(peer: SyncSession, now: float) -> None:
    entries = captured_entries()
    step = round(now / SYNC_STEP)
    if step % 5 == 0:
        entry = entries[step % len(entries)]
        peer.local_update(entry._replace(mark=step, timeout=100 + step), now)
    if step % 7 == 0:
        peer.local_delete(entries[(step * 3) % len(entries)], now)


def _operator(peer: SyncSession, now: float) -> None:
    step = round(now / SYNC_STEP)
    if step == 12:
        peer.bulk_send(now)
    if step == 20:
        peer.request_resync(now)
    _churn(peer, now)


def sync_seeds() -> list[bytes]:
    """Transcripts of a peer: plain resync, churn, operator resyncs, a lossy link."""
    return [
        _transcript(_quiet),
        _transcript(_churn),
        _transcript(_operator),
        _transcript(_churn, drop_every=5),
    ]


# --- control ------------------------------------------------------------------------

_STATUS = {
    "node": "fw-a", "role": "backup", "mode": "cache", "peer": "192.0.2.2:3790",
    "peer_up": True, "in_sync": True, "reason": "", "entries": {"internal": 3, "external": 4},
    "replication_lag_seconds": 0.25, "uptime_seconds": 12.5, "epoch": 7,
    "last_resync": {"direction": "receive", "full": False, "seconds_ago": 1.0,
                    "duration_seconds": 0.5, "entries": 10},
}  # fmt: skip
_RESULTS: dict[Command, object] = {
    Command.STATUS: _STATUS,
    Command.STATS: {"replicator_entries_internal": 3.0, "replicator_peer_up": 1},
    Command.DUMP: {"cache": "external", "entries": ["ipv4     2 tcp      6 59 ESTABLISHED"]},
    Command.COMMIT: {"applied": 4, "failed": 0, "seconds": 0.01},
    Command.FLUSH: {"count": 4, "detail": "external cache flushed"},
    Command.NOTIFY: {"verdict": "accepted", "role": "master"},
    Command.CHECK: {"ok": False, "reason": "not in sync with the peer"},
    Command.VERIFY: {"ok": True, "checked": 4, "problems": []},
}


def control_seeds() -> list[bytes]:
    """Every valid request, and a response of every result shape (and an error)."""
    args = {Command.DUMP: ["internal", "external"], Command.FLUSH: ["internal", "external"],
            Command.RESYNC: ["kernel", "peer"],
            Command.NOTIFY: ['INSTANCE "VI_1" MASTER 100', "GROUP VG_FW BACKUP 50"]}  # fmt: skip
    seeds = [control.encode_request(control.Request(command, arg))
             for command in Command for arg in args.get(command, [""])]  # fmt: skip
    seeds += [control.encode_response(Response(True, result, "")) for result in _RESULTS.values()]
    seeds.append(control.encode_response(Response(False, None, "commit failed: EPERM")))
    return seeds


# --- notify -------------------------------------------------------------------------

_FIFO_LINES = (
    b'INSTANCE "VI_1" BACKUP 100\nGROUP "VG_FW" BACKUP 0\n'
    b'INSTANCE "VI_1" MASTER 100\nGROUP "VG_FW" MASTER 0\n'
    b'GROUP "VG_FW" FAULT 0\nINSTANCE "VI_1" STOP 100\nGROUP "VG_FW" MASTER 0\n'
)


def notify_seeds() -> list[bytes]:
    """keepalived FIFO traffic, under several chunk sizes and machine settings."""
    return [bytes([selector]) + _FIFO_LINES for selector in (0, 0x23, 0x61, 0xE0, 0xFF)] + [
        b"\x05GROUP VG_FW MASTER 255\n",
        b"\x80" + b"x" * 600 + b"\nGROUP VG_FW BACKUP 1\n",
    ]


# --- config -------------------------------------------------------------------------

_MINIMAL = b"""\
[node]
name = "fw-a"

[sync]
listen_address = "2001:db8::1"
peer_address = "2001:db8::2"

[tls]
key = "/etc/replicator/tls/node.key"
cert = "/etc/replicator/tls/node.crt"
peer_certs = ["/etc/replicator/tls/peer.crt"]
peer_fingerprints = ["sha256:%s"]

[filters]
ignore_addresses = ["2001:db8::/64"]
ignore_protocols = ["icmp", 58]
tcp_states = ["SYN_SENT"]
zones = [1, 2]
mark = 0x10
mark_mask = 0xff0

[metrics]
address = "[::1]:9478"
""" % (b"ab" * 32)


def config_seeds() -> list[bytes]:
    """The example configuration and a minimal IPv6 one using the list-valued keys."""
    return [EXAMPLE_CONFIG.read_bytes(), _MINIMAL]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "framing": framing_seeds,
    "wire": wire_seeds,
    "sync_receive": sync_seeds,
    "ctnetlink": ctnetlink_seeds,
    "control": control_seeds,
    "notify": notify_seeds,
    "config": config_seeds,
}

"""Traffic and address-watch agent run *inside* lab namespaces (stdlib only).

Run as ``python agent.py <mode> ...`` via ``ip netns exec``; it imports nothing of
ours so it starts fast. Every timestamp is ``time.monotonic()``: CLOCK_MONOTONIC is
one clock for the whole machine, so the test process can compare it with its own.
Output is one JSON object per line on stdout.

``serve --bind ADDR --tcp PORT --udp PORT``
    Echo servers. Every request line ``<seq>`` is answered ``<seq> <ip>:<port>``
    where ``ip:port`` is the source address the server saw (the NAT mapping).
    Prints ``{"ready": true}`` once listening.

``drive --stream tcp:HOST:PORT:N --stream udp:HOST:PORT:N --idle HOST:PORT:N``
    Opens ``N`` streaming flows per ``--stream`` and ``N`` idle TCP connections per
    ``--idle``, proves each with one round trip, prints ``{"ready": {...}}`` and keeps
    every stream sending sequence-numbered requests, checking every reply. A TCP stream
    has one request in flight: it sends the next one ``--interval`` seconds after the
    reply. A UDP stream sends one every ``--interval`` seconds whether or not replies
    come, and counts each reply when it arrives (:meth:`Stream.reply`), so its gaps
    measure the path, not a client's retry timeout. Commands on stdin, one per line,
    one JSON answer each:
    ``probe <timeout>`` sends one request on every idle connection and checks the reply;
    ``report`` returns every stream's record; ``quit`` ends the agent.

``addrwatch``
    Prints ``{"t": ..., "op": "add"|"del", "addr": ..., "ifindex": ...}`` for every IPv4
    address change in the namespace (rtnetlink), after ``{"ready": true}``.

``neighwatch``
    Prints ``{"t": ..., "op": "add"|"del", "dst": ..., "lladdr": ...}`` for every IPv4
    neighbour (ARP) entry change in the namespace (rtnetlink), after ``{"ready": true}``.

Retransmissions: every TCP stream's socket (the requesting side, in ``drive``) and every
streaming connection of the echo server (one that echoed ``STREAMING_LINES`` lines;
idle connections echo fewer) is polled with ``TCP_INFO`` every ``RETRANS_POLL`` s; each
change of its retransmission count is recorded as ``[t, total_retrans, backoff, rto_ms]``
(in the stream's record, or printed by ``serve`` as ``{"retrans": {...}}``). The time is
when the poll saw it: up to one poll interval (plus scheduling delay) late.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import resource
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

#: How long opening (and proving) one flow may take.
OPEN_TIMEOUT = 5.0
#: How many idle connections are opened at once.
OPEN_BATCH = 200
#: A stream records every gap between two round trips longer than this (seconds).
GAP_RECORD = 0.1
#: Seconds between two TCP_INFO polls of the streaming sockets.
RETRANS_POLL = 0.01
#: An echo-server connection that echoed this many lines is a stream (idle ones echo
#: their opening request and at most one probe).
STREAMING_LINES = 3
#: struct tcp_info up to tcpi_total_retrans: 8 one-byte fields, then 24 u32 (rto first,
#: total_retrans last).
TCP_INFO = struct.Struct("=8B24I")
TCPI_BACKOFF = 4
TCPI_RTO = 8
TCPI_TOTAL_RETRANS = 8 + 23


def emit(obj: object) -> None:
    """Write one JSON line to stdout."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def raise_fd_limit() -> None:
    """Thousands of idle connections need more descriptors than the default soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- retransmissions ------------------------------------------------------------------------

def tcp_retrans(sock: Any) -> tuple[int, int, int] | None:
    """``(total_retrans, backoff, rto_ms)`` of a TCP socket (None once it is closed).

    ``sock`` is a :class:`socket.socket` or the ``TransportSocket`` asyncio hands out.
    """
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO.size)
    except OSError:
        return None
    if len(raw) < TCP_INFO.size:
        return None
    info = TCP_INFO.unpack(raw)
    return info[TCPI_TOTAL_RETRANS], info[TCPI_BACKOFF], info[TCPI_RTO] // 1000


class RetransWatch:
    """Polls registered TCP sockets; calls ``on_change`` when one's retransmission count
    changes, with the key it was registered under and ``[t, total, backoff, rto_ms]``."""

    def __init__(self, on_change: Any) -> None:
        self.on_change = on_change
        self._socks: dict[Any, tuple[Any, int]] = {}

    def add(self, key: object, sock: Any) -> None:
        """Watch ``sock`` from its current count on."""
        now = tcp_retrans(sock)
        if now is not None:
            self._socks[key] = (sock, now[0])

    def discard(self, key: object) -> None:
        """Stop watching ``key``'s socket."""
        self._socks.pop(key, None)

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(RETRANS_POLL)
            t = time.monotonic()
            for key, (sock, seen) in list(self._socks.items()):
                now = tcp_retrans(sock)
                if now is None:
                    self.discard(key)
                elif now[0] != seen:
                    self._socks[key] = (sock, now[0])
                    self.on_change(key, [t, *now])


# --- serve -------------------------------------------------------------------------------

def _emit_retrans(key: object, change: list[float]) -> None:
    local, peer = cast(tuple[str, str], key)
    emit({"retrans": {"local": local, "peer": peer, "t": change[0], "total": change[1],
                      "backoff": change[2], "rto_ms": change[3]}})


_ECHO_WATCH = RetransWatch(_emit_retrans)


async def _echo_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    local = writer.get_extra_info("sockname")
    key = (f"{local[0]}:{local[1]}", f"{peer[0]}:{peer[1]}")
    tag = f" {peer[0]}:{peer[1]}\n".encode()
    lines = 0
    with contextlib.suppress(OSError):
        while line := await reader.readline():
            writer.write(line.rstrip(b"\n") + tag)
            await writer.drain()
            lines += 1
            if lines == STREAMING_LINES:
                _ECHO_WATCH.add(key, writer.get_extra_info("socket"))
    _ECHO_WATCH.discard(key)
    writer.close()


class _EchoUdp(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data + f" {addr[0]}:{addr[1]}".encode(), addr)


async def serve(bind: str, tcp_ports: list[int], udp_ports: list[int]) -> None:
    """Run the echo servers on address ``bind`` until stdin closes."""
    loop = asyncio.get_running_loop()
    servers = [await asyncio.start_server(_echo_tcp, bind, port, backlog=4096)
               for port in tcp_ports]
    for port in udp_ports:
        await loop.create_datagram_endpoint(_EchoUdp, local_addr=(bind, port))
    watch = asyncio.create_task(_ECHO_WATCH.run())
    emit({"ready": True})
    await loop.run_in_executor(None, sys.stdin.read)
    watch.cancel()
    for server in servers:
        server.close()


# --- drive -------------------------------------------------------------------------------

@dataclass
class Stream:
    """One streaming flow's record.

    Both kinds count the same way: ``sent`` requests (sequence numbers ``0`` to
    ``sent - 1``, ``0`` the one that opened the flow), ``oks`` of them answered, each
    at most once, a round trip being the moment its reply arrived. A TCP stream has one
    request in flight; a UDP stream has as many as went unanswered, and a reply to any
    of them counts, however late: its arrival proves the flow's path (with its NAT
    mapping) works at that moment, as a TCP reply to a retransmitted request does.
    """

    kind: str
    target: str
    local: str = ""
    sent: int = 0
    oks: int = 0
    first_ok: float | None = None
    last_ok: float | None = None
    #: Longest time between two successful round trips, and the round trips around it.
    max_gap: float = 0.0
    gap_start: float | None = None
    gap_end: float | None = None
    #: Every gap longer than GAP_RECORD, as ``[last round trip, next round trip]``.
    gaps: list[tuple[float, float]] = field(default_factory=list)
    #: Longest time from sending a request to its reply.
    max_rtt: float = 0.0
    #: UDP only: replies counted although a newer request had been sent by then; replies
    #: to a request already answered (not counted); replies to no request sent, or not
    #: readable (not counted, and an error: the echo server answers every request once).
    late: int = 0
    duplicates: int = 0
    strays: int = 0
    #: TCP only: ``[t, total_retrans, backoff, rto_ms]`` at each change of the count.
    retrans: list[list[float]] = field(default_factory=list)
    #: ``[time, "ip:port"]`` whenever the address the server saw changed.
    mappings: list[tuple[float, str]] = field(default_factory=list)
    error: str | None = None
    #: UDP only: when each unanswered request was sent, by sequence number (the lost
    #: ones stay: a few per outage, for a stream that lives one drill phase).
    pending: dict[int, float] = field(default_factory=dict)

    def request(self, now: float) -> int:
        """Account for one request sent at ``now``; its sequence number."""
        seq = self.sent
        self.sent += 1
        self.pending[seq] = now
        return seq

    def ok(self, mapping: str, now: float, sent_at: float) -> None:
        """Record one successful round trip: the request sent at ``sent_at`` was answered
        at ``now`` with ``mapping`` (the address the server saw)."""
        if self.last_ok is not None:
            if now - self.last_ok > GAP_RECORD:
                self.gaps.append((self.last_ok, now))
            if now - self.last_ok > self.max_gap:
                self.max_gap = now - self.last_ok
                self.gap_start, self.gap_end = self.last_ok, now
        else:
            self.first_ok = now
        self.last_ok = now
        self.oks += 1
        self.max_rtt = max(self.max_rtt, now - sent_at)
        if not self.mappings or self.mappings[-1][1] != mapping:
            self.mappings.append((now, mapping))

    def reply(self, data: bytes, now: float) -> None:
        """Account for one UDP reply (``b"<seq> <ip>:<port>"``) that arrived at ``now``."""
        try:
            text, mapping = data.decode().split()
            seq = int(text)
        except ValueError:  # UnicodeDecodeError included
            self._stray(f"unreadable reply {data[:40]!r}")
            return
        sent_at = self.pending.pop(seq, None)
        if sent_at is None:
            if 0 <= seq < self.sent:
                self.duplicates += 1
            else:
                self._stray(f"reply to request {seq}, never sent")
            return
        if seq < self.sent - 1:
            self.late += 1
        self.ok(mapping, now, sent_at)

    def _stray(self, why: str) -> None:
        self.strays += 1
        if self.error is None:
            self.error = why

    def as_json(self) -> dict[str, Any]:
        """The record as a JSON object."""
        return {"kind": self.kind, "target": self.target, "local": self.local,
                "sent": self.sent, "oks": self.oks, "first_ok": self.first_ok,
                "last_ok": self.last_ok, "max_gap": self.max_gap,
                "gap_start": self.gap_start, "gap_end": self.gap_end, "gaps": self.gaps,
                "max_rtt": self.max_rtt, "late": self.late, "duplicates": self.duplicates,
                "strays": self.strays, "retrans": self.retrans, "mappings": self.mappings,
                "error": self.error}


def _parse_reply(line: bytes, seq: int) -> str:
    got, mapping = line.decode().split()
    if int(got) != seq:
        raise ValueError(f"reply to request {got}, expected {seq}")
    return mapping


async def _open_tcp(host: str, port: int) -> tuple[asyncio.StreamReader,
                                                   asyncio.StreamWriter, str, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), OPEN_TIMEOUT)
    local = writer.get_extra_info("sockname")
    writer.write(b"0\n")
    mapping = _parse_reply(await asyncio.wait_for(reader.readline(), OPEN_TIMEOUT), 0)
    return reader, writer, f"{local[0]}:{local[1]}", mapping


async def _run_tcp_stream(stream: Stream, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter, interval: float) -> None:
    try:
        while True:
            await asyncio.sleep(interval)
            sent_at = time.monotonic()
            seq = stream.sent
            stream.sent += 1
            writer.write(f"{seq}\n".encode())
            await writer.drain()
            line = await reader.readline()
            if not line:
                stream.error = "closed by peer"
                return
            stream.ok(_parse_reply(line, seq), time.monotonic(), sent_at)
    except (OSError, ValueError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"


class UdpClient(asyncio.DatagramProtocol):
    """One UDP stream's socket: sends its requests, counts its replies as they arrive."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.transport: asyncio.DatagramTransport | None = None
        #: Set by the first counted reply (the one that proves the flow).
        self.answered = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.stream.reply(data, time.monotonic())
        if self.stream.oks:
            self.answered.set()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. port unreachable) just mean "no reply"; the stall shows it.
        pass

    def send_request(self) -> None:
        """Send the stream's next request."""
        assert self.transport is not None, "not connected"
        seq = self.stream.request(time.monotonic())
        self.transport.sendto(str(seq).encode())


async def run_udp_stream(client: UdpClient, interval: float) -> None:
    """Send a request every ``interval`` s until cancelled, never waiting for a reply
    (``client`` counts the replies as they arrive)."""
    while True:
        await asyncio.sleep(interval)
        client.send_request()


@dataclass
class Idle:
    """One idle TCP connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    mapping: str


async def _probe(idle: Idle, patience: float) -> str:
    """One round trip on an idle connection: ``"ok"``, ``"remapped"`` or an error name."""
    try:
        idle.writer.write(b"1\n")
        await idle.writer.drain()
        line = await asyncio.wait_for(idle.reader.readline(), patience)
        if not line:
            return "closed"
        mapping = _parse_reply(line, 1)
    except TimeoutError:
        return "timeout"
    except (OSError, ValueError) as exc:
        return type(exc).__name__
    return "ok" if mapping == idle.mapping else "remapped"


def _spec(text: str, parts: int) -> list[str]:
    fields = text.split(":")
    if len(fields) != parts:
        raise SystemExit(f"bad flow spec {text!r}")
    return fields


async def drive(streams: list[str], idles: list[str], interval: float) -> None:
    """Open the flows, keep the streams going and answer commands from stdin."""
    loop = asyncio.get_running_loop()
    records: list[Stream] = []
    # Keyed by index: a Stream (a mutable dataclass) is not hashable.
    watch = RetransWatch(lambda i, change: records[i].retrans.append(change))
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(watch.run())]
    for spec in streams:
        kind, host, port, count = _spec(spec, 4)
        for _ in range(int(count)):
            stream = Stream(kind, f"{host}:{port}")
            records.append(stream)
            if kind == "tcp":
                t_open = time.monotonic()
                reader, writer, stream.local, mapping = await _open_tcp(host, int(port))
                stream.sent += 1  # request 0, sent by _open_tcp
                stream.ok(mapping, time.monotonic(), t_open)
                watch.add(len(records) - 1, writer.get_extra_info("socket"))
                tasks.append(asyncio.create_task(
                    _run_tcp_stream(stream, reader, writer, interval)))
            elif kind == "udp":
                transport, client = await loop.create_datagram_endpoint(
                    functools.partial(UdpClient, stream), remote_addr=(host, int(port)))
                local = transport.get_extra_info("sockname")
                stream.local = f"{local[0]}:{local[1]}"
                client.send_request()
                try:
                    await asyncio.wait_for(client.answered.wait(), OPEN_TIMEOUT)
                except TimeoutError:
                    raise SystemExit(f"no UDP reply from {host}:{port}") from None
                tasks.append(asyncio.create_task(run_udp_stream(client, interval)))
            else:
                raise SystemExit(f"bad flow kind {kind!r}")
    idle: list[Idle] = []
    for spec in idles:
        host, port, count = _spec(spec, 3)
        left = int(count)
        while left > 0:
            batch = min(left, OPEN_BATCH)
            opened = await asyncio.gather(*(_open_tcp(host, int(port)) for _ in range(batch)))
            idle.extend(Idle(r, w, m) for r, w, _, m in opened)
            left -= batch
    emit({"ready": {"streams": len(records), "idle": len(idle)}})
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        cmd, *args = line.split()
        if cmd == "report":
            emit({"t": time.monotonic(), "streams": [s.as_json() for s in records]})
        elif cmd == "probe":
            timeout = float(args[0])
            results = await asyncio.gather(*(_probe(i, timeout) for i in idle))
            counts: dict[str, int] = {}
            for result in results:
                counts[result] = counts.get(result, 0) + 1
            emit({"t": time.monotonic(), "total": len(idle), "results": counts})
        elif cmd == "quit":
            break
    for task in tasks:
        task.cancel()


# --- addrwatch ---------------------------------------------------------------------------

RTMGRP_IPV4_IFADDR = 0x10
RTM_NEWADDR = 20
RTM_DELADDR = 21
IFA_ADDRESS = 1
IFA_LOCAL = 2
NLMSG_HDR = struct.Struct("=LHHLL")
IFADDRMSG = struct.Struct("=BBBBL")
RTATTR = struct.Struct("=HH")


def _addresses(msg: bytes) -> tuple[int, str | None]:
    """ifindex and IFA_LOCAL (else IFA_ADDRESS) of one RTM_NEWADDR/DELADDR payload."""
    _, _, _, _, ifindex = IFADDRMSG.unpack_from(msg)
    found: dict[int, str] = {}
    pos = IFADDRMSG.size
    while pos + RTATTR.size <= len(msg):
        length, kind = RTATTR.unpack_from(msg, pos)
        if length < RTATTR.size:
            break
        if kind in (IFA_ADDRESS, IFA_LOCAL) and length == RTATTR.size + 4:
            found[kind] = socket.inet_ntoa(msg[pos + RTATTR.size:pos + length])
        pos += (length + 3) & ~3
    return ifindex, found.get(IFA_LOCAL, found.get(IFA_ADDRESS))


def _rtnetlink_messages(groups: int) -> Iterator[tuple[float, int, bytes]]:
    """``(time read, message type, payload)`` of every rtnetlink message of ``groups``,
    forever; says ``ready`` once subscribed."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.bind((0, groups))
    emit({"ready": True})
    while True:
        data = sock.recv(65536)
        now = time.monotonic()
        pos = 0
        while pos + NLMSG_HDR.size <= len(data):
            length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, pos)
            if length < NLMSG_HDR.size:
                break
            yield now, kind, data[pos + NLMSG_HDR.size:pos + length]
            pos += (length + 3) & ~3


def addrwatch() -> None:
    """Print every IPv4 address change until killed."""
    for now, kind, payload in _rtnetlink_messages(RTMGRP_IPV4_IFADDR):
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            ifindex, addr = _addresses(payload)
            emit({"t": now, "op": "add" if kind == RTM_NEWADDR else "del",
                  "addr": addr, "ifindex": ifindex})


RTMGRP_NEIGH = 0x4
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
NDA_DST = 1
NDA_LLADDR = 2
NDMSG = struct.Struct("=BBHiHBB")


def _neighbour(msg: bytes) -> tuple[str | None, str | None]:
    """NDA_DST (IPv4 only) and NDA_LLADDR of one RTM_NEWNEIGH/DELNEIGH payload."""
    family = NDMSG.unpack_from(msg)[0]
    dst = lladdr = None
    pos = NDMSG.size
    while pos + RTATTR.size <= len(msg):
        length, kind = RTATTR.unpack_from(msg, pos)
        if length < RTATTR.size:
            break
        value = msg[pos + RTATTR.size:pos + length]
        if kind == NDA_DST and family == socket.AF_INET and len(value) == 4:
            dst = socket.inet_ntoa(value)
        elif kind == NDA_LLADDR:
            lladdr = value.hex(":")
        pos += (length + 3) & ~3
    return dst, lladdr


def neighwatch() -> None:
    """Print every IPv4 neighbour entry change until killed."""
    for now, kind, payload in _rtnetlink_messages(RTMGRP_NEIGH):
        if kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
            dst, lladdr = _neighbour(payload)
            if dst is not None:
                emit({"t": now, "op": "add" if kind == RTM_NEWNEIGH else "del",
                      "dst": dst, "lladdr": lladdr})


def main() -> None:
    """Parse the mode and run it."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--bind", required=True)
    p_serve.add_argument("--tcp", type=int, action="append", default=[])
    p_serve.add_argument("--udp", type=int, action="append", default=[])
    p_drive = sub.add_parser("drive")
    p_drive.add_argument("--stream", action="append", default=[])
    p_drive.add_argument("--idle", action="append", default=[])
    p_drive.add_argument("--interval", type=float, default=0.03)
    sub.add_parser("addrwatch")
    sub.add_parser("neighwatch")
    args = parser.parse_args()
    raise_fd_limit()
    if args.mode == "serve":
        asyncio.run(serve(args.bind, args.tcp, args.udp))
    elif args.mode == "drive":
        asyncio.run(drive(args.stream, args.idle, args.interval))
    elif args.mode == "neighwatch":
        neighwatch()
    else:
        addrwatch()


if __name__ == "__main__":
    main()

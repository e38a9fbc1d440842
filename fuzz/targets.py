"""One function per decoder of untrusted bytes: feed it one input, allow only its errors.

Each target takes arbitrary bytes, runs the decoder (and what consumes its output
next in the daemon), and returns normally when the decoder either succeeded or raised
one of the errors it documents. Any other exception is a bug: atheris reports it as a
crash, hypothesis as a failure. A few cheap invariants are checked on success too
(round trips, size bounds, what the session sends decoding again); they raise
:class:`FuzzInvariantError`, which is never an allowed error.

The targets are deterministic: the same input always takes the same path, so a
crashing input found by atheris reproduces as a plain unit test.
"""

from __future__ import annotations

import contextlib

from replicator import config, control, ctformat, netlink, record, wire
from replicator import ctnetlink as ct
from replicator.errors import (
    ConfigError,
    ControlDecodeError,
    KernelError,
    NetlinkDecodeError,
    NotifyDecodeError,
    WireDecodeError,
)
from replicator.framing import (
    FRAME_HEADER_SIZE,
    PREAMBLE_SIZE,
    FrameDecoder,
    check_preamble,
    encode_frame,
)
from replicator.model import (
    AF_INET,
    ICMP_PROTOCOLS,
    IPPROTO_TCP,
    CtEvent,
    CtTuple,
    Entry,
    EventKind,
    NewRecord,
    TcpInfo,
    invert,
)
from replicator.notifyfifo import LineBuffer, decode_line
from replicator.role import MAX_NOTIFY_LINE, RoleMachine, format_notify, parse_notify
from replicator.sync import ConnectionTerminated, SyncParams, SyncSession


class FuzzInvariantError(AssertionError):
    """A decoder accepted an input but broke a property its output must have."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise FuzzInvariantError(what)


# --- wire frames before authentication ----------------------------------------------

#: Frame bounds the framing target picks from (the first input byte chooses).
FRAME_BOUNDS = (0, 16, 300, 1 << 20)


def framing(data: bytes) -> None:
    """Preamble check on every prefix, then a frame stream fed in chunks."""
    head = data[: PREAMBLE_SIZE + 1]
    for n in range(len(head) + 1):
        try:
            version = check_preamble(head[:n])
        except WireDecodeError:
            break
        _check((version is not None) == (n == PREAMBLE_SIZE), "preamble completion")
    if not data:
        return
    bound = FRAME_BOUNDS[data[0] >> 6]
    step = data[0] % 61 + 1
    stream = data[1:]
    decoder = FrameDecoder(bound)
    frames: list[bytes] = []
    for start in range(0, len(stream), step):
        try:
            frames += decoder.feed(stream[start : start + step])
        except WireDecodeError:
            # The stream is out of step for good: every later feed is refused too.
            with contextlib.suppress(WireDecodeError):
                decoder.feed(b"")
                raise FuzzInvariantError("a failed frame decoder accepted more bytes") from None
            return
        _check(decoder.buffered <= FRAME_HEADER_SIZE + bound, "frame decoder over its bound")
    consumed = b"".join(encode_frame(f, bound) for f in frames)
    _check(consumed == stream[: len(stream) - decoder.buffered], "frames differ from the stream")


# --- sync messages after authentication ---------------------------------------------


def wire_message(data: bytes) -> None:
    """Decode one message; a decoded one re-encodes to itself, and every entry in it
    can be handed to the kernel encoders, the digests and the text format."""
    try:
        msg = wire.decode(data)
    except WireDecodeError:
        return
    _check(wire.decode(wire.encode(msg)) == msg, "decode(encode(msg)) != msg")
    upserts: tuple[wire.WireEntry, ...] = ()
    if isinstance(msg, wire.Changes):
        upserts = msg.upserts
        for key in msg.deletes:
            _check(record.pack_key(record.unpack_key(key)) == key, "a key is not canonical")
    elif isinstance(msg, wire.Buckets):
        upserts = tuple(e for r in msg.records for e in r.entries)
    for upsert in upserts:
        entry = wire.entry_of(upsert)
        # The receiver stores a body as it came: it must be the one its entry packs to
        # (or the peers' digests of one state would differ).
        _check(record.body(record.pack(entry, 0.0)) == upsert[0], "a body is not canonical")
        peer_entry(entry)


def _stored(entry: Entry) -> None:
    """Store the entry as the tables do (a record) and digest it."""
    rec = record.pack(entry, 0.0)
    _check(record.unpack(rec) == entry, "unpack(pack(entry)) != entry")
    record.fingerprint(rec)


def peer_entry(entry: Entry) -> None:
    """What the daemon does with an entry a peer sent: inject it, digest it, show it."""
    ct.encode_create(entry, 1)
    ct.encode_update(entry, 2)
    ct.encode_delete(entry, 3)
    _stored(entry)
    ctformat.format_entry(entry)


#: The fuzzed node's sync parameters: small, so that windows, folding, bucket parts
#: and summaries are all reached by short inputs. Seeds are built with the same.
SYNC_PARAMS = SyncParams(
    buckets=16, batch=8, window=32, max_pending=64, ack_timeout=1.0,
    keepalive_interval=0.5, dead_interval=5.0, anti_entropy_interval=3.0,
)  # fmt: skip
SYNC_NODE = "fw-a"
SYNC_PEER = "fw-b"
#: Separates the frame payloads of one sync input. 0xC1 is the one byte msgpack never
#: uses as a type marker, so it rarely occurs in valid messages (seeds avoid it).
SYNC_SEPARATOR = b"\xc1\xc1"
#: Seconds between two payloads of a sync input.
SYNC_STEP = 0.25


def sync_receive(data: bytes) -> None:
    """A fresh connected session receives every payload of ``data`` in order, one per
    :data:`SYNC_STEP` seconds (an empty payload: a step without a message).

    :meth:`SyncSession.receive` must never raise, whatever the peer sends; every
    frame the session sends in reply must decode; a terminated connection is torn
    down and redone as the daemon would; timers run when due.
    """
    session = new_sync_session()
    now = 0.0
    sync_step(session, b"", now)
    for payload in data.split(SYNC_SEPARATOR):
        now += SYNC_STEP
        sync_step(session, payload, now)
    # Let received entries expire, and the connection die of silence.
    sync_step(session, b"", now + 1000.0)


def new_sync_session() -> SyncSession:
    """The fuzzed node: its local table loaded, a connection just made."""
    session = SyncSession(SYNC_NODE, 1, params=SYNC_PARAMS)
    for entry in sync_local_entries():
        session.local_update(entry, 0.0)
    session.connection_made(0.0)
    return session


def sync_step(session: SyncSession, payload: bytes, now: float) -> list[bytes]:
    """Deliver ``payload`` (if any), run due timers; return what the session sends.

    What the session sends must decode (an error there escapes as a crash). After a
    :class:`ConnectionTerminated` event the connection is redone, as the daemon does.
    """
    if payload:
        session.receive(payload, now)
    due = session.next_timer()
    if due is not None and due <= now:
        session.handle_timer(now)
    out = session.frames_to_send(now)
    terminated = False
    while (event := session.next_event()) is not None:
        terminated = terminated or isinstance(event, ConnectionTerminated)
    if terminated:
        session.connection_lost(now)
        session.connection_made(now)
        out += session.frames_to_send(now)
    for frame in out:
        wire.decode(frame)
    return out


def sync_local_entries(count: int = 24) -> list[Entry]:
    """A small local table for a sync session: IPv4 TCP entries, some with NAT."""
    entries = []
    for i in range(count):
        orig = CtTuple(bytes([10, 0, 0, 1 + i % 3]), bytes([192, 0, 2, 7]), IPPROTO_TCP,
                       40000 + i, 443)  # fmt: skip
        reply = invert(orig) if i % 4 else invert(orig)._replace(dst=bytes([198, 51, 100, 1]))
        entries.append(Entry(AF_INET, orig, reply, status=0x18E, timeout=60 + i, mark=i,
                             tcp=TcpInfo(3, 7, 7, 0x23, 0x23)))  # fmt: skip
    return entries


# --- ctnetlink (kernel) -----------------------------------------------------------------


def ctnetlink_datagram(data: bytes) -> None:
    """One datagram through the event decoder, the dump decoder, the ACK parser and the
    generic netlink walkers; full entries go on to the wire encoder and the peer's
    decoder, the kernel encoders, digests and text format."""
    try:
        events, decoded = ct.decode_events(data), True
    except NetlinkDecodeError:
        events, decoded = [], False
    for event in events:
        if event.kind is EventKind.NEW:
            kernel_entry(event.entry)
    # The records path (the mirror's) decodes the same, NEW events packed in place.
    try:
        records: list[CtEvent | NewRecord] | None = ct.decode_events_records(data, 100.0)
    except NetlinkDecodeError:
        records = None
    _check((records is not None) == decoded,
           "decode_events_records and decode_events disagree on failing")
    if records is not None:
        expected = [
            NewRecord(record.new_event_record(e.entry, 100.0),
                      e.portid)
            if e.kind is EventKind.NEW and e.entry.orig.proto not in ICMP_PROTOCOLS else e
            for e in events
        ]  # fmt: skip
        _check(records == expected, "a NEW event's record is not its entry's")
    try:
        entries, _done = ct.decode_dump(data)
    except (NetlinkDecodeError, KernelError):
        entries = []
    for entry in entries:
        kernel_entry(entry)
    with contextlib.suppress(NetlinkDecodeError):
        ct.parse_acks(data)
    with contextlib.suppress(NetlinkDecodeError):
        for msg in netlink.iter_messages(data):
            if msg.type == netlink.NLMSG_ERROR:
                netlink.error_code(data, msg)
            elif msg.type == netlink.NLMSG_DONE:
                netlink.done_code(data, msg)
            elif msg.end - msg.start >= netlink.NFGENMSG.size:
                for _type, start, end in netlink.iter_attrs(
                    data, msg.start + netlink.NFGENMSG.size, msg.end
                ):
                    _check(start <= end <= msg.end, "attribute outside its message")


def kernel_entry(entry: Entry) -> None:
    """What the daemon does with a full entry from the kernel: send it to the peer,
    digest it, show it (and the peer injects what it receives)."""
    _stored(entry)
    ctformat.format_entry(entry)
    msg = wire.decode(wire.encode_changes(0, 0, [(entry, entry.timeout)], [entry.key], sent=0))
    _check(isinstance(msg, wire.Changes), "CHANGES decoded as another message")


# --- control socket -----------------------------------------------------------------


def control_request(data: bytes) -> None:
    """A request line as the daemon decodes it (and any response line as the CLI does)."""
    try:
        request = control.decode_request(data)
    except ControlDecodeError:
        pass
    else:
        again = control.decode_request(control.encode_request(request))
        _check(again == request, "request does not round-trip")
    for command in control.Command:
        with contextlib.suppress(ControlDecodeError):
            control.decode_response(data, command)


# --- keepalived notify lines ----------------------------------------------------------


def notify_fifo(data: bytes) -> None:
    """Bytes from the notify FIFO, in chunks, through the line buffer, the line decoder
    and a role machine; also the same bytes as one ``notify`` argument line."""
    if not data:
        return
    step = data[0] % 97 + 1
    complete_actions = bool(data[0] & 0x80)
    stream = data[1:]
    buffer = LineBuffer()
    machine = RoleMachine(hot=bool(data[0] & 0x40), follow="VG_FW" if data[0] & 0x20 else "")
    for start in range(0, len(stream), step):
        for raw in buffer.feed(stream[start : start + step]):
            if raw is None:
                continue
            _check(len(raw) <= MAX_NOTIFY_LINE, "line longer than the limit")
            try:
                event = decode_line(raw)
            except NotifyDecodeError:
                continue
            _check(parse_notify(format_notify(event)) == event, "notify line round trip")
            action = machine.feed(event).start
            while complete_actions and action is not None:
                action = machine.done(action)
    with contextlib.suppress(NotifyDecodeError, UnicodeDecodeError):
        parse_notify(stream.decode("utf-8"))


# --- configuration ------------------------------------------------------------------


def config_file(data: bytes) -> None:
    """Configuration bytes as :func:`replicator.config.load_config` reads them
    (UTF-8, then parse and validate; the file checks are not run)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_config refuses it with a ConfigError (checked by a unit test)
    try:
        parsed = config.parse_config(text)
    except ConfigError:
        return
    _check(config.diff_reloadable(parsed, parsed) == ((), ()), "a config differs from itself")


#: Every target by the name its script and seed set use.
TARGETS = {
    "framing": framing,
    "wire": wire_message,
    "sync_receive": sync_receive,
    "ctnetlink": ctnetlink_datagram,
    "control": control_request,
    "notify": notify_fifo,
    "config": config_file,
}

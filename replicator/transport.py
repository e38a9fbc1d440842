"""The peer link: authenticated, encrypted connections to the other node (trio shell).

Theory of operation
-------------------
A :class:`PeerLink` listens on ``settings.listen`` and dials ``settings.dial`` (either
may be omitted; normally both nodes of a pair have both, with the same configuration
shape). A node dials only while it has no connection, with jittered backoff.

**One connection at a time.** Both nodes may dial at the same moment, so the link needs
a rule both ends apply identically, without talking: after authentication both ends
know both certificate fingerprints, hence which end dialed. A connection dialed by the
node with the lower fingerprint is *preferred*. An authenticated connection is admitted
unless a preferred one is already active (it is then closed as a ``duplicate``); an
admitted connection replaces the active one, whose handler is cancelled. So both ends
settle on the same connection whatever the arrival order, and a redial (a node only
dials when it considers the old connection dead) replaces a half-open leftover, unless
that leftover is preferred: then the kernel declares it dead within
``dead_peer_timeout`` (keepalive, TCP_USER_TIMEOUT) if the sync layer does not first.
The other direction still works alone when only it is reachable.

Every connection goes through the same handshake, bounded by ``handshake_timeout``:

1. dialer -> listener, in clear: the 8-byte preamble (:mod:`replicator.framing`).
   Anything else is refused after at most 8 bytes, before any cryptography.
2. TLS 1.3 with certificates required both ways (:mod:`replicator.tlsctx`).
3. Both sides check the presented certificate's SHA-256 fingerprint against the pins.
4. Both sides send the preamble again inside TLS and wait for the other's: this is the
   authenticated version and, for the dialer, the proof that the listener accepted it.

Only then is a :class:`FramedConnection` handed to the handler; nothing received before
that point is ever delivered upward. Each refusal is counted by :class:`Refusal` reason
and logged at most once per source host per ``log_interval``.

A flood of connection attempts cannot starve the real peer: handshakes in progress are
bounded in total and per source host (:class:`~replicator.linkpolicy.HandshakeSlots`);
an attempt finding no slot is closed before a byte is read; a silent client holds its
slot for at most ``handshake_timeout``. Against a distributed flood, a firewall rule
limiting the sync port to the peer's address remains the real defence.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from . import locks
from .errors import (
    AuthenticationError,
    ChannelError,
    DecodeError,
    ProtocolError,
    WireDecodeError,
)
from .framing import (
    DEFAULT_MAX_FRAME_SIZE,
    PREAMBLE_SIZE,
    PROTOCOL_VERSION,
    FrameDecoder,
    check_preamble,
    encode_frame,
    encode_preamble,
)
from .linkpolicy import Backoff, HandshakeSlots, Refusal, RefusalLog
from .tlsctx import Credentials, check_peer

logger = logging.getLogger(__name__)

#: How much to ask the TLS stream for at a time when reading frames.
_RECEIVE_CHUNK = 65536

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """Where to listen/dial and the link's bounds. Times in seconds."""

    listen: Endpoint | None = None
    dial: Endpoint | None = None
    #: Source address to dial from (e.g. the dedicated sync interface), or any.
    dial_source: str | None = None
    handshake_timeout: float = 5.0
    max_handshakes: int = 64
    max_handshakes_per_host: int = 4
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    backoff: Backoff = field(default_factory=Backoff)
    #: A connection with no acknowledged progress for this long is declared dead by
    #: the kernel (TCP keepalive and TCP_USER_TIMEOUT), even while the sync layer idles.
    dead_peer_timeout: float = 15.0
    #: At most one log line per source host per this many seconds for refusals.
    log_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.listen is None and self.dial is None:
            raise ValueError("a peer link needs a listen address, a dial address, or both")
        if self.handshake_timeout <= 0 or self.dead_peer_timeout < 1:
            raise ValueError("timeouts must be positive (dead_peer_timeout at least 1 s)")


@dataclass(frozen=True, slots=True)
class LinkStats:
    """A snapshot of the link's counters (for metrics and status)."""

    #: Incoming connection attempts refused, by reason.
    refused: dict[Refusal, int]
    #: Outgoing dial attempts that failed, by reason.
    dial_failed: dict[Refusal, int]
    #: Authenticated connections handed to the handler so far.
    established: int
    #: Whether an authenticated connection is currently active.
    connected: bool
    #: The fingerprint the peer authenticated with on the active connection.
    peer_fingerprint: str | None


class FramedConnection:
    """An authenticated connection to the peer carrying length-prefixed frames.

    Created only by :class:`PeerLink` after the full handshake. Transport failures
    surface as :class:`ChannelError`, a malformed frame as
    :class:`~replicator.errors.WireDecodeError`; both end the connection.
    """

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        *,
        peer_fingerprint: str,
        local_fingerprint: str,
        peer_address: Endpoint,
        local_address: Endpoint,
        dialed: bool,
        max_frame_size: int,
    ) -> None:
        self._stream = stream
        self._decoder = FrameDecoder(max_frame_size)
        self._max_frame_size = max_frame_size
        self._pending: deque[bytes] = deque()
        self._send_lock = trio.Lock()
        #: The SHA-256 fingerprint of the certificate the peer authenticated with.
        self.peer_fingerprint = peer_fingerprint
        #: The fingerprint of the certificate this node presented on this connection.
        self.local_fingerprint = local_fingerprint
        #: The peer's (host, port): the address dialed, or the accepted client's.
        self.peer_address = peer_address
        #: This end's (host, port) of the TCP connection.
        self.local_address = local_address
        #: True if this node dialed the connection, False if it accepted it.
        self.dialed = dialed

    async def send_frame(self, payload: bytes) -> None:
        """Send one frame. Safe to call from several tasks (frames are not interleaved)."""
        await self.send_frames((payload,))

    async def send_frames(self, payloads: Sequence[bytes]) -> None:
        """Send ``payloads`` as consecutive frames, in one write. Safe to call from
        several tasks (frames are not interleaved); nothing is sent if one is too large.

        Why one write: every ``send_all`` yields to the other tasks, and on an active
        node the event reader then takes a whole drain of events (1-2 ms) before the
        next frame goes. Frame by frame, a burst's frames queued up behind the reader
        (measured on a 10 k burst: 4,600 entries still unsent when the last event had
        been read, sent over the next 10 ms) while the standby sat idle.
        """
        if not payloads:
            return
        bound = self._max_frame_size
        data = b"".join([encode_frame(p, bound) for p in payloads])
        lock = self._send_lock
        # Uncontended, taken without giving the turn away: each turn given away in a
        # burst is a read of thousands of events.
        await locks.acquire(lock)
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ChannelError(f"cannot send to the peer: {_describe(exc)}") from exc
        finally:
            lock.release()

    async def receive_frame(self) -> bytes:
        """The next frame's payload. ChannelError when the connection ends or breaks."""
        while not self._pending:
            try:
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ChannelError(f"cannot receive from the peer: {_describe(exc)}") from exc
            if not data:
                raise ChannelError("the peer closed the connection")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    async def aclose(self) -> None:
        """Close the connection (TLS close_notify, then the socket); never raises."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._stream.aclose()
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream.transport_stream)


#: What the link runs for every authenticated connection; the connection is closed
#: when it returns. A ChannelError, DecodeError or ProtocolError it raises ends only
#: that connection (logged); any other exception is a bug and stops the link.
Handler = Callable[[FramedConnection], Awaitable[None]]


#: Handler exceptions that end only the connection they happened on.
_CONNECTION_FAILURES = (ChannelError, DecodeError, ProtocolError)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


class _Refused(Exception):
    """Internal: a handshake step refused the connection for ``reason``."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class PeerLink:
    """Listens and/or dials, authenticates, and runs ``handler`` on each good connection.

    At most one connection is served at a time; ``handler`` runs for a new connection
    only after the previous one's handler has finished. Run it with
    ``await nursery.start(link.run)``, which returns the listening addresses once bound.
    """

    def __init__(
        self,
        settings: LinkSettings,
        credentials: Credentials,
        handler: Handler,
        *,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._credentials = credentials
        self._handler = handler
        self._jitter = jitter
        self._slots = HandshakeSlots(settings.max_handshakes, settings.max_handshakes_per_host)
        self._refusal_log = RefusalLog(settings.log_interval)
        self._dial_log = RefusalLog(settings.log_interval)
        self._refused: dict[Refusal, int] = {}
        self._dial_failed: dict[Refusal, int] = {}
        self._established = 0
        self._serve_lock = trio.Lock()
        self._current: _Admitted | None = None
        self._serving: FramedConnection | None = None
        # Set while no connection is admitted: the dialer waits on it.
        self._idle = trio.Event()
        self._idle.set()

    @property
    def stats(self) -> LinkStats:
        """Counters and state right now."""
        serving = self._serving
        return LinkStats(
            refused=dict(self._refused),
            dial_failed=dict(self._dial_failed),
            established=self._established,
            connected=serving is not None,
            peer_fingerprint=None if serving is None else serving.peer_fingerprint,
        )

    def set_credentials(self, credentials: Credentials) -> None:
        """Use new keys/pins for future handshakes (e.g. after SIGHUP during a rotation).

        An active connection whose peer fingerprint is no longer accepted is closed.
        """
        self._credentials = credentials
        current = self._current
        if current is not None and current.conn.peer_fingerprint not in credentials.accepted:
            logger.warning(
                "closing the peer connection: fingerprint %s is no longer accepted",
                current.conn.peer_fingerprint,
            )
            current.scope.cancel()

    async def run(
        self, *, task_status: trio.TaskStatus[list[Endpoint]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the link until cancelled. Reports the bound listening addresses."""
        settings = self._settings
        async with trio.open_nursery() as nursery:
            bound: list[Endpoint] = []
            if settings.listen is not None:
                host, port = settings.listen
                listeners = await trio.open_tcp_listeners(port, host=_listen_host(host))
                bound = [_endpoint(lst.socket.getsockname()) for lst in listeners]
                nursery.start_soon(trio.serve_listeners, self._accepted, listeners)
                logger.info("peer link listening on %s", ", ".join(map(_fmt, bound)))
            if settings.dial is not None:
                nursery.start_soon(self._dial_loop, settings.dial)
            task_status.started(bound)

    # -- incoming ---------------------------------------------------------------

    async def _accepted(self, stream: trio.SocketStream) -> None:
        try:
            address = _endpoint(stream.socket.getpeername())
        except OSError:
            # Reset before we even looked at it: nothing to refuse or log.
            await trio.aclose_forcefully(stream)
            return
        host = address[0]
        if not self._slots.try_acquire(host):
            self._refuse(address, Refusal.OVERLOAD, "too many handshakes in progress")
            await trio.aclose_forcefully(stream)
            return
        try:
            conn = await self._handshake(stream, address, dialed=False)
        finally:
            self._slots.release(host)
        if conn is not None:
            await self._serve(conn)

    def _refuse(self, address: Endpoint, reason: Refusal, detail: str) -> None:
        self._refused[reason] = self._refused.get(reason, 0) + 1
        suppressed = self._refusal_log.record(address[0], trio.current_time())
        if suppressed is not None:
            logger.warning(
                "refused peer-link connection from %s: %s (%s)%s",
                _fmt(address),
                reason.value,
                detail,
                _suppressed_note(suppressed, self._settings.log_interval),
            )

    # -- outgoing ---------------------------------------------------------------

    async def _dial_loop(self, target: Endpoint) -> None:
        backoff = self._settings.backoff
        attempt = 0
        while True:
            await self._idle.wait()
            conn = await self._dial(target)
            if conn is None:
                await trio.sleep(backoff.delay(attempt, self._jitter()))
                attempt += 1
                continue
            started = trio.current_time()
            await self._serve(conn)
            # A link that dies at once again and again (a peer that accepts then
            # drops us) must back off too, not be redialed in a tight loop.
            if trio.current_time() - started >= backoff.maximum:
                attempt = 0
            await trio.sleep(backoff.delay(attempt, self._jitter()))
            attempt += 1

    async def _dial(self, target: Endpoint) -> FramedConnection | None:
        settings = self._settings
        stream: trio.SocketStream | None = None
        with trio.move_on_after(settings.handshake_timeout):
            try:
                stream = await trio.open_tcp_stream(
                    target[0], target[1], local_address=settings.dial_source
                )
            except OSError as exc:
                self._dial_failure(target, Refusal.CONNECT_FAILED, exc.strerror or str(exc))
                return None
        if stream is None:
            self._dial_failure(target, Refusal.TIMEOUT, "connect timed out")
            return None
        # The address connected to (not the peername, which a reset makes unreadable).
        return await self._handshake(stream, target, dialed=True)

    def _dial_failure(self, address: Endpoint, reason: Refusal, detail: str) -> None:
        self._dial_failed[reason] = self._dial_failed.get(reason, 0) + 1
        suppressed = self._dial_log.record(address[0], trio.current_time())
        if suppressed is not None:
            logger.warning(
                "cannot connect to the peer at %s: %s (%s)%s",
                _fmt(address),
                reason.value,
                detail,
                _suppressed_note(suppressed, self._settings.log_interval),
            )

    # -- both directions --------------------------------------------------------

    async def _handshake(
        self, stream: trio.SocketStream, address: Endpoint, *, dialed: bool
    ) -> FramedConnection | None:
        """The full handshake; a FramedConnection, or None after counting the refusal."""
        credentials = self._credentials
        outcome: FramedConnection | _Refused = _Refused(Refusal.TIMEOUT, "handshake timed out")
        try:
            with trio.move_on_after(self._settings.handshake_timeout):
                try:
                    _tune_socket(stream.socket, self._settings.dead_peer_timeout)
                    outcome = await self._authenticate(stream, address, credentials, dialed=dialed)
                except _Refused as refused:
                    outcome = refused
                except OSError as exc:  # socket calls on a connection already reset
                    outcome = _Refused(Refusal.CLOSED, exc.strerror or str(exc))
        except BaseException:
            # The link itself is being cancelled: do not leak the socket.
            await trio.aclose_forcefully(stream)
            raise
        if isinstance(outcome, FramedConnection):
            return outcome
        # Counted before closing, so whoever sees the close also sees the counter.
        if dialed:
            self._dial_failure(address, outcome.reason, outcome.detail)
        else:
            self._refuse(address, outcome.reason, outcome.detail)
        await trio.aclose_forcefully(stream)
        return None

    async def _authenticate(
        self,
        stream: trio.SocketStream,
        address: Endpoint,
        credentials: Credentials,
        *,
        dialed: bool,
    ) -> FramedConnection:
        if dialed:
            await _send(stream, encode_preamble(), dialed=dialed)
        else:
            await _expect_preamble(stream, dialed=dialed)
        context = credentials.client if dialed else credentials.server
        tls = trio.SSLStream(stream, context, server_side=not dialed)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise _Refused(*_classify_tls(exc, dialed=dialed)) from None
        try:
            fingerprint = check_peer(tls.getpeercert(binary_form=True), credentials.accepted)
        except AuthenticationError as exc:
            raise _Refused(Refusal.FINGERPRINT_MISMATCH, str(exc)) from None
        if fingerprint == credentials.own:
            # A connection reflected back to this node (possible only if both nodes
            # share one key, which credentials() refuses; checked again here).
            raise _Refused(Refusal.FINGERPRINT_MISMATCH, "the peer presented our own certificate")
        await _send(tls, encode_preamble(), dialed=dialed)
        await _expect_preamble(tls, dialed=dialed)
        return FramedConnection(
            tls,
            peer_fingerprint=fingerprint,
            local_fingerprint=credentials.own,
            peer_address=address,
            local_address=_endpoint(stream.socket.getsockname()),
            dialed=dialed,
            max_frame_size=self._settings.max_frame_size,
        )

    async def _serve(self, conn: FramedConnection) -> None:
        """Admit ``conn`` (or close it as a duplicate), run the handler on it, close it."""
        admitted = self._admit(conn)
        if admitted is None:
            counters = self._dial_failed if conn.dialed else self._refused
            counters[Refusal.DUPLICATE] = counters.get(Refusal.DUPLICATE, 0) + 1
            await conn.aclose()
            logger.info(
                "closed a duplicate peer connection (%s %s): the preferred one is active",
                "dialed" if conn.dialed else "accepted",
                _fmt(conn.peer_address),
            )
            return
        outcome = "replaced by a newer connection"
        try:
            with admitted.scope:
                # The previous connection's handler finishes (it was cancelled) first.
                async with self._serve_lock:
                    self._serving = conn
                    self._established += 1
                    logger.info(
                        "peer link up: %s %s, peer %s",
                        "dialed" if conn.dialed else "accepted",
                        _fmt(conn.peer_address),
                        conn.peer_fingerprint,
                    )
                    try:
                        await self._handler(conn)
                        outcome = "closed by this node"
                    except _CONNECTION_FAILURES as exc:
                        # The connection or the peer failed: only this connection ends.
                        outcome = f"{type(exc).__name__}: {exc}"
                    except BaseExceptionGroup as group:
                        # The same from a handler's own nursery (trio groups errors).
                        failures, rest = group.split(_CONNECTION_FAILURES)
                        if failures is None:
                            raise
                        outcome = "; ".join(
                            f"{type(e).__name__}: {e}" for e in _leaves(failures)
                        )
                        if rest is not None:
                            raise rest from None  # a bug or a cancellation: not ours
        finally:
            if self._serving is conn:
                self._serving = None
            if self._current is admitted:
                self._current = None
                self._idle.set()
            await conn.aclose()
        logger.info("peer link down: %s: %s", _fmt(conn.peer_address), outcome)

    def _admit(self, conn: FramedConnection) -> _Admitted | None:
        """Apply the one-connection rule (module docstring); None means a duplicate."""
        if conn.dialed:
            dialer, acceptor = conn.local_fingerprint, conn.peer_fingerprint
        else:
            dialer, acceptor = conn.peer_fingerprint, conn.local_fingerprint
        preferred = dialer < acceptor
        current = self._current
        if current is not None and current.preferred and not preferred:
            return None
        if current is not None:
            current.scope.cancel()
        admitted = _Admitted(trio.CancelScope(), conn, preferred)
        self._current = admitted
        if self._idle.is_set():
            self._idle = trio.Event()
        return admitted


@dataclass(slots=True)
class _Admitted:
    """The connection currently admitted, and the scope that cancels its handler."""

    scope: trio.CancelScope
    conn: FramedConnection
    preferred: bool


async def _send(stream: trio.abc.Stream, data: bytes, *, dialed: bool) -> None:
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError as exc:
        raise _Refused(*_classify_tls(exc, dialed=dialed)) from None


async def _expect_preamble(stream: trio.abc.Stream, *, dialed: bool) -> None:
    """Read exactly one preamble from ``stream`` (never a byte more) and check it."""
    received = b""
    inside_tls = isinstance(stream, trio.SSLStream)
    while True:
        try:
            chunk = await stream.receive_some(PREAMBLE_SIZE - len(received))
        except trio.BrokenResourceError as exc:
            raise _Refused(*_classify_tls(exc, dialed=dialed)) from None
        if not chunk:
            if dialed and inside_tls:
                raise _Refused(
                    Refusal.REFUSED_BY_PEER,
                    "the peer closed the connection after TLS (it does not accept our "
                    "certificate or fingerprint)",
                )
            raise _Refused(Refusal.CLOSED, "connection closed during the handshake")
        received += chunk
        try:
            version = check_preamble(received)
        except WireDecodeError as exc:
            raise _Refused(Refusal.BAD_PREAMBLE, str(exc)) from None
        if version is None:
            continue
        if version != PROTOCOL_VERSION:
            raise _Refused(
                Refusal.BAD_VERSION,
                f"peer speaks protocol version {version}, this node {PROTOCOL_VERSION}",
            )
        return


def _classify_tls(exc: trio.BrokenResourceError, *, dialed: bool) -> tuple[Refusal, str]:
    """Map a failed TLS or socket operation to a refusal reason and a readable detail."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return Refusal.UNTRUSTED_CERTIFICATE, f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or ""
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return Refusal.NO_CERTIFICATE, "the peer presented no certificate"
        if "ALERT" in reason:
            # The other side aborted the handshake with an alert: it refused us.
            return Refusal.REFUSED_BY_PEER, f"TLS alert from the peer: {reason}"
        if isinstance(cause, ssl.SSLEOFError):
            if dialed:
                return Refusal.REFUSED_BY_PEER, "the peer closed the connection during TLS"
            return Refusal.CLOSED, "connection closed during the TLS handshake"
        return Refusal.TLS_ERROR, reason or str(cause)
    if isinstance(cause, OSError):
        return Refusal.CLOSED, cause.strerror or str(cause)
    return Refusal.CLOSED, "connection broken during the handshake"


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return type(exc).__name__


def _tune_socket(sock: trio.socket.SocketType, dead_peer_timeout: float) -> None:
    """Let the kernel detect a vanished peer within ``dead_peer_timeout`` seconds.

    Keepalive probes notice a silent peer while the link idles; TCP_USER_TIMEOUT bounds
    how long sent data may stay unacknowledged, so a send never blocks for minutes.
    """
    idle = max(1, int(dead_peer_timeout / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 2))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_peer_timeout * 1000))


def _listen_host(host: str) -> str | None:
    """The host to bind: ``::`` means every address of both families.

    trio binds IPv6 sockets with IPV6_V6ONLY, so ``::`` alone would not accept IPv4
    peers; ``None`` makes it bind both wildcards, which is what ``::`` means elsewhere.
    """
    try:
        if ipaddress.ip_address(host) == ipaddress.IPv6Address("::"):
            return None
    except ValueError:
        pass
    return host


def _endpoint(sockaddr: Any) -> Endpoint:
    return str(sockaddr[0]), int(sockaddr[1])


def _fmt(address: Endpoint) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _suppressed_note(suppressed: int, interval: float) -> str:
    if suppressed == 0:
        return ""
    return f"; {suppressed} more from this host in the last {interval:g}s not logged"

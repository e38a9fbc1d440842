"""The peer link over real TCP on 127.0.0.1 with real TLS 1.3.

Every refusal test checks three things: the connection is closed, the refusal is counted
under the right reason, and the handler never saw anything from it.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from replicator import keys, tlsctx
from replicator.errors import ChannelError, FrameTooLargeError, WireDecodeError
from replicator.framing import encode_preamble
from replicator.linkpolicy import Backoff, Refusal
from replicator.transport import (
    Endpoint,
    FramedConnection,
    LinkSettings,
    PeerLink,
    _listen_host,
)

NOW = datetime.datetime.now(datetime.UTC)
LOOPBACK = "127.0.0.1"
#: Generous, because the machine is shared; the tests never wait for it unless they
#: are about the timeout itself.
TIMEOUT = 5.0
FAST = Backoff(initial=0.01, maximum=0.05)

Identities = dict[str, keys.NodeIdentity]


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> Identities:
    """Nodes a and b (a pair), c (a stranger), b2 (b's next key during a rotation)."""
    directory = tmp_path_factory.mktemp("keys")
    out: Identities = {}
    for name in ("a", "b", "c", "b2"):
        generated = keys.generate_identity(name, NOW)
        keys.write_identity(generated, directory / f"{name}.key", directory / f"{name}.crt")
        out[name] = keys.load_identity(directory / f"{name}.key", directory / f"{name}.crt")
    return out


def creds(ids: Identities, me: str, *peers: str) -> tlsctx.Credentials:
    trusted = keys.load_peer_certificates([ids[p].cert_path for p in peers])
    return tlsctx.credentials(ids[me], trusted)


def settings(**overrides: object) -> LinkSettings:
    base = LinkSettings(listen=(LOOPBACK, 0), handshake_timeout=TIMEOUT, backoff=FAST)
    return replace(base, **overrides)  # type: ignore[arg-type]


class Recorder:
    """A handler that records each connection, then runs ``script`` on it."""

    def __init__(self, script: Callable[[FramedConnection], Awaitable[None]]) -> None:
        self.script = script
        self.connections: list[FramedConnection] = []
        self.frames: list[bytes] = []
        self.errors: list[Exception] = []

    async def __call__(self, conn: FramedConnection) -> None:
        self.connections.append(conn)
        try:
            await self.script(conn)
        except (ChannelError, WireDecodeError) as exc:
            self.errors.append(exc)
            raise


def idle_recorder() -> Recorder:
    """Reads (and ignores) frames until the connection ends, as a sync session would."""

    async def drain(conn: FramedConnection) -> None:
        while True:
            await conn.receive_frame()

    return Recorder(drain)


def echo_recorder() -> Recorder:
    """Answers every frame with ``b"echo " + frame`` until the connection ends."""
    recorder: Recorder

    async def echo(conn: FramedConnection) -> None:
        while True:
            frame = await conn.receive_frame()
            recorder.frames.append(frame)
            await conn.send_frame(b"echo " + frame)

    recorder = Recorder(echo)
    return recorder


@asynccontextmanager
async def running(link: PeerLink) -> AsyncIterator[list[Endpoint]]:
    async with trio.open_nursery() as nursery:
        bound: list[Endpoint] = await nursery.start(link.run)
        yield bound
        nursery.cancel_scope.cancel()


def free_address() -> Endpoint:
    """A loopback port free right now (for links that must know each other's port)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return LOOPBACK, probe.getsockname()[1]


async def wait_until(condition: Callable[[], bool]) -> None:
    # Polling: counters and link state have no event to wait on, by design.
    with trio.fail_after(20):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def read_until_closed(stream: trio.abc.Stream) -> bytes:
    """Everything the server sends before it closes (it must close)."""
    received = b""
    with trio.fail_after(20):
        while True:
            try:
                chunk = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                return received
            if not chunk:
                return received
            received += chunk


# --- the good peer -------------------------------------------------------------------


async def test_good_peer_exchanges_frames_both_ways(ids: Identities) -> None:
    listener_side = echo_recorder()
    replies: list[bytes] = []

    async def talk(conn: FramedConnection) -> None:
        for i in range(3):
            await conn.send_frame(b"ping %d" % i)
            replies.append(await conn.receive_frame())
        await conn.send_frame(b"x" * 100_000)
        replies.append(await conn.receive_frame())
        await trio.sleep_forever()

    dialer_side = Recorder(talk)
    a = PeerLink(settings(), creds(ids, "a", "b"), listener_side)
    async with running(a) as (address,):
        b = PeerLink(settings(listen=None, dial=address), creds(ids, "b", "a"), dialer_side)
        async with running(b):
            await wait_until(lambda: len(replies) == 4)
            assert replies[:3] == [b"echo ping 0", b"echo ping 1", b"echo ping 2"]
            assert replies[3] == b"echo " + b"x" * 100_000
            assert listener_side.frames[:3] == [b"ping 0", b"ping 1", b"ping 2"]
            (at_a,) = listener_side.connections
            (at_b,) = dialer_side.connections
            assert (at_a.dialed, at_b.dialed) == (False, True)
            assert at_a.peer_fingerprint == ids["b"].fingerprint == at_b.local_fingerprint
            assert at_b.peer_fingerprint == ids["a"].fingerprint == at_a.local_fingerprint
            assert at_a.peer_address == at_b.local_address
            assert at_b.peer_address == at_a.local_address == address
            for link, peer in ((a, "b"), (b, "a")):
                stats = link.stats
                assert stats.connected
                assert stats.established == 1
                assert stats.peer_fingerprint == ids[peer].fingerprint
                assert stats.refused == stats.dial_failed == {}


async def test_oversized_frames_are_refused_on_both_ends(ids: Identities) -> None:
    listener_side = echo_recorder()
    outcome: list[Exception] = []

    async def send_big(conn: FramedConnection) -> None:
        try:
            await conn.send_frame(b"y" * 2048)
        except FrameTooLargeError as exc:
            outcome.append(exc)
        # A peer with a larger bound (or a hostile one) sends it anyway: raw frame.
        await conn._stream.send_all((2048).to_bytes(4, "big") + b"y" * 2048)
        await trio.sleep_forever()

    a = PeerLink(settings(max_frame_size=1024), creds(ids, "a", "b"), listener_side)
    async with running(a) as (address,):
        b_settings = settings(listen=None, dial=address, max_frame_size=1024)
        async with running(PeerLink(b_settings, creds(ids, "b", "a"), Recorder(send_big))):
            await wait_until(lambda: bool(listener_side.errors))
    assert isinstance(outcome[0], FrameTooLargeError)
    assert isinstance(listener_side.errors[0], WireDecodeError)
    assert listener_side.frames == []


async def test_frames_sent_together_arrive_as_separate_frames_in_order(
    ids: Identities,
) -> None:
    listener_side = echo_recorder()
    outcome: list[Exception] = []

    async def send_batches(conn: FramedConnection) -> None:
        await conn.send_frames([b"one", b"", b"z" * 700, b"four"])
        await conn.send_frames([])
        try:  # one payload over the bound: none of the batch is sent
            await conn.send_frames([b"lost", b"y" * 2048])
        except FrameTooLargeError as exc:
            outcome.append(exc)
        await conn.send_frames([b"last"])
        await trio.sleep_forever()

    a = PeerLink(settings(max_frame_size=1024), creds(ids, "a", "b"), listener_side)
    async with running(a) as (address,):
        b_settings = settings(listen=None, dial=address, max_frame_size=1024)
        async with running(PeerLink(b_settings, creds(ids, "b", "a"), Recorder(send_batches))):
            await wait_until(lambda: len(listener_side.frames) == 5)
    assert listener_side.frames == [b"one", b"", b"z" * 700, b"four", b"last"]
    assert isinstance(outcome[0], FrameTooLargeError)
    # The listener refused nothing (an oversized frame sent would be a decode error).
    assert not any(isinstance(e, WireDecodeError) for e in listener_side.errors)


async def test_dialer_reconnects_after_the_connection_is_closed(ids: Identities) -> None:
    async def answer_once(conn: FramedConnection) -> None:
        await conn.send_frame(await conn.receive_frame())

    async def hello(conn: FramedConnection) -> None:
        await conn.send_frame(b"hello")
        await conn.receive_frame()
        await conn.receive_frame()  # the listener closes: ChannelError ends this one

    listener_side = Recorder(answer_once)
    dialer_side = Recorder(hello)
    a = PeerLink(settings(), creds(ids, "a", "b"), listener_side)
    async with running(a) as (address,):
        b = PeerLink(settings(listen=None, dial=address), creds(ids, "b", "a"), dialer_side)
        async with running(b):
            await wait_until(lambda: len(dialer_side.errors) >= 3)
            assert a.stats.established >= 3
            assert all(isinstance(e, ChannelError) for e in dialer_side.errors)
            assert a.stats.refused == {}


async def test_connection_failure_inside_a_handlers_nursery_ends_only_that_connection(
    ids: Identities,
) -> None:
    async def with_tasks(conn: FramedConnection) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.receive_frame)
            nursery.start_soon(trio.sleep_forever)

    dialer_side = Recorder(with_tasks)
    listener = PeerLink(settings(), creds(ids, "a", "b"), Recorder(answer_then_close))
    async with running(listener) as (address,):
        b = PeerLink(settings(listen=None, dial=address), creds(ids, "b", "a"), dialer_side)
        async with running(b):
            await wait_until(lambda: b.stats.established >= 2)


async def answer_then_close(conn: FramedConnection) -> None:
    """Close at once: the peer's receive_frame fails with ChannelError."""


async def test_dialer_reconnects_to_a_restarted_listener(ids: Identities) -> None:
    dialer_side = idle_recorder()
    first = PeerLink(settings(), creds(ids, "a", "b"), idle_recorder())
    first_scope = trio.CancelScope()

    async def run_first(*, task_status: trio.TaskStatus[list[Endpoint]]) -> None:
        with first_scope:
            await first.run(task_status=task_status)

    async with trio.open_nursery() as nursery:
        (address,) = await nursery.start(run_first)
        b = PeerLink(settings(listen=None, dial=address), creds(ids, "b", "a"), dialer_side)
        nursery.start_soon(b.run)
        await wait_until(lambda: first.stats.connected and b.stats.connected)
        first_scope.cancel()  # the listening node goes away...
        await wait_until(lambda: not b.stats.connected)
        second = PeerLink(settings(listen=address), creds(ids, "a", "b"), idle_recorder())
        await nursery.start(second.run)  # ...and comes back on the same port
        await wait_until(lambda: second.stats.connected and b.stats.connected)
        nursery.cancel_scope.cancel()
    assert len(dialer_side.connections) == 2
    assert isinstance(dialer_side.errors[0], ChannelError)


async def test_dial_failures_are_counted_and_retried(ids: Identities) -> None:
    nothing_listens = free_address()
    b = PeerLink(settings(listen=None, dial=nothing_listens), creds(ids, "b", "a"), idle_recorder())
    async with running(b):
        await wait_until(lambda: b.stats.dial_failed.get(Refusal.CONNECT_FAILED, 0) >= 3)
    assert not b.stats.connected


def test_listening_on_the_ipv6_wildcard_means_both_families() -> None:
    assert _listen_host("::") is None
    assert _listen_host("0::0") is None
    assert _listen_host("0.0.0.0") == "0.0.0.0"  # noqa: S104 (a string, not a bind)
    assert _listen_host("::1") == "::1"
    assert _listen_host("localhost") == "localhost"


# --- refusals ------------------------------------------------------------------------


@asynccontextmanager
async def listener_a(
    ids: Identities, **overrides: object
) -> AsyncIterator[tuple[PeerLink, Endpoint, Recorder]]:
    recorder = idle_recorder()
    link = PeerLink(settings(**overrides), creds(ids, "a", "b"), recorder)
    async with running(link) as (address,):
        yield link, address, recorder
    assert recorder.connections == [], "nothing unauthenticated may reach the handler"


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Refusal.BAD_PREAMBLE),
        (b"\x00" + os.urandom(200), Refusal.BAD_PREAMBLE),
        (b"RPLC\x00\x01\x00\x07", Refusal.BAD_PREAMBLE),
        (encode_preamble(2), Refusal.BAD_VERSION),
        (encode_preamble() + os.urandom(300), Refusal.TLS_ERROR),
    ],
    ids=["plain-text", "random-bytes", "bad-reserved", "wrong-version", "preamble-then-junk"],
)
async def test_foreign_clients_are_refused_and_counted(
    ids: Identities, first_bytes: bytes, reason: Refusal
) -> None:
    async with listener_a(ids) as (a, address, _):
        async with await trio.open_tcp_stream(*address) as client:
            await client.send_all(first_bytes)
            assert await read_until_closed(client) == b""
        await wait_until(lambda: sum(a.stats.refused.values()) == 1)
        assert a.stats.refused == {reason: 1}


async def test_bare_tls_client_without_preamble_is_refused_before_tls(ids: Identities) -> None:
    async with listener_a(ids) as (a, address, _):
        tls = trio.SSLStream(
            await trio.open_tcp_stream(*address), creds(ids, "b", "a").client
        )
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()
        await trio.aclose_forcefully(tls)
        await wait_until(lambda: bool(a.stats.refused))
        assert a.stats.refused == {Refusal.BAD_PREAMBLE: 1}


async def test_client_without_certificate_is_refused(ids: Identities) -> None:
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cafile=ids["a"].cert_path)
    async with listener_a(ids) as (a, address, _):
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(encode_preamble())
        tls = trio.SSLStream(stream, no_cert)
        # TLS 1.3: the client finishes first; the refusal shows when it reads.
        await tls.do_handshake()
        assert await read_until_closed(tls) == b""
        await trio.aclose_forcefully(tls)
        await wait_until(lambda: bool(a.stats.refused))
        assert a.stats.refused == {Refusal.NO_CERTIFICATE: 1}


async def test_tls12_only_client_is_refused(ids: Identities) -> None:
    old_tls = creds(ids, "b", "a").client
    old_tls.minimum_version = old_tls.maximum_version = ssl.TLSVersion.TLSv1_2
    async with listener_a(ids) as (a, address, _):
        stream = await trio.open_tcp_stream(*address)
        await stream.send_all(encode_preamble())
        tls = trio.SSLStream(stream, old_tls)
        with pytest.raises(trio.BrokenResourceError):
            await tls.do_handshake()
        await trio.aclose_forcefully(tls)
        await wait_until(lambda: bool(a.stats.refused))
        assert a.stats.refused == {Refusal.TLS_ERROR: 1}


async def test_expired_peer_certificate_is_refused(ids: Identities, tmp_path: Path) -> None:
    expired = keys.generate_identity("old", NOW - datetime.timedelta(days=10), days=2)
    keys.write_identity(expired, tmp_path / "old.key", tmp_path / "old.crt")
    old = keys.load_identity(tmp_path / "old.key", tmp_path / "old.crt")
    handler = idle_recorder()
    a = PeerLink(
        settings(), tlsctx.credentials(ids["a"], keys.load_peer_certificates([old.cert_path])),
        handler,
    )
    async with running(a) as (address,):
        dialer = PeerLink(
            settings(listen=None, dial=address),
            tlsctx.credentials(old, keys.load_peer_certificates([ids["a"].cert_path])),
            idle_recorder(),
        )
        async with running(dialer):
            await wait_until(lambda: a.stats.refused.get(Refusal.UNTRUSTED_CERTIFICATE, 0) >= 1)
    assert handler.connections == []


async def test_wrong_certificate_is_refused_on_both_sides(ids: Identities) -> None:
    stranger_handler = idle_recorder()
    async with listener_a(ids) as (a, address, _):
        # c trusts a, but a does not trust c.
        c = PeerLink(settings(listen=None, dial=address), creds(ids, "c", "a"), stranger_handler)
        async with running(c):
            await wait_until(lambda: a.stats.refused.get(Refusal.UNTRUSTED_CERTIFICATE, 0) >= 2)
            await wait_until(lambda: c.stats.dial_failed.get(Refusal.REFUSED_BY_PEER, 0) >= 2)
        assert set(a.stats.refused) == {Refusal.UNTRUSTED_CERTIFICATE}
    assert stranger_handler.connections == []


async def test_dialer_refuses_a_listener_with_the_wrong_certificate(ids: Identities) -> None:
    # An impostor listener (key c, trusting b) where b expects a.
    impostor_handler = idle_recorder()
    impostor = PeerLink(settings(), creds(ids, "c", "b"), impostor_handler)
    dialer_handler = idle_recorder()
    async with running(impostor) as (address,):
        b = PeerLink(settings(listen=None, dial=address), creds(ids, "b", "a"), dialer_handler)
        async with running(b):
            await wait_until(
                lambda: b.stats.dial_failed.get(Refusal.UNTRUSTED_CERTIFICATE, 0) >= 2
            )
    assert dialer_handler.connections == impostor_handler.connections == []


def _ca_and_leaf(directory: Path) -> tuple[Path, keys.NodeIdentity]:
    """A CA certificate and a node identity it issued (not self-signed)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "some CA")])
    start, end = NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=1)
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(1)
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issued")]))
        .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2)
        .not_valid_before(start).not_valid_after(end)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, key_path, cert_path = directory / "ca.crt", directory / "l.key", directory / "l.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca_path, keys.load_identity(key_path, cert_path)


async def test_certificate_that_verifies_but_is_not_pinned_is_refused(
    ids: Identities, tmp_path: Path
) -> None:
    # An operator mistake: a CA certificate in the peer list. OpenSSL then accepts any
    # certificate the CA issued; the fingerprint pin still refuses it.
    ca_path, issued = _ca_and_leaf(tmp_path)
    handler = idle_recorder()
    a = PeerLink(
        settings(),
        tlsctx.credentials(ids["a"], keys.load_peer_certificates([ca_path])),
        handler,
    )
    async with running(a) as (address,):
        intruder = PeerLink(
            settings(listen=None, dial=address),
            tlsctx.credentials(issued, keys.load_peer_certificates([ids["a"].cert_path])),
            idle_recorder(),
        )
        async with running(intruder):
            await wait_until(lambda: a.stats.refused.get(Refusal.FINGERPRINT_MISMATCH, 0) >= 1)
    assert handler.connections == []


async def test_silent_client_is_dropped_after_the_handshake_timeout(ids: Identities) -> None:
    async with listener_a(ids, handshake_timeout=0.3) as (a, address, _):
        async with await trio.open_tcp_stream(*address) as client:
            assert await read_until_closed(client) == b""
        assert a.stats.refused == {Refusal.TIMEOUT: 1}


async def test_refusals_are_logged_once_per_address_and_all_counted(
    ids: Identities, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="replicator.transport")
    async with listener_a(ids) as (a, address, _):
        for source in (LOOPBACK, LOOPBACK, LOOPBACK, "127.0.0.3"):
            async with await trio.open_tcp_stream(*address, local_address=source) as client:
                await client.send_all(b"hello?\n")
                await read_until_closed(client)
        await wait_until(lambda: a.stats.refused.get(Refusal.BAD_PREAMBLE, 0) == 4)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2
    assert "from 127.0.0.1:" in lines[0]
    assert "bad_preamble" in lines[0]
    assert "from 127.0.0.3:" in lines[1]


async def test_connection_flood_does_not_starve_the_real_peer(ids: Identities) -> None:
    # Another source address than the real peer's, as an attacker on the link has.
    flood_source = "127.0.0.2"
    listener_side = echo_recorder()
    replies: list[bytes] = []
    done = trio.Event()

    async def talk(conn: FramedConnection) -> None:
        for i in range(20):
            await conn.send_frame(b"%d" % i)
            replies.append(await conn.receive_frame())
        done.set()
        await trio.sleep_forever()

    async def silent_flood(address: Endpoint, held: list[trio.SocketStream]) -> None:
        # Connections that say nothing: each would hold a handshake slot until the
        # timeout, and a new one arrives as soon as the kernel accepts it.
        while not done.is_set():
            held.append(await trio.open_tcp_stream(*address, local_address=flood_source))

    async def junk_flood(address: Endpoint) -> None:
        while not done.is_set():
            async with await trio.open_tcp_stream(*address, local_address=flood_source) as s:
                await s.send_all(b"\x00junk")

    # A handshake timeout longer than the test: without the per-host bound, the flood's
    # silent connections would hold every slot for good and the real peer never get in.
    a = PeerLink(
        settings(max_handshakes=16, max_handshakes_per_host=4, handshake_timeout=60),
        creds(ids, "a", "b"),
        listener_side,
    )
    held: list[trio.SocketStream] = []
    async with running(a) as (address,):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(silent_flood, address, held)
                nursery.start_soon(junk_flood, address)
                await wait_until(lambda: len(held) >= 100)
                b_settings = settings(listen=None, dial=address)
                async with running(PeerLink(b_settings, creds(ids, "b", "a"), Recorder(talk))):
                    await wait_until(done.is_set)
        finally:
            for stream in held:
                await trio.aclose_forcefully(stream)
        refused = a.stats.refused
        assert refused.get(Refusal.OVERLOAD, 0) >= len(held) - 16
        assert refused.get(Refusal.BAD_PREAMBLE, 0) >= 1
    assert [c.peer_fingerprint for c in listener_side.connections] == [ids["b"].fingerprint]
    assert replies == [b"echo %d" % i for i in range(20)]


# --- one connection at a time, rotation -------------------------------------------


def _ordered(ids: Identities) -> tuple[str, str]:
    """(lower, higher) of the pair a/b by fingerprint: the lower's dials are preferred."""
    return ("a", "b") if ids["a"].fingerprint < ids["b"].fingerprint else ("b", "a")


async def test_preferred_connection_replaces_the_other_one(ids: Identities) -> None:
    low, high = _ordered(ids)
    high_handler = idle_recorder()
    low_listener = PeerLink(settings(), creds(ids, low, high), idle_recorder())
    async with running(low_listener) as (low_address,):
        high_link = PeerLink(settings(dial=low_address), creds(ids, high, low), high_handler)
        async with running(high_link) as (high_address,):
            await wait_until(lambda: low_listener.stats.connected and high_link.stats.connected)
            assert high_handler.connections[0].dialed  # high dialed: not preferred
            # Now low dials high: preferred, it replaces the first connection.
            low_dialer = PeerLink(
                settings(listen=None, dial=high_address), creds(ids, low, high), idle_recorder()
            )
            async with running(low_dialer):
                await wait_until(lambda: len(high_handler.connections) == 2)
                await wait_until(lambda: not low_listener.stats.connected)
                assert not high_handler.connections[1].dialed
                assert high_link.stats.connected
                assert high_link.stats.established == 2


async def test_other_connection_is_closed_while_the_preferred_one_is_active(
    ids: Identities,
) -> None:
    low, high = _ordered(ids)
    high_listener = PeerLink(settings(), creds(ids, high, low), idle_recorder())
    async with running(high_listener) as (high_address,):
        low_handler = idle_recorder()
        low_link = PeerLink(settings(dial=high_address), creds(ids, low, high), low_handler)
        async with running(low_link) as (low_address,):
            await wait_until(lambda: low_link.stats.connected)
            high_dialer = PeerLink(
                settings(listen=None, dial=low_address), creds(ids, high, low), idle_recorder()
            )
            async with running(high_dialer):
                await wait_until(lambda: low_link.stats.refused.get(Refusal.DUPLICATE, 0) >= 1)
            assert [c.dialed for c in low_handler.connections] == [True]
            assert low_link.stats.connected


async def test_both_nodes_dialing_settle_on_one_shared_connection(ids: Identities) -> None:
    seen: dict[str, list[tuple[FramedConnection, bytes]]] = {"a": [], "b": []}

    def greeter(me: str) -> Recorder:
        async def greet(conn: FramedConnection) -> None:
            await conn.send_frame(me.encode())
            seen[me].append((conn, await conn.receive_frame()))
            await trio.sleep_forever()

        return Recorder(greet)

    a_address, b_address = free_address(), free_address()
    a = PeerLink(settings(listen=a_address, dial=b_address), creds(ids, "a", "b"), greeter("a"))
    b = PeerLink(settings(listen=b_address, dial=a_address), creds(ids, "b", "a"), greeter("b"))

    def settled() -> bool:
        if not (seen["a"] and seen["b"] and a.stats.connected and b.stats.connected):
            return False
        at_a, at_b = seen["a"][-1][0], seen["b"][-1][0]
        return at_a.local_address == at_b.peer_address and at_a.peer_address == at_b.local_address

    async with running(a), running(b):
        await wait_until(settled)
        assert seen["a"][-1][1] == b"b"
        assert seen["b"][-1][1] == b"a"


async def test_rotation_overlap_then_removal_of_the_old_key(ids: Identities) -> None:
    handler = idle_recorder()
    a = PeerLink(settings(), creds(ids, "a", "b", "b2"), handler)
    async with running(a) as (address,):
        for name in ("b", "b2"):
            dialer = PeerLink(settings(listen=None, dial=address), creds(ids, name, "a"),
                              idle_recorder())
            async with running(dialer):
                await wait_until(lambda: a.stats.peer_fingerprint == ids[name].fingerprint)  # noqa: B023
        # The rotation is over: only b2 stays trusted. A connection with b's old key
        # is dropped at once and cannot come back.
        old = PeerLink(settings(listen=None, dial=address), creds(ids, "b", "a"),
                       idle_recorder())
        async with running(old):
            await wait_until(lambda: a.stats.peer_fingerprint == ids["b"].fingerprint)
            a.set_credentials(creds(ids, "a", "b2"))
            await wait_until(lambda: a.stats.refused.get(Refusal.UNTRUSTED_CERTIFICATE, 0) >= 1)
            assert a.stats.peer_fingerprint is None
    assert [c.peer_fingerprint for c in handler.connections] == [
        ids["b"].fingerprint,
        ids["b2"].fingerprint,
        ids["b"].fingerprint,
    ]

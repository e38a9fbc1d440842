"""Attacks on the peer link of a running daemon pair (issue 6, part 2).

Every test runs a real active/standby pair (:mod:`integration.netns.pair`, hot mode)
that keeps replicating with its real peer throughout: entries are created on the
active before, during (from a background thread) and after the attack, and must all
reach the standby. The attacker sits in its own namespace on the sync network, each
attack from its own address. For each attack the test checks that

* none of it reaches the standby's cache or kernel: afterwards the standby's external
  cache and kernel table hold exactly the active's entries (normalised, see
  :func:`~integration.netns.pair.converge`);
* the refusal is counted (``replicator stats``: ``link_refused_<reason>``) under the
  expected reason;
* it is logged once per source host (however many attempts that host made).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.netns import pair as P
from integration.netns.lab import Lab, Netns, lab
from integration.netns.nodes import DaemonNode, keygen, wait_for
from replicator.framing import encode_preamble
from replicator.keys import generate_identity, write_identity
from replicator.netns import entered

STANDBY = (P.STANDBY_IP, P.PORT)
#: The daemon's handshake timeout (transport.LinkSettings default; not configurable).
HANDSHAKE_TIMEOUT = 5.0
LOG_NEEDLE = "refused peer-link connection from"


def refused(node: DaemonNode) -> dict[str, float]:
    """The node's ``link_refused_*`` counters by reason."""
    prefix = "link_refused_"
    return {k[len(prefix):]: v for k, v in P.stats(node).items() if k.startswith(prefix)}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters that grew, by how much."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def refusal_logs(node: DaemonNode, source: str) -> list[str]:
    """The node's refusal log lines about ``source``."""
    return P.log_lines(node, f"{LOG_NEEDLE} {source}:")


def connect_from(ns: Netns, source: str, target: tuple[str, int],
                 timeout: float = 10.0) -> socket.socket:
    """A TCP connection from ``source`` in ``ns`` to ``target`` (blocking, ``timeout``)."""
    with entered(ns.name):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def tls_attempt(sock: socket.socket, cert: Path | None = None, key: Path | None = None) -> bool:
    """Preamble in clear, TLS 1.3 (optionally with a client certificate), preamble inside.

    Returns True only if the listener answered with its own preamble inside TLS, i.e.
    accepted us. The attacker does not verify the server (it has nothing to pin).
    """
    sock.sendall(encode_preamble())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    try:
        with ctx.wrap_socket(sock) as tls:
            tls.sendall(encode_preamble())
            return tls.recv(8) == encode_preamble()
    except (ssl.SSLError, OSError):
        return False


def drain(sock: socket.socket) -> bytes:
    """Read until the server closes the connection (a socket timeout fails the test);
    return what it sent."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            received += chunk
    return received


def run_attack(pair: P.BridgedPair, attack: Callable[[], None]) -> None:
    """Entries before, during (background) and after ``attack``; then exact convergence."""
    writer = P.Writer(pair.active.ns)
    writer.upsert(P.synthetic(pair.take_entries(300), 300))
    with P.BackgroundWrites(writer, pair.next_entry) as bg:
        attack()
    pair.next_entry = bg.next
    writer.upsert(P.synthetic(pair.take_entries(300), 300))
    P.converge(pair, 60, "the attack")
    assert pair.standby.status()["peer_up"]


def expect_refusal(pair: P.BridgedPair, source: str, reason: str, attack: Callable[[], None],
                   count: int = 1) -> None:
    """Run ``attack`` (from ``source``) during replication; ``count`` refusals for
    ``reason`` and exactly one log line about ``source``."""
    before = refused(pair.standby)
    run_attack(pair, attack)
    grew: dict[str, float] = {}

    def counted() -> bool:
        grew.update(delta(before, refused(pair.standby)))
        return sum(grew.values()) >= count

    wait_for(counted, 20, f"{count} refusal(s) counted")
    assert grew == {reason: count}, grew
    lines = refusal_logs(pair.standby, source)
    assert len(lines) == 1, lines


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[P.BridgedPair]:
    """One pair for the attacks that need no special configuration (each attack uses
    its own source address and entry numbers, so they do not see each other's)."""
    with lab("at") as the_lab:
        yield P.make_pair(the_lab, tmp_path_factory.mktemp("shared"))


def test_client_without_certificate(shared: P.BridgedPair) -> None:
    pair = shared
    (src,) = pair.new_addresses(1)

    def attack() -> None:
        assert not tls_attempt(connect_from(pair.attacker, src, STANDBY))

    expect_refusal(pair, src, "no_certificate", attack)


def test_unpinned_self_signed_certificate(shared: P.BridgedPair) -> None:
    pair = shared
    (src,) = pair.new_addresses(1)
    key, cert = keygen(pair.standby.workdir, "mallory")

    def attack() -> None:
        # Three tries from one host: three refusals counted, one log line.
        for _ in range(3):
            assert not tls_attempt(connect_from(pair.attacker, src, STANDBY), cert, key)

    expect_refusal(pair, src, "untrusted_certificate", attack, count=3)


def test_expired_certificate_refused_even_when_pinned(shared: P.BridgedPair) -> None:
    # The strongest form: the standby pins the expired certificate next to the active's
    # valid one (live reload), and the client holds its private key. Expiry alone must
    # refuse it.
    pair = shared
    workdir = pair.standby.workdir
    old = generate_identity("expired", datetime.datetime.now(datetime.UTC)
                            - datetime.timedelta(days=400), days=30)
    key, cert = workdir / "expired.key", workdir / "expired.crt"
    write_identity(old, key, cert)
    P.set_config(pair.standby, "peer_certs", P.toml_paths([workdir / "act.crt", cert]))
    P.reload(pair.standby)
    (src,) = pair.new_addresses(1)

    def attack() -> None:
        assert not tls_attempt(connect_from(pair.attacker, src, STANDBY), cert, key)

    expect_refusal(pair, src, "untrusted_certificate", attack)
    assert "expired" in refusal_logs(pair.standby, src)[0]


def test_old_key_refused_after_rotation(netlab: Lab, tmp_path: Path) -> None:
    """The rotation procedure of docs/security.md, replicating all along; then the
    revoked (old) key is refused while the new one carries the link."""
    pair = P.make_pair(netlab, tmp_path)
    act, sby = pair.nodes
    writer = P.Writer(act.ns)
    old_key, old_cert = tmp_path / "act.key", tmp_path / "act.crt"
    new_key, new_cert = keygen(tmp_path, "act2")
    writer.upsert(P.synthetic(0, 300))
    with P.BackgroundWrites(writer, 300) as bg:
        # 1. The standby trusts both certificates (overlap): live reload.
        P.set_config(sby, "peer_certs", P.toml_paths([old_cert, new_cert]))
        P.reload(sby)
        # 2. The active switches to its new key (tls.key/cert need a restart).
        P.set_config(act, "key", f'"{new_key}"')
        P.set_config(act, "cert", f'"{new_cert}"')
        pair.restart(act)
        wait_for(lambda: sby.status()["peer_up"], 30, "the link with the new key")
        # 3. The old certificate is revoked: the standby pins only the new one.
        P.set_config(sby, "peer_certs", P.toml_paths([new_cert]))
        P.reload(sby)
        time.sleep(1)
    pair.next_entry = bg.next
    writer.upsert(P.synthetic(pair.take_entries(300), 300))
    P.converge(pair, 60, "the key rotation")
    assert sby.status()["peer_up"]
    # 4. Whoever holds the old key (a stolen backup, a retired node) is refused.
    (src,) = pair.new_addresses(1)

    def attack() -> None:
        assert not tls_attempt(connect_from(pair.attacker, src, STANDBY), old_cert, old_key)

    expect_refusal(pair, src, "untrusted_certificate", attack)


class RecordingProxy:
    """A TCP proxy in a namespace that records the client->server bytes of the last
    connection it relayed.

    It accepts connections on ``listen`` one at a time and relays each to ``target``
    (from the same address), both ways, until either end closes or it is stopped.
    """

    def __init__(self, ns: Netns, listen: tuple[str, int], target: tuple[str, int]) -> None:
        with entered(ns.name):
            self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(listen)
        self._server.listen(4)
        self._server.settimeout(0.1)
        self._ns, self._target = ns, target
        self.client_bytes = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            with client:
                try:
                    upstream = connect_from(self._ns, P.ATTACKER_IP, self._target)
                except OSError:
                    continue  # the target is not listening yet: the dialer retries
                with upstream:
                    self.client_bytes = bytearray()
                    self._relay(client, upstream)

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        other = {client: upstream, upstream: client}
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                ready, _, _ = select.select(list(other), [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        self.client_bytes += data
                    other[sock].sendall(data)

    def stop(self) -> None:
        """Stop relaying (the relayed connection is closed)."""
        self._stop.set()
        self._thread.join()
        self._server.close()


def test_replayed_session_refused(netlab: Lab, tmp_path: Path) -> None:
    # The active reaches the standby only through a recording proxy in the attacker's
    # namespace (the standby's own dial goes nowhere), so the whole authenticated
    # session, handshake and sync frames, passes by the attacker.
    pair = P.make_pair(netlab, tmp_path, start=False)
    P.set_config(pair.active, "peer_address", f'"{P.ATTACKER_IP}"')
    P.set_config(pair.standby, "peer_port", "1")
    proxy = RecordingProxy(pair.attacker, (P.ATTACKER_IP, P.PORT), STANDBY)
    try:
        pair.start()
        P.Writer(pair.active.ns).upsert(P.synthetic(10_000, 500))
        P.converge(pair, 60, "replication through the proxy")
        captured = bytes(proxy.client_bytes)
        # Handshake plus at least the 500 entries' worth of encrypted frames.
        assert len(captured) > 10_000, len(captured)
        (src,) = pair.new_addresses(1)

        def attack() -> None:
            sock = connect_from(pair.attacker, src, STANDBY)
            # Refused before all of it was even read: a reset or broken pipe.
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(captured)
            # Whatever the server answers (a fresh ServerHello, an alert), it closes.
            drain(sock)
            sock.close()

        expect_refusal(pair, src, "tls_error", attack)
    finally:
        proxy.stop()


def test_unauthenticated_malformed_bytes(shared: P.BridgedPair) -> None:
    """What an attacker who cannot authenticate can send: a truncated preamble, an
    oversized length prefix instead of a preamble, garbage after a valid preamble."""
    pair = shared
    truncated, oversized, garbage = pair.new_addresses(3)
    cases = [
        (truncated, encode_preamble()[:5], "closed_early"),
        (oversized, b"\xff\xff\xff\xff" + bytes(4096), "bad_preamble"),
        (garbage, encode_preamble() + os.urandom(4096), "tls_error"),
    ]
    for source, data, reason in cases:
        def attack(source: str = source, data: bytes = data) -> None:
            sock = connect_from(pair.attacker, source, STANDBY)
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            drain(sock)
            sock.close()

        expect_refusal(pair, source, reason, attack)


def test_silent_client_dropped_after_handshake_timeout(shared: P.BridgedPair) -> None:
    pair = shared
    (src,) = pair.new_addresses(1)

    def attack() -> None:
        sock = connect_from(pair.attacker, src, STANDBY, timeout=4 * HANDSHAKE_TIMEOUT)
        start = time.monotonic()
        assert drain(sock) == b""
        held = time.monotonic() - start
        sock.close()
        print(f"silent client dropped after {held:.1f} s")
        assert held >= HANDSHAKE_TIMEOUT - 0.5

    expect_refusal(pair, src, "timeout", attack)


def flood(ns: Netns, source: str, target: tuple[str, int], rate: int,
          seconds: float) -> int:
    """``rate`` connection attempts per second for ``seconds`` from ``source``, each
    sending a line of HTTP and closing; returns how many connected (and so reached the
    listener). Non-blocking: attempts not connected within 2 s are abandoned."""
    sent = 0
    pending: dict[int, tuple[socket.socket, float]] = {}
    poller = select.poll()
    with entered(ns.name):
        start = time.monotonic()
        made = 0
        while True:
            now = time.monotonic()
            due = min(int((now - start) * rate), int(rate * seconds))
            while made < due:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.bind((source, 0))
                sock.connect_ex(target)
                pending[sock.fileno()] = (sock, now)
                poller.register(sock, select.POLLOUT)
                made += 1
            for fd, _ in poller.poll(1):
                sock, _ = pending.pop(fd)
                poller.unregister(fd)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    try:
                        sock.send(b"GET / HTTP/1.0\r\n\r\n")
                        sent += 1
                    except OSError:
                        pass
                sock.close()
            for fd, (sock, t) in list(pending.items()):
                if now - t > 2.0:
                    poller.unregister(fd)
                    del pending[fd]
                    sock.close()
            if made >= rate * seconds and not pending:
                return sent


def test_connection_flood(shared: P.BridgedPair) -> None:
    pair = shared
    (src,) = pair.new_addresses(1)
    connections = P.stats(pair.standby)["sync_connections"]
    before = refused(pair.standby)
    sent = 0

    def attack() -> None:
        nonlocal sent
        sent = flood(pair.attacker, src, STANDBY, rate=1000, seconds=3)

    run_attack(pair, attack)
    grew: dict[str, float] = {}

    def counted() -> bool:
        grew.update(delta(before, refused(pair.standby)))
        return sum(grew.values()) >= sent

    wait_for(counted, 30, f"{sent} refusals counted")
    print(f"flood: 3000 attempts, {sent} connected, refused {grew}")
    assert sent >= 1000
    assert sum(grew.values()) == sent, (sent, grew)
    assert set(grew) <= {"overload", "bad_preamble", "closed_early"}, grew
    assert len(refusal_logs(pair.standby, src)) == 1
    # The real peer's connection survived the flood.
    assert P.stats(pair.standby)["sync_connections"] == connections
